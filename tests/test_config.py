import glob
import subprocess
import sys

import pytest

from intellect_jax.config import ConfigError, load_config

PRESETS = sorted(glob.glob("configs/*.toml"))


def test_presets_exist():
    names = {p.split("/")[-1] for p in PRESETS}
    assert {"debug.toml", "150m.toml", "1b.toml", "intellect1-10b.toml", "intellect1-10b-cooldown.toml"} <= names


@pytest.mark.parametrize("path", PRESETS)
def test_every_preset_parses_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0


def test_intellect1_preset_matches_reference():
    cfg = load_config("configs/intellect1-10b.toml")
    m, o, d = cfg.model, cfg.optim, cfg.diloco
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads) == (4096, 42, 32, 8)
    assert (m.intermediate_size, m.vocab_size, m.rope_theta, m.rms_norm_eps) == (14336, 128256, 500000.0, 1e-5)
    assert not m.tie_word_embeddings
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.grad_clip) == (7.5e-5, 0.9, 0.95, 0.1, 1.0)
    assert (o.warmup_steps, o.decay_start, o.total_steps, o.z_loss_weight) == (1000, 74700, 90400, 2e-4)
    assert (cfg.data.seq_len, cfg.data.batch_size) == (8192, 128)
    assert [s.weight for s in cfg.data.sources] == [55, 10, 20, 10, 5]
    assert (d.inner_steps, d.outer_lr, d.outer_momentum, d.outer_optimizer) == (100, 0.7, 0.9, "nesterov")


def test_overrides_apply_with_types():
    cfg = load_config("configs/debug.toml", ["--run.steps=7", "--optim.learning_rate=1e-3", "--model.remat=full",
                                             "--run.name=x"])
    assert cfg.run.steps == 7 and cfg.optim.learning_rate == 1e-3 and cfg.model.remat == "full"
    assert cfg.run.name == "x"


@pytest.mark.parametrize("override, words", [
    ("--model.hiden_size=64", ["model.hiden_size", "hidden_size"]),
    ("--nosuch.key=1", ["nosuch", "known keys"]),
    ("--run.steps=abc", ["run.steps", "int"]),
    ("--model.num_attention_heads=5", ["num_attention_heads", "divide"]),
    ("--model.num_key_value_heads=3", ["num_key_value_heads", "divide"]),
    ("--optim.schedule=linear", ["optim.schedule", "wsd_sqrt"]),
    ("--run.steps", ["no value", "--section.key=value"]),
    ("--steps=3", ["names no section"]),
    ("--data.seq_len=100000", ["data.seq_len", "max_position_embeddings"]),
    ("--mesh.fsdp=-1", []),  # fine on its own
])
def test_bad_override_names_key_and_fix(override, words):
    if not words:
        load_config("configs/debug.toml", [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.toml", [override])
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("--elastic.coordinator_timeout_s=0", ["elastic.coordinator_timeout_s=0.0", "> 0"]),
    ("--elastic.barrier_timeout_s=-1", ["elastic.barrier_timeout_s=-1.0", "> 0"]),
    ("--elastic.min_islands=0", ["elastic.min_islands=0", "> 0"]),
    ("--elastic.coordinator_max_frame_bytes=0", ["elastic.coordinator_max_frame_bytes=0", "> 0"]),
    ("--elastic.peer_max_frame_bytes=0", ["elastic.peer_max_frame_bytes=0", "> 0"]),
    ("--elastic.probe_bytes=-1", ["elastic.probe_bytes=-1", ">= 0"]),
    ("--elastic.serve_bytes_per_s=-5", ["elastic.serve_bytes_per_s=-5.0", ">= 0"]),
    ("--elastic.recovery_grace_s=-1", ["elastic.recovery_grace_s=-1.0", ">= 0"]),
    ("--elastic.dead_after_s=1", ["elastic.dead_after_s=1.0", "elastic.heartbeat_s"]),
    ("--elastic.probe_bytes=268435456", ["elastic.probe_bytes", "raise elastic.peer_max_frame_bytes"]),
    ("--elastic.chunk_bytes=268435456", ["elastic.chunk_bytes", "elastic.peer_max_frame_bytes", "lower the chunk"]),
    ("--elastic.max_frame_bytes=1", ["elastic.max_frame_bytes", "peer_max_frame_bytes"]),  # renamed key
    ("--elastic.device_codes=maybe", ["elastic.device_codes='maybe'", '"auto"', '"on"', '"off"']),
    ("--elastic.streams=17", ["elastic.streams=17", "0 (automatic", "1..16"]),
    ("--elastic.link_mbit=0", ["elastic.link_mbit=0.0", "> 0"]),
])
def test_bad_elastic_values_name_key_and_fix(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_ring_frame_limit_counts_int8_scales():
    # A 4 MiB int8 chunk carries 4 MiB / 256 fp32 scales (64 KiB), plus the 64 KiB header allowance.
    fits = (4 << 20) + (64 << 10) + (64 << 10)
    load_config(None, [f"--elastic.peer_max_frame_bytes={fits}"])
    with pytest.raises(ConfigError, match="elastic.chunk_bytes=4194304 makes ring frames of up to"):
        load_config(None, [f"--elastic.peer_max_frame_bytes={fits - 1}"])
    with pytest.raises(ConfigError, match="elastic.chunk_bytes"):  # block 64: four times the scales
        load_config(None, ["--diloco.block_size=64", f"--elastic.peer_max_frame_bytes={fits}"])


def test_mesh_must_match_device_count():
    cfg = load_config("configs/debug.toml", ["--mesh.islands=3"])
    with pytest.raises(ConfigError, match="needs 6 devices but 8 are present"):
        cfg.mesh.resolve(8)
    assert load_config(None, ["--mesh.tensor=2"]).mesh.resolve(8) == {"islands": 1, "data": 1, "fsdp": 4,
                                                                      "tensor": 2}


def test_cli_reports_bad_override_cleanly():
    r = subprocess.run([sys.executable, "-m", "intellect_jax", "train", "--config", "configs/debug.toml",
                        "--model.hidden_sise=3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'model.hidden_sise'" in r.stderr and "hidden_size" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_info_10b_without_allocation():
    r = subprocess.run([sys.executable, "-m", "intellect_jax", "info", "--config", "configs/intellect1-10b.toml",
                        "--devices", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("parameters"))
    n = int(line.split()[1].replace(",", ""))
    assert abs(n - 10.2e9) / 10.2e9 < 0.01
    assert "FLOPs per token" in r.stdout and "total per device" in r.stdout
