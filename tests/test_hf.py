"""Hugging Face export/import: logits parity with transformers' LlamaForCausalLM, lossless round trips, tokenizer and
text-generation pipeline, sharded and bf16 files, and clear errors on bad inputs.

Tests marked ``hf`` need the ``hf`` extra (torch + transformers) and are skipped without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open

from intellect_jax import hf
from intellect_jax import model as M
from tests.helpers import tiny_model

FP32 = dict(atol=1e-5, rtol=1e-5)

# Several shapes on purpose: D != F != V catches a transposed matrix, head_dim != D / H a reshape in the wrong order.
PARITY_CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=96, intermediate_size=96),
    "gqa2-tied-llama3-headdim32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       tie_word_embeddings=True, rope_scaling="llama3",
                                       rope_original_max_position_embeddings=16, vocab_size=80),
    "gqa4-untied-llama3": dict(num_attention_heads=8, num_key_value_heads=2, rope_scaling="llama3", rope_factor=4.0,
                               rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                               rope_original_max_position_embeddings=32, num_hidden_layers=3, rms_norm_eps=1e-6),
    "gqa4-tied-headdim24": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                                intermediate_size=72, rope_theta=500000.0),
}


def random_params(cfg, seed: int = 0) -> dict:
    """Every parameter random (norm weights too), scaled so logits are O(1) and a 1e-5 tolerance means something."""
    _, shapes, _ = M.abstract_params(cfg)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "layernorm" in name or name == "['norm']":
            return (1.0 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
        # 0.15 for the embedding too: tied, it is the head, and std 1 pushes logits to ~40, where fp32 rounding
        # alone moves either implementation 2-3e-5 away from the same model run in fp64.
        return (0.15 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def our_logits(cfg, params, tokens) -> np.ndarray:
    graphdef, _, _ = M.abstract_params(cfg)
    return np.asarray(_jit_apply(graphdef, params, np.asarray(tokens, np.int32)))


_jit_apply = jax.jit(M.apply, static_argnums=0)


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# No torch needed.


def test_layer_table_covers_the_model():
    assert set(hf._LAYER_TENSORS) == set(M.LAYER_NAMES)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_state_dict_round_trip_is_exact(name):
    cfg = tiny_model(**PARITY_CONFIGS[name])
    params = random_params(cfg)
    sd = hf.to_hf_state_dict(params, cfg)
    h, k, dh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim, cfg.hidden_size
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (h * dh, d)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (k * dh, d)
    assert sd["model.layers.1.self_attn.o_proj.weight"].shape == (d, h * dh)
    assert sd["model.layers.1.mlp.down_proj.weight"].shape == (d, cfg.intermediate_size)
    assert ("lm_head.weight" in sd) == (not cfg.tie_word_embeddings)
    # Head 1 of layer 0's q_proj is rows [dh, 2 dh) of the HF matrix: a wrong reshape order would mix heads.
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.q_proj.weight"][dh:2 * dh],
                                  params["layers"]["q_proj"][0][:, 1, :].T)
    back = hf.from_hf_state_dict(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_config_round_trip(name):
    base = tiny_model(compute_dtype="bfloat16", remat="dots", attention_impl="xla", scan_layers=False)
    cfg = tiny_model(**PARITY_CONFIGS[name], compute_dtype="bfloat16", remat="dots", attention_impl="xla",
                     scan_layers=False)
    hf_cfg = json.loads(json.dumps(hf.hf_config_dict(cfg, eos_token_id=0, bos_token_id=0)))
    assert hf.model_config_from_hf(hf_cfg, base) == cfg
    # transformers 5 writes only rope_parameters (with rope_theta inside); read that spelling too.
    v5 = {k: v for k, v in hf_cfg.items() if k not in ("rope_scaling", "rope_theta")}
    assert hf.model_config_from_hf(v5, base) == cfg


def test_export_refuses_non_empty_dir_and_a_crash_keeps_the_previous_export(tmp_path, monkeypatch):
    cfg = tiny_model()
    params = random_params(cfg)
    out = hf.export_hf(params, cfg, tmp_path / "out", dtype="float32")
    before = read_safetensors(out)
    with pytest.raises(hf.HFError, match="not empty"):
        hf.export_hf(params, cfg, out)

    calls = []
    real_save = hf.save_file

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata)

    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf.export_hf(random_params(cfg, seed=1), cfg, out, overwrite=True, max_shard_bytes=20_000)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a partial export was left behind"
    after = read_safetensors(out)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)

    monkeypatch.setattr(hf, "save_file", real_save)
    new_params = random_params(cfg, seed=1)
    hf.export_hf(new_params, cfg, out, dtype="float32", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    jax.tree.map(np.testing.assert_array_equal, hf.load_hf(out, base=cfg)[0], new_params)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_load_as_rounded_fp32(dtype, tmp_path):
    cfg = tiny_model(tie_word_embeddings=True)
    params = random_params(cfg)
    out = hf.export_hf(params, cfg, tmp_path / "out", dtype=dtype)
    back, cfg2 = hf.load_hf(out, base=cfg)
    assert cfg2 == cfg
    rounded = jax.tree.map(lambda x: x.astype(hf.DTYPES[dtype]).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, back, rounded)


def test_tied_checkpoint_listing_lm_head():
    cfg = tiny_model(tie_word_embeddings=True)
    params = random_params(cfg)
    sd = hf.to_hf_state_dict(params, cfg)
    same = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"].copy()})
    jax.tree.map(np.testing.assert_array_equal, hf.from_hf_state_dict(same, cfg), params)
    other = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"] + 1.0})
    with pytest.raises(hf.HFError, match="lm_head.weight differs from model.embed_tokens.weight"):
        hf.from_hf_state_dict(other, cfg)


def test_import_errors_name_the_problem(tmp_path):
    cfg = tiny_model()
    params = random_params(cfg)
    sd = hf.to_hf_state_dict(params, cfg)

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(hf.HFError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf.from_hf_state_dict(missing, cfg)

    wrong = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(hf.HFError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\), "
                                         r"expected \(32, 64\)"):
        hf.from_hf_state_dict(wrong, cfg)

    extra = dict(sd, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(hf.HFError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        hf.from_hf_state_dict(extra, cfg)

    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 128, "n_embd": 64}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(hf.HFError, match=r"model_type='gpt2'.*only Llama"):
        hf.load_hf(tmp_path)

    yarn = hf.hf_config_dict(cfg, eos_token_id=None, bos_token_id=None)
    yarn["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(hf.HFError, match="RoPE type 'yarn'"):
        hf.model_config_from_hf(yarn)

    out = hf.export_hf(params, cfg, tmp_path / "ok", dtype="float32")
    (out / "model.safetensors").unlink()
    with pytest.raises(hf.HFError, match="neither model.safetensors"):
        hf.load_hf(out)

    with pytest.raises(hf.HFError, match=r"params\['layers'\]\['q_proj'\] has shape"):
        hf.to_hf_state_dict(params, tiny_model(num_attention_heads=8))


def test_tokenizer_without_eos_is_refused(tmp_path):
    tok_path = _train_tokenizer(tmp_path, special="<|pad|>")
    cfg = tiny_model(vocab_size=320)
    with pytest.raises(hf.HFError, match=r"no end-of-text special token.*\['<\|pad\|>'\].*eos_token="):
        hf.export_hf(random_params(cfg), cfg, tmp_path / "out", tokenizer_json=tok_path)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Against transformers.


def _transformers():
    return pytest.importorskip("transformers")


def _hf_model(path, dtype="float32"):
    transformers = _transformers()
    import torch

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # `torch_dtype` is deprecated from 4.56 on
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                              **{key: getattr(torch, dtype)})
    return model.eval()


def _hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg = tiny_model(**PARITY_CONFIGS[name])
    params = random_params(cfg)
    out = hf.export_hf(params, cfg, tmp_path / "out", dtype="float32")
    model = _hf_model(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32))
    ours, theirs = our_logits(cfg, params, tokens), _hf_logits(model, tokens)
    assert np.abs(ours).max() > 1.0, "logits too small for the tolerance to mean anything"
    print(f"{name}: max |ours - HF| = {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, **FP32)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gqa4-tied-headdim24", "gqa4-untied-llama3"])
def test_rope_frequencies_match_transformers_bitwise(name):
    transformers = _transformers()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = tiny_model(**PARITY_CONFIGS[name])
    config = transformers.LlamaConfig.from_dict(hf.hf_config_dict(cfg, eos_token_id=None, bos_token_id=None))
    theirs = LlamaRotaryEmbedding(config).inv_freq.numpy()
    np.testing.assert_array_equal(np.asarray(M.rope_inv_freq(cfg)), theirs)


@pytest.mark.hf
@pytest.mark.parametrize("tie", [False, True])
def test_hf_import_export_reproduces_tensors(tie, tmp_path):
    transformers = _transformers()
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=72, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=50000.0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # norms included, so a swapped norm would show
            p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "src")

    params, cfg = hf.load_hf(tmp_path / "src")
    assert cfg.resolved_head_dim == 16 and cfg.rope_scaling == "llama3" and cfg.tie_word_embeddings == tie
    out = hf.export_hf(params, cfg, tmp_path / "out", dtype="float32")
    src, dst = read_safetensors(tmp_path / "src"), read_safetensors(out)
    src = {k: v for k, v in src.items() if not (tie and k == "lm_head.weight")}
    assert sorted(dst) == sorted(src)
    for k in src:
        assert dst[k].dtype == np.float32 and np.array_equal(dst[k].view(np.uint32), src[k].view(np.uint32)), k

    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 24))
    np.testing.assert_allclose(our_logits(cfg, params, tokens), _hf_logits(model.eval(), tokens), **FP32)


@pytest.mark.hf
def test_sharded_export_loads(tmp_path):
    cfg = tiny_model(num_hidden_layers=3)
    params = random_params(cfg)
    out = hf.export_hf(params, cfg, tmp_path / "out", dtype="float32", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in read_safetensors(out).values())

    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16))
    np.testing.assert_allclose(our_logits(cfg, params, tokens), _hf_logits(_hf_model(out), tokens), **FP32)
    back, cfg2 = hf.load_hf(out, base=cfg)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.hf
def test_bf16_export(tmp_path):
    import ml_dtypes

    cfg = tiny_model(num_key_value_heads=1, tie_word_embeddings=True)
    params = random_params(cfg)
    out = hf.export_hf(params, cfg, tmp_path / "out")  # bfloat16 is the default
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in read_safetensors(out).values())

    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 24))
    theirs = _hf_logits(_hf_model(out), tokens)  # bf16 weights, fp32 compute
    rounded, _ = hf.load_hf(out, base=cfg)
    # The same bf16-rounded weights in fp32 on both sides: exact parity again.
    np.testing.assert_allclose(our_logits(cfg, rounded, tokens), theirs, **FP32)
    # Against the fp32 master weights: only the bf16 rounding of the weights (about 2^-9 relative) remains.
    ours = our_logits(cfg, params, tokens)
    print(f"bf16 export: max |ours fp32 - HF bf16 weights| = {np.abs(ours - theirs).max():.2e}, "
          f"max |logit| = {np.abs(ours).max():.2f}")
    # That rounding, weight by weight: each exported weight is its fp32 master rounded to the nearest bf16 (ties to
    # even), so within half a bf16 ulp: |w - bf16(w)| <= 2^-8 |w| (8 significant bits). With the exact parity above
    # this pins the difference of the logits to the rounding of the weights alone.
    leaves, rleaves = jax.tree.leaves(params), jax.tree.leaves(rounded)
    assert len(leaves) == len(rleaves)
    for w, r in zip(leaves, rleaves):
        w, r = np.asarray(w, np.float32), np.asarray(r, np.float32)
        assert r.tobytes() == w.astype(ml_dtypes.bfloat16).astype(np.float32).tobytes()
        assert np.all(np.abs(r - w) <= 2.0**-8 * np.abs(w))
    # Exporting the loaded bf16 weights again reproduces the files bit for bit.
    again = hf.export_hf(rounded, cfg, tmp_path / "again")
    a, b = read_safetensors(out), read_safetensors(again)
    assert all(np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


def _train_tokenizer(tmp_path: Path, special: str = "<|endoftext|>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer",
             "a tiny byte-level BPE for a tiny Llama", "the end of the text is near"] * 4
    tok.train_from_iterator(texts, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.hf
def test_tokenizer_and_text_generation_pipeline(tmp_path):
    transformers = _transformers()
    tok_path = _train_tokenizer(tmp_path)
    cfg = tiny_model(vocab_size=320)
    params = random_params(cfg)
    out = hf.export_hf(params, cfg, tmp_path / "out", dtype="float32", tokenizer_json=tok_path)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == eos_id
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eos_id

    prompt, new = "hello world", 6
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    result = pipe(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0]["generated_text"]

    # Our own greedy continuation, decoded by the same tokenizer, must be what the pipeline generated.
    ids = tokenizer(prompt)["input_ids"]
    seq = np.zeros((1, len(ids) + new), np.int32)
    seq[0, :len(ids)] = ids
    for t in range(len(ids), len(ids) + new):  # fixed length: causal, so the padding after t is never seen
        logits = our_logits(cfg, params, seq)[0, t - 1].copy()
        logits[eos_id] = -np.inf  # min_new_tokens keeps the pipeline from stopping at EOS
        seq[0, t] = logits.argmax()
    expected = tokenizer.decode(seq[0].tolist())
    print(f"pipeline: {result!r}")
    assert result == expected and len(result) > len(prompt)


@pytest.mark.hf
def test_demo_run_export_generates_and_imports_back(tmp_path):
    """The CPU demo's path end to end: train (stdlib corpus) -> export-hf -> transformers pipeline -> import-hf."""
    transformers = _transformers()
    import subprocess
    import sys

    from intellect_jax.checkpoint import load_global_params

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    run, out = tmp_path / "run", tmp_path / "hf"
    short = ["--run.steps=4", "--diloco.inner_steps=2", "--data.batch_size=2", "--data.seq_len=64"]

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "intellect_jax", *args], cwd=root, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    cli("train", "--config", "configs/debug.toml", *short, f"--run.dir={run}")
    cli("export-hf", "--run-dir", str(run), "--out", str(out), "--dtype", "float32")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    pipe = transformers.pipeline("text-generation", model=str(out))
    text = pipe("def main(", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main(") and len(text) > len("def main(")
    # import-hf starts a new run from the exported weights, bit-exactly (fp32 export)
    _, exported, _ = load_global_params(run)
    run2 = tmp_path / "run2"
    cli("import-hf", "--config", "configs/debug.toml", "--hf-dir", str(out), *short, f"--run.dir={run2}")
    _, imported, step = load_global_params(run2)
    assert step == 0
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(a, b)
    r = cli("train", "--config", "configs/debug.toml", *short[1:], "--run.steps=2", f"--run.dir={run2}")
    assert "resumed from checkpoint step 0" in r.stderr
