"""The command line from the user's side: a fixable problem ends the command with one line naming it and the fix
(exit code 2, no traceback; --debug shows one), `config` prints a TOML that --config reads back, `train --help`
lists the config sections, and the local-islands launcher sums a run up."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from intellect_jax.checkpoint import Checkpointer
from intellect_jax.config import CheckpointConfig, load_config
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "INTELLECT_JAX_DEBUG")}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def _cli(*argv, **env):
    return subprocess.run([sys.executable, "-m", "intellect_jax", *map(str, argv)], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def _one_line(r, command, *words):
    """Exit code 2 and, as the last line of stderr, one error line holding `words`; no traceback."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"intellect-jax {command}: error: "), r.stderr[-3000:]
    for w in words:
        assert w in last, last
    return last


def test_errors_without_jax(tmp_path):
    """Commands that fail before jax is imported (about a second each)."""
    hf_dir, out = tmp_path / "hf", tmp_path / "out"
    hf_dir.mkdir()
    out.mkdir()
    (out / "keep.txt").write_text("x")

    r = _cli("export-hf", "--run-dir", tmp_path / "run", "--out", out)
    line = _one_line(r, "export-hf", str(out), "is not empty", "--overwrite")
    assert "overwrite=True" not in line and (out / "keep.txt").exists()

    run = tmp_path / "imported"
    r = _cli("import-hf", "--config", "configs/debug.toml", "--hf-dir", hf_dir, f"--run.dir={run}")
    _one_line(r, "import-hf", "has no config.json")
    assert not run.exists()  # nothing half-made

    r = _cli("plot", "--run-dir", tmp_path / "missing")
    _one_line(r, "plot", str(tmp_path / "missing"), "does not exist", "--run-dir")
    (tmp_path / "no_steps").mkdir()
    (tmp_path / "no_steps" / "metrics.jsonl").write_text('{"kind": "outer", "step": 3}\n')
    r = _cli("plot", "--run-dir", tmp_path / "no_steps")
    _one_line(r, "plot", "has no training steps yet", "first step")

    secret = tmp_path / "secret"
    r = _cli("secret", "--out", secret)
    assert r.returncode == 0 and "mode 0600" in r.stdout, r.stderr
    r = _cli("secret", "--out", secret)
    _one_line(r, "secret", "already exists")
    secret.chmod(0o640)
    r = _cli("coordinator", "--bind", "127.0.0.1:0", "--secret-file", secret)
    _one_line(r, "coordinator", "mode 0640", f"chmod 600 {secret}")

    key, islands = tmp_path / "c.key", tmp_path / "islands"
    r = _cli("keygen", "--out", key, "--name", "coordinator")
    assert r.returncode == 0 and r.stdout.startswith("coordinator ssh-ed25519 AAAA"), r.stderr
    line = r.stdout.strip()
    r = _cli("keygen", "--out", key)
    _one_line(r, "keygen", "already exists")
    islands.write_text(line.replace("coordinator", "alice", 1) + "\n")  # no coordinator line yet
    r = _cli("coordinator", "--bind", "127.0.0.1:0", "--key-file", key, "--islands-file", islands)
    _one_line(r, "coordinator", "has no 'coordinator' line")
    other = _cli("keygen", "--out", tmp_path / "other.key", "--name", "coordinator").stdout
    islands.write_text(other)
    r = _cli("coordinator", "--bind", "127.0.0.1:0", "--key-file", key, "--islands-file", islands)
    _one_line(r, "coordinator", "is not the one the islands file", "on the 'coordinator' line")
    r = _cli("coordinator", "--bind", "127.0.0.1:0", "--key-file", key)
    assert r.returncode == 2 and "config error: coordinator: elastic.islands_file is empty" in r.stderr, r.stderr

    r = _cli("train", "--config", "configs/debug.toml", "--run.profile_steps=9:3")
    assert r.returncode == 2 and "config error: run.profile_steps='9:3' must be" in r.stderr

    for debug in (dict(argv=["--debug"]), dict(env={"INTELLECT_JAX_DEBUG": "1"})):
        r = _cli("plot", "--run-dir", tmp_path / "missing", *debug.get("argv", []), **debug.get("env", {}))
        assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_errors_after_jax(tmp_path):
    """Checkpoint and data problems, in one process (jax starts once): export-hf without a checkpoint and of a
    missing step, a tokenizer larger than model.vocab_size, fewer documents than reading slots."""
    from intellect_jax.prepare_data import prepare

    run = tmp_path / "run"
    ckpt = Checkpointer(run, CheckpointConfig(async_save=False))
    for step in (3, 6):
        ckpt.save(step, {"train": {"x": jnp.zeros(2)}}, {"meta": {"step": step}, "config": tiny_config().to_dict()})
    ckpt.close()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 20)
    m = prepare([str(corpus / "*.txt")], tmp_path / "data", train_vocab_size=300, progress=False)
    assert m["documents"] == 3 and m["vocab_size"] > 256
    preset = tmp_path / "tiny.toml"
    preset.write_text(f"""
[model]
vocab_size = 512
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
[data]
kind = "prepared"
seq_len = 16
batch_size = 8
[[data.sources]]
path = "{tmp_path / 'data'}"
[run]
host_devices = 1
steps = 2
dir = "{tmp_path / 'train'}"
""")
    cases = [["export-hf", "--run-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o1")],
             ["export-hf", "--run-dir", str(run), "--out", str(tmp_path / "o2"), "--step", "5"],
             ["train", "--config", str(preset), "--model.vocab_size=128"],
             ["train", "--config", str(preset)]]
    script = ("import sys\nfrom intellect_jax.cli import main\n"
              f"for argv in {cases!r}:\n"
              "    print('rc', main(argv), file=sys.stderr, flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    chunks = r.stderr.split("rc 2\n")
    assert len(chunks) == len(cases) + 1 and chunks[-1] == "", r.stderr[-3000:]
    lines = [c.strip().splitlines()[-1] for c in chunks[:-1]]
    expect = [("export-hf", "no checkpoints in", "train first"),
              ("export-hf", "there is no checkpoint step 5", "its steps are 3, 6", "omit --step"),
              ("train", f"tokenizer has {m['vocab_size']} tokens but model.vocab_size=128",
               f"set model.vocab_size >= {m['vocab_size']}"),
              ("train", "has 3 documents, fewer than the 8 reading slots", "lower data.batch_size")]
    for line, (command, *words) in zip(lines, expect):
        assert line.startswith(f"intellect-jax {command}: error: "), line
        for w in words:
            assert w in line, line


def test_config_command_and_train_help(tmp_path):
    r = _cli("config", "--config", "configs/debug.toml", "--run.steps=30", "--data.batch_size=4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# intellect-jax config --config configs/debug.toml --run.steps=30")
    (tmp_path / "resolved.toml").write_text(r.stdout)
    want = load_config("configs/debug.toml", ["--run.steps=30", "--data.batch_size=4"])
    assert load_config(tmp_path / "resolved.toml") == want  # every key, round-tripped through TOML
    assert "[[data.sources]]" in r.stdout and "steps = 30" in r.stdout

    r = _cli("train", "--help")
    assert r.returncode == 0
    for section in ("model", "optim", "data", "diloco", "mesh", "elastic", "checkpoint", "run"):
        assert f"\n  {section} " in r.stdout, section
    assert "profile_steps" in r.stdout and "intellect-jax config --config FILE" in r.stdout


def test_local_islands_summary(tmp_path):
    spec = importlib.util.spec_from_file_location("local_islands", ROOT / "launch" / "local_islands.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)

    def write(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    inner = lambda step, loss: {"kind": "inner", "step": step, "loss": loss}
    outer = lambda k, h: {"kind": "outer", "outer_step": k, "step": 3 * k, "params_hash": h}
    write("island0", [inner(3, 4.0), outer(1, "aa"), inner(6, 3.5), outer(2, "bb")])
    write("island1", [inner(3, 4.1), outer(1, "aa"), inner(6, 3.25), outer(2, "bb")])
    dirs = [tmp_path / "island0", tmp_path / "island1"]
    assert launcher.summary(dirs) == ("final loss island0 3.5000, island1 3.2500; global-state hashes agreed at all "
                                      "2 outer steps")
    with open(tmp_path / "island1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(outer(2, "cc")) + "\n")
    assert launcher.summary(dirs).endswith("global-state hashes DIFFERED at outer steps [2]")
    assert launcher.summary([tmp_path / "island9"]) == "final loss island9 -; no outer steps logged"
