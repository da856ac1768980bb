"""Sessions on a deployed host, through its nginx: state between calls, a figure from the
full image's matplotlib, files, and the session gone once deleted."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from conftest import Caller


def call(caller: Caller, method: str, path: str, body: Any = None,
         raw: bytes | None = None) -> tuple[int, bytes]:
    request = caller.request(path, body)
    request.method = method
    if raw is not None:
        request.data = raw
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_session_keeps_its_state_draws_a_figure_and_ends(caller: Caller) -> None:
    # The image test's VM emulates its CPU (qemu TCG): a first figure there takes seconds
    # of CPU, not the ~0.15 s it takes on a real core; the default per call is 2 s.
    status, body = call(caller, "POST", "/v1/sessions",
                        {"limits": {"cpu_time_s": 10, "wall_time_s": 20}})
    assert status == 201, body
    session = json.loads(body)["id"]
    try:
        runs = f"/v1/sessions/{session}/runs"
        assert call(caller, "POST", runs, {"code": "import pandas as pd\n"
                                           "df = pd.DataFrame({'a': [1, 2]})"})[0] == 200
        # A small figure without text: the emulated CPU draws it in a fraction of the limit.
        status, body = call(caller, "POST", runs, {"code": "import matplotlib.pyplot as plt\n"
                                                   "plt.figure(figsize=(2, 2), dpi=40)\n"
                                                   "plt.plot(df.a)\nplt.axis('off')\n"
                                                   "int(df.a.sum())"})
        record = json.loads(body)
        assert record["status"] == "ok", record
        by_mime = {o["mime"]: o["data"] for o in record["outputs"]}
        assert by_mime["text/plain"] == "3"
        assert base64.b64decode(by_mime["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
        assert call(caller, "PUT", f"/v1/sessions/{session}/files/in.txt", raw=b"data")[0] \
            == 204
        status, body = call(caller, "POST", runs, {"code": "open('in.txt').read()"})
        assert json.loads(body)["outputs"][0]["data"] == "'data'"
    finally:
        assert call(caller, "DELETE", f"/v1/sessions/{session}")[0] == 204
    assert call(caller, "GET", f"/v1/sessions/{session}")[0] == 404
