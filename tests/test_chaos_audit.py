"""benchmarks/chaos.py's audit counts what it claims to: doubled, lost (never committed, or skipped without a
state fetch) and divergent outer steps, from the islands' event logs."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.chaos import audit  # noqa: E402
from tests.test_elastic_e2e import Run  # noqa: E402


def _write(run: Run, name: str, events: list[dict]) -> None:
    with open(run.tmp / f"{name}.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(dict({"name": name, "order": ["a", "b"], "epoch": 1, "aborts": 0}, **e)) + "\n")


def _step(s, h, pid=1, t=0.0, ok=True):
    return {"event": "step", "step": s, "hash": h, "ok": ok, "pid": pid, "t": t}


def test_audit_counts_doubled_skipped_missing_and_divergent_steps(tmp_path):
    run = Run(tmp_path, dump=False)
    _write(run, "a", [_step(0, "h0", t=1), _step(1, "h1", t=2), _step(1, "h1", t=3),  # step 1 twice
                      _step(3, "h3", t=9)])  # skipped 2 without fetching (and nobody committed 2)
    _write(run, "b", [_step(0, "h0", pid=2, t=1), _step(1, "hX", pid=2, t=2),  # diverges at step 1
                      {"event": "fetched", "step": 3, "pid": 2, "t": 5}, _step(3, "h3", pid=2, t=6)])
    res = audit(run, ["a", "b"])
    assert (res["doubled"], res["divergent"]) == (1, 1)
    assert res["lost"] == 2  # step 2 committed by nobody + a's skip
    assert res["stalls"]["a"] == (7.0, 3) and res["steps"] == 4


def test_audit_of_a_clean_log_is_clean_and_checks_the_replay(tmp_path):
    run = Run(tmp_path, dump=False)
    run.seeds = {"a": 1, "b": 2}
    _write(run, "a", [_step(0, "not-the-replay's", t=1)])
    _write(run, "b", [_step(0, "not-the-replay's", pid=2, t=1)])
    res = audit(run, ["a", "b"])
    assert (res["doubled"], res["lost"], res["divergent"]) == (0, 0, 1)  # agreeing, but not what the run computes
