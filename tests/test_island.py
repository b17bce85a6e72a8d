"""Elastic islands with the real JAX trainer: separate processes, a coordinator, the TCP int8 ring."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intellect_jax.metrics import read_metrics
from tests.elastic_keys import write_roster

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/debug.toml", "--data.kind=synthetic", "--data.seq_len=32", "--model.vocab_size=256",
        "--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_hidden_layers=2",
        "--diloco.inner_steps=3", "--mesh.islands=1", "--mesh.fsdp=1", "--run.host_devices=1",
        "--optim.learning_rate=1e-2", "--elastic.run_id=t", "--elastic.heartbeat_s=0.5",
        "--elastic.dead_after_s=4", "--elastic.data_shards=3", "--checkpoint.every_outer_steps=100"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def _start_coordinator(tmp_path, ids, tag="", grace_s=0.0):
    port_file = tmp_path / f"port{tag}"
    islands_file, keys = ids
    proc = subprocess.Popen([sys.executable, "-m", "intellect_jax", "coordinator", "--bind", "127.0.0.1:0",
                             "--key-file", str(keys["coordinator"]), "--islands-file", str(islands_file),
                             "--run-id", "t", "--min-islands", "3",
                             "--dead-after-s", "4", "--recovery-grace-s", str(grace_s), "--port-file", str(port_file)],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / f"coord{tag}.log", "w"))
    deadline = time.time() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "coordinator did not start"
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


@pytest.fixture
def coordinator(tmp_path):
    """Every island (island0..2, and island2b for a restart) and the coordinator with its own key, listed in one
    islands file, as a run's operator sets it up."""
    ids = write_roster(tmp_path, ["island0", "island1", "island2", "island2b"])
    proc, addr = _start_coordinator(tmp_path, ids)
    yield addr, ids
    proc.kill()
    proc.wait()


def _island(tmp_path, addr, ids, i, steps, name=None, extra=(), module=("intellect_jax",)):
    name = name or f"island{i}"
    islands_file, keys = ids
    log = open(tmp_path / f"{name}.log", "a")
    return subprocess.Popen(
        [sys.executable, "-m", *module, "train", *TINY, *extra, f"--run.steps={steps}",
         f"--run.dir={tmp_path / name}", f"--elastic.coordinator={addr}", f"--elastic.key_file={keys[name]}",
         f"--elastic.islands_file={islands_file}", f"--elastic.data_shard={i}"],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _outer(run_dir):
    return {r["outer_step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "outer"}


def _codes_on_device(yes):
    return (f"--elastic.device_codes={'on' if yes else 'off'}",)


@pytest.mark.parametrize("extra", [(), pytest.param(("--diloco.compression=int4", "--diloco.error_feedback=true"),
                                                     marks=pytest.mark.slow)],  # the streaming test runs int4 + EF
                         ids=["int8", "int4-ef"])
def test_three_islands_identical_global_state(tmp_path, coordinator, extra):
    """Island 0 packs its pseudo-gradient on the host (elastic.device_codes "off"), the others on their devices and
    decode the mean there: the ring's all-gather bytes and the twins' identical arithmetic keep every hash equal."""
    addr, ids = coordinator
    procs = [_island(tmp_path, addr, ids, i, steps=15, extra=extra + _codes_on_device(i > 0)) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=400) == 0, (tmp_path / "island0.log").read_text()[-3000:]
    outers = [_outer(tmp_path / f"island{i}") for i in range(3)]
    assert all(sorted(o) == [1, 2, 3, 4, 5] for o in outers), [sorted(o) for o in outers]
    # each goodbye said the run finished (a late joiner would be told the run is over, not wait for a peer)
    assert (tmp_path / "coord.log").read_text().count("finished its run at outer step 5") == 3
    for step in range(1, 6):
        hashes = {o[step]["params_hash"] for o in outers}
        assert len(hashes) == 1, (step, hashes)
        assert all(o[step]["islands"] == 3 and o[step]["bytes_sent_per_island"] > 0 for o in outers)
        # the bytes data-parallel would have sent (fp32 gradients of every parameter, at each of the H=3 inner
        # steps, among the same 3 islands) over the bytes the ring sent: int8/int4 codes + scales + frame headers
        # of a tiny model, so well below the codec's own 4 x 3 / 1.016 (or 8 x 3 / 1.03) but above 1
        assert all(2 < o[step]["wire_ratio_vs_ddp"] < (8 if extra else 4) * 3 for o in outers), \
            [o[step]["wire_ratio_vs_ddp"] for o in outers]
        # where each reduce's time went: the parts are measured, none negative
        assert all(o[step][f"reduce_{k}_seconds"] >= 0 for o in outers for k in REDUCE_PHASES)
        # error feedback: every island keeps its own residual (different islands, different residuals)
        assert all(("residual_norm" in o[step]) == bool(extra) for o in outers)
        if extra:
            assert len({o[step]["residual_norm"] for o in outers}) == 3
    for i in range(3):
        rows = [r for r in read_metrics(tmp_path / f"island{i}" / "metrics.jsonl") if r["kind"] == "inner"]
        inner = [r["loss"] for r in rows]
        assert sum(inner[-3:]) / 3 < sum(inner[:3]) / 3 - 0.05, inner
        cpu = [r["process_cpu_seconds"] for r in rows]  # the process's CPU time so far: it only grows
        assert cpu[0] > 0 and all(b >= a for a, b in zip(cpu, cpu[1:])), cpu
        assert ("codes made on the devices" in (tmp_path / f"island{i}.log").read_text()) == (i > 0)


REDUCE_PHASES = ("barrier", "connect", "ring", "done")  # an outer row's reduce_<phase>_seconds

STREAMING = ("--diloco.inner_steps=4", "--diloco.fragments=2", "--diloco.overlap_steps=1", "--diloco.merge_alpha=0.5")


STREAMING_EF = STREAMING + ("--diloco.compression=int4", "--diloco.error_feedback=true")


def test_streaming_islands_overlap_the_reduce_and_agree_at_every_fragment_sync(tmp_path, coordinator):
    """Streaming DiLoCo over TCP (int4 + error feedback): 2 fragments (H=4: fragment 0 syncs at 4, 8, .., fragment 1
    at 6, 10, ..), each reduce running in the background for one inner step. Every island applies every fragment's
    mean at the same step and votes the same hash; the rows say which fragment and how much of the reduce was
    hidden. Island 0 packs on the host, the others on their devices (as in the blocking test)."""
    addr, ids = coordinator
    procs = [_island(tmp_path, addr, ids, i, steps=16, extra=STREAMING_EF + _codes_on_device(i > 0))
             for i in range(3)]
    for p in procs:
        assert p.wait(timeout=400) == 0, (tmp_path / "island0.log").read_text()[-3000:]
    outers = [_outer(tmp_path / f"island{i}") for i in range(3)]
    # syncs at 4 6 .. 14, each applied one step later; none starts at step 16 (its mean would be due after the end)
    assert all(sorted(o) == [1, 2, 3, 4, 5, 6] for o in outers), [sorted(o) for o in outers]
    for k in range(1, 7):
        rows = [o[k] for o in outers]
        assert len({r["params_hash"] for r in rows}) == 1, (k, rows)
        assert {r["fragment"] for r in rows} == {(k - 1) % 2} and {r["step"] for r in rows} == {3 + 2 * k}
        assert all(r["islands"] == 3 and r["overlap_steps"] == 1 for r in rows)
        assert all(r["sync_seconds"] >= r["wait_seconds"] >= 0 and r["hidden_seconds"] >= 0 for r in rows)
        # the wait, split into its parts (the verdict and copy at the launch, the reduce, the apply, the snapshot)
        assert all(abs(sum(r[f"wait_{k}_seconds"] for k in ("verdict", "launch", "reduce", "apply", "vote"))
                       - r["wait_seconds"]) < 1e-6 for r in rows), rows
        assert all(r[f"reduce_{k}_seconds"] >= 0 for r in rows for k in REDUCE_PHASES)
        assert all(r["bytes_sent_per_island"] > 0 and 1 < r["wire_ratio_vs_ddp"] < 8 * 4 for r in rows), rows
    for i in range(3):
        inner = [r["loss"] for r in read_metrics(tmp_path / f"island{i}" / "metrics.jsonl") if r["kind"] == "inner"]
        assert sum(inner[-3:]) / 3 < sum(inner[:3]) / 3 - 0.05, inner
    # The whole run restarts and is prolonged to 24 steps: every island resumes from its final checkpoint (step 16,
    # no reduce in flight: none is ever saved) and launches fragment 0's sync at once, as the schedule says. The new
    # coordinator learns the epoch that committed outer step 5 from the checkpoints' meta, so it waits for exactly
    # its three members (however slow their restart and compile), not for a timer: the grace only bounds that wait.
    coord, addr = _start_coordinator(tmp_path, ids, tag="2", grace_s=300.0)
    try:
        procs = [_island(tmp_path, addr, ids, i, steps=24, extra=STREAMING_EF + _codes_on_device(i > 0))
                 for i in range(3)]
        for p in procs:
            assert p.wait(timeout=400) == 0, (tmp_path / "island0.log").read_text()[-3000:]
    finally:
        coord.kill()
        coord.wait()
    outers = [_outer(tmp_path / f"island{i}") for i in range(3)]
    assert all(sorted(o) == list(range(1, 11)) for o in outers), [sorted(o) for o in outers]
    for k in range(1, 11):
        assert len({o[k]["params_hash"] for o in outers}) == 1 and {o[k]["step"] for o in outers} == {3 + 2 * k}
    assert all("resumed from checkpoint step 16" in (tmp_path / f"island{i}.log").read_text() for i in range(3))
    assert "rebuilt view from 3 islands: run at outer step 6" in (tmp_path / "coord2.log").read_text()


def test_streaming_island_that_diverges_loses_the_vote_and_re_syncs_before_its_next_reduce(tmp_path, coordinator):
    """Streaming, 2 fragments, H = 8, tau = 3 (syncs start at 8, 12, 16, 20; each mean lands 3 steps later). Island 2's
    global params are perturbed right after it applies outer step 1's mean (tests/diverging_island.py), so its hash
    vote loses. The vote runs in the background; the next sync's reduce thread (launched at step 16) takes the
    verdict before anything leaves and sends nothing; island 2 re-syncs from a peer before that mean is due and
    joins the sync late from the peer's state, or, if the others' epoch formed without it (the coordinator does not
    wait for an island that must re-sync), fetches the state again once the step completed. Island 0 and 1 apply
    every outer step once, at the same steps; every hash island 2 reports agrees with theirs but its losing vote,
    and it ends with the run's state."""
    addr, ids = coordinator
    extra = ("--diloco.inner_steps=8", "--diloco.fragments=2", "--diloco.overlap_steps=3")
    procs = [_island(tmp_path, addr, ids, i, steps=24, extra=extra,
                     module=("tests.diverging_island", "1") if i == 2 else ("intellect_jax",)) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=400) == 0, (tmp_path / "island2.log").read_text()[-3000:]
    rows = [[r for r in read_metrics(tmp_path / f"island{i}" / "metrics.jsonl") if r["kind"] == "outer"]
            for i in range(3)]
    for i in range(3):  # no outer step doubled
        assert len({r["outer_step"] for r in rows[i]}) == len(rows[i]), rows[i]
    a, b, c = ({r["outer_step"]: r for r in rs} for rs in rows)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for k in range(1, 5):
        assert a[k]["params_hash"] == b[k]["params_hash"] and a[k]["step"] == b[k]["step"] == 8 + 4 * k - 1, k
    assert {1, 2, 4} <= set(c), sorted(c)
    assert c[2]["params_hash"] != a[2]["params_hash"]  # island 2 voted its perturbed state
    assert all(c[k]["params_hash"] == a[k]["params_hash"] for k in c if k != 2), (c, a)
    log = (tmp_path / "island2.log").read_text()
    assert "fault injection: global params perturbed after outer step 1" in log
    assert "global state after outer step 1 differs from the majority: re-syncing from a peer" in log
    # the losing verdict reached the training thread through the next reduce, and that reduce sent nothing: the
    # island joined the sync (outer step 2) again from the peer's state
    assert re.search(r"joining outer step 2's sync [123] inner step\(s\) after its start", log), log[-3000:]
    assert all("differs from the majority" not in (tmp_path / f"island{i}.log").read_text() for i in range(2))


@pytest.mark.slow
@pytest.mark.parametrize("extra,steps,rows", [((), 600, 200), (STREAMING, 600, 298)], ids=["blocking", "streaming"])
def test_killed_island_recovers_live_from_a_peer(tmp_path, coordinator, extra, steps, rows):
    """Streaming: syncs every 2 steps from step 4 on (298 applied in 600 steps: none starts at step 600, its mean would
    be due after the end); an island killed mid-overlap leaves the survivors to finish that fragment's reduce without
    it. (With 300 steps the two survivors finished the run before the restarted island had compiled.)"""
    addr, ids = coordinator
    procs = [_island(tmp_path, addr, ids, i, steps=steps, extra=extra) for i in range(3)]
    victim_metrics = tmp_path / "island2" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until island2 has been through an outer step, then kill it mid-training
        if victim_metrics.exists() and any('"outer"' in line for line in victim_metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    procs[2].send_signal(signal.SIGKILL)
    procs[2].wait()
    time.sleep(2)
    restarted = _island(tmp_path, addr, ids, 2, steps=steps, name="island2b", extra=extra)
    for p in procs[:2] + [restarted]:
        assert p.wait(timeout=600) == 0, (tmp_path / "island2b.log").read_text()[-3000:]
    log = (tmp_path / "island2b.log").read_text()
    assert "fetching the state from a live peer" in log and "installed the global state" in log
    clog = (tmp_path / "coord.log").read_text()  # `intellect-jax coordinator` keeps its INFO lines (absl or not)
    assert "listening on" in clog and "island island2 dead: heartbeat connection closed" in clog
    a, b, c = (_outer(tmp_path / n) for n in ("island0", "island1", "island2b"))
    assert sorted(a) == sorted(b) == list(range(1, rows + 1))  # the survivors lost no outer step, doubled none
    joined = sorted(c)
    assert joined and joined[-1] == rows
    for step in joined:  # the restarted island agrees with the survivors from its first sync on
        assert c[step]["params_hash"] == a[step]["params_hash"] == b[step]["params_hash"], step
