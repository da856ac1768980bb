"""examples/agent_loop.py, the LLM tool loop of docs/agents.md, run against a live runner
with a scripted model (a fixed list of turns), so that the example cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from stockade import client
from stockade.runner.local import RunnerProcess

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_loop.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("agent_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_call(number: int, code: str) -> dict[str, Any]:
    return {"text": "", "tool_calls": [{"id": f"call-{number}", "name": "run_python",
                                        "input": {"code": code}}]}


def test_the_tool_loop_runs_the_models_code_and_returns_its_answer(
        runner: RunnerProcess) -> None:
    agent = load_example()
    script = [
        tool_call(1, "import pandas as pd\ndf = pd.DataFrame({'n': range(1, 11)})"),
        tool_call(2, "print('rows', len(df))\nint(df.n.sum())"),
        tool_call(3, "1/0"),
        {"text": "The sum is 55."},
    ]
    seen: list[list[dict[str, Any]]] = []

    def model(messages: list[dict[str, Any]]) -> dict[str, Any]:
        seen.append([dict(m) for m in messages])
        return script[len(seen) - 1]

    with client.Client(f"http://127.0.0.1:{runner.port}") as runner_api, \
            runner_api.session() as session:
        answer = agent.tool_loop(model, session, "Sum the numbers 1 to 10 with pandas.")
    assert answer == "The sum is 55."
    tool_results = [m["content"] for m in seen[-1] if m["role"] == "tool"]
    assert tool_results[0] == "status: ok"
    assert tool_results[1] == "status: ok\nstdout:\nrows 10\n\nvalue: 55"
    assert tool_results[2].startswith("status: runtime_error\nstderr:\n")
    assert "ZeroDivisionError" in tool_results[2]
    assert [m["tool_call_id"] for m in seen[-1] if m["role"] == "tool"] == \
        ["call-1", "call-2", "call-3"]
    assert agent.TOOLS[0]["name"] == "run_python"
