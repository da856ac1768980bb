"""A runner of a test's own: started, then stopped and checked for leftovers on the way out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from stockade.runner.config import RunnerConfig
from stockade.runner.local import RunnerProcess
from support.leftovers import runner_leftovers


@contextlib.contextmanager
def own_runner(config: RunnerConfig, wait: bool = True,
               *serve_args: str) -> Iterator[RunnerProcess]:
    """A started runner (ready, unless not `wait`); on the way out it is stopped (if still
    up) and must leave nothing."""
    process = RunnerProcess(config)
    process.start(wait, *serve_args)
    try:
        yield process
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.stop()
        left = runner_leftovers(config)
        process.close()
        assert not left, f"the runner left {left}"
