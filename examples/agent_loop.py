"""An LLM tool loop on `stockade.client`: the model writes Python, a stockade session runs
it, the model reads what came back, until it answers.

`model` is any function from the conversation so far to the model's next turn: wire it to
your LLM's API (see docs/agents.md). Its turn is a dict: {"text": str, "tool_calls":
[{"id": str, "name": "run_python", "input": {"code": str}}]}; a turn without tool calls is
the answer. tests/test_agent_loop.py runs this file with a scripted model.

    python examples/agent_loop.py "What is the 30th Fibonacci number?"   # a runner on :8080
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from stockade.client import CellResult, Client, Session

# What the model is told it may call (JSON Schema, as LLM APIs take tool definitions).
TOOLS = [{
    "name": "run_python",
    "description": "Run Python in a sandboxed interpreter that keeps its state between "
                   "calls. Returns stdout, stderr and the value of the last expression. "
                   "No network.",
    "input_schema": {"type": "object", "properties": {"code": {"type": "string"}},
                     "required": ["code"]},
}]
Turn = dict[str, Any]
Model = Callable[[list[Turn]], Turn]


def observation(cell: CellResult) -> str:
    """What the model reads back from a cell."""
    parts = [f"status: {cell.status}"]
    if cell.stdout:
        parts.append(f"stdout:\n{cell.stdout}")
    if cell.stderr:
        parts.append(f"stderr:\n{cell.stderr}")
    parts += [f"value: {o.data}" for o in cell.outputs if o.mime == "text/plain"]
    parts += [f"[{o.mime} output]" for o in cell.outputs if o.mime != "text/plain"]
    return "\n".join(parts)


def tool_loop(model: Model, session: Session, task: str, max_turns: int = 8) -> str:
    """The model's answer to `task`, its code run in `session`."""
    messages: list[Turn] = [{"role": "user", "content": task}]
    for _ in range(max_turns):
        turn = model(messages)
        messages.append({"role": "assistant", **turn})
        calls = turn.get("tool_calls") or []
        if not calls:
            return str(turn.get("text", ""))
        for call in calls:
            if call["name"] != "run_python":
                content = f"unknown tool {call['name']!r}"
            else:
                content = observation(session.run(call["input"]["code"]))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
    raise RuntimeError(f"no answer within {max_turns} turns")


def main(task: str, model: Model) -> None:
    with Client() as runner, runner.session() as session:
        print(tool_loop(model, session, task))


if __name__ == "__main__":
    def ask_the_operator(messages: list[Turn]) -> Turn:
        """A stand-in model: you. Type code to run, or an answer prefixed with '= '."""
        print(messages[-1].get("content", ""), file=sys.stderr)
        line = input("code (or '= answer'): ")
        if line.startswith("= "):
            return {"text": line[2:]}
        return {"text": "", "tool_calls": [{"id": str(len(messages)), "name": "run_python",
                                            "input": {"code": line}}]}

    main(" ".join(sys.argv[1:]) or "What is 6 * 7?", ask_the_operator)
