"""How fast this machine runs the kind of work a step costs, today: a fixed loop of it, timed in CPU seconds.

The benches' CPU per step is only comparable within one run (these VMs drift: the same code spent 6.1 ms a step at
10,000 one day and 8.7–10.1 the next). A reference loop timed beside each run lets figures from different runs be
read against each other: CPU per step ÷ the loop's time moves with the code, not with the machine. The loop is what
a hop does in Python (a turn's JSON out and back, its ids to base64 and back, an ORM query compiled, dicts and lists
built), single-threaded, the best of several tries (an interrupted try only ever reads slower).
"""

from __future__ import annotations

import base64
import json
import time
from array import array

TRIES = 5


def _turn() -> dict:
    ids = array("i", range(10, 4010))
    return {
        "episode_id": 123456,
        "step": 7,
        "reply": "I will look at the failing test first.\n```bash\ncat tests/test_parser.py | head -50\n```" * 3,
        "turn": {
            "model_input": [{"role": "user", "content": "observation line\n" * 120}],
            "prompt_ids": base64.b64encode(ids.tobytes()).decode(),
            "completion_ids": base64.b64encode(ids[:200].tobytes()).decode(),
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 512, "logprobs": True},
        },
    }


def _loop(turn: dict, rounds: int) -> None:
    from orchestrator.models import Episode

    for index in range(rounds):
        decoded = json.loads(json.dumps(turn))
        array("i", base64.b64decode(decoded["turn"]["prompt_ids"])).tolist()
        str(Episode.objects.filter(pk=index, status__in=["running", "evaluating"], attempt=1).query)
        rows = [{"index": step, "output": f"step {step}", "observation": "ok"} for step in range(40)]
        sorted(rows, key=lambda row: -row["index"])


def round_ms(rounds: int = 100) -> float:
    """Milliseconds of CPU one round of the reference loop takes on this machine now (Django set up first)."""
    turn = _turn()
    _loop(turn, 5)  # imports and caches warm
    best = float("inf")
    for _ in range(TRIES):
        began = time.process_time()
        _loop(turn, rounds)
        best = min(best, time.process_time() - began)
    return 1000 * best / rounds
