"""What a call to a runner can fail with. Every error is a `StockadeError`; a refusal carries
the API's own words (its code, the field at fault, the request id to quote to the operator)."""

from __future__ import annotations


class StockadeError(Exception):
    """A call to a runner failed."""


class ApiError(StockadeError):
    """The runner refused the request (HTTP 4xx or 5xx), and said why."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        self.status = status
        self.code = code  # the API's error code: "invalid_request", "rate_limited", ...
        self.message = message
        self.field = field  # the request's field at fault, where one is
        self.request_id = request_id
        self.retry_after = retry_after  # seconds, where the runner said when to come back
        where = f" ({field})" if field else ""
        quoted = f"; request {request_id}" if request_id else ""
        super().__init__(f"{code}{where}: {message} [HTTP {status}{quoted}]")

    @property
    def before_start(self) -> bool:
        """Whether the runner refused before anything ran: a busy or rate-limited runner's
        own answer (429 or 503 with its error body), which is safe to send again."""
        return self.status in (429, 503) and self.code != "http_error"


class TransportError(StockadeError):
    """No answer: the runner could not be reached, or the connection failed."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent  # the request may have reached the runner (a run may have started)


class AnswerError(StockadeError):
    """The runner's answer is not what the API documents (or is over the client's cap)."""
