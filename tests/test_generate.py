"""generate.py: KV-cache decoding against full forwards and transformers' ``generate``, top-p sampling, a run's
command line and its errors. fp32 random parameters (O(1) logits) so greedy token equality is a sharp check.

The transformers test is marked ``hf`` and skipped without the hf extra (torch + transformers).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest

from intellect_jax import generate as G
from intellect_jax import hf
from intellect_jax import model as M
from intellect_jax.checkpoint import CheckpointError, load_global_params
from intellect_jax.tokenizer import TokenizerError
from intellect_jax.trainer import train
from tests.helpers import tiny_config, tiny_model
from tests.test_hf import PARITY_CONFIGS, _hf_model, _train_tokenizer, random_params

GREEDY = G.SamplingConfig(max_new_tokens=12, temperature=0.0)
_apply = jax.jit(M.apply, static_argnums=0)


def _prompts(cfg, rows: int = 2, length: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (rows, length)).astype(np.int32)


def _full_forward_logits(cfg, params, seq_BL: np.ndarray) -> np.ndarray:
    graphdef, _, _ = M.abstract_params(cfg)
    return np.asarray(_apply(graphdef, params, seq_BL))


def _greedy_full_forward(cfg, params, prompt_BP: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding that re-runs the whole forward for every token (no cache)."""
    B, P = prompt_BP.shape
    seq = np.zeros((B, P + n), np.int32)  # one length for every step: causal, so the zeros after t are never seen
    seq[:, :P] = prompt_BP
    for t in range(P, P + n):
        seq[:, t] = _full_forward_logits(cfg, params, seq)[:, t - 1].argmax(-1)
    return seq[:, P:]


def _cut_at_eos(tokens_BN: np.ndarray, eos: int) -> np.ndarray:
    """What generation with EOS returns: each row up to its first EOS, then EOS; columns until every row ended."""
    ends = [np.flatnonzero(row == eos)[0] + 1 if (row == eos).any() else len(row) for row in tokens_BN]
    out = tokens_BN[:, :max(ends)].copy()
    for row, end in zip(out, ends):
        row[end:] = eos
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Greedy decoding.


@pytest.mark.parametrize("name", ["gqa2-tied-llama3-headdim32", "gqa4-tied-headdim24"])
def test_kv_cache_greedy_equals_full_forward(name):
    cfg = tiny_model(**PARITY_CONFIGS[name])
    params = random_params(cfg)
    prompt = _prompts(cfg)
    ours = G.generate(cfg, params, prompt, GREEDY, eos_id=None)
    reference = _greedy_full_forward(cfg, params, prompt, GREEDY.max_new_tokens)
    assert ours.shape == (2, 12) and ours.dtype == np.int32
    assert len(set(reference.ravel().tolist())) > 4, "degenerate continuation; the comparison would be weak"
    np.testing.assert_array_equal(ours, reference)

    # Stopping at EOS: a token row 0 emits mid-way; rows that finish first are padded with it.
    eos = int(reference[0, 4])
    expected = _cut_at_eos(reference, eos)
    assert expected.shape[1] < 12 or (expected != reference).any(), "EOS changed nothing; a weak test"
    np.testing.assert_array_equal(G.generate(cfg, params, prompt, GREEDY, eos_id=eos), expected)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gqa4-untied-llama3"])  # 3 layers, GQA, llama3 RoPE, a separate head
def test_greedy_matches_transformers_generate(name, tmp_path):
    pytest.importorskip("transformers")
    import torch

    cfg = tiny_model(**PARITY_CONFIGS[name])
    params = random_params(cfg)
    model = _hf_model(hf.export_hf(params, cfg, tmp_path / "out", dtype="float32"))
    prompt = _prompts(cfg, seed=2)

    def theirs(eos):
        with torch.no_grad():
            ids = torch.as_tensor(prompt, dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
        return out[:, prompt.shape[1]:].numpy()

    reference = theirs(None)
    np.testing.assert_array_equal(G.generate(cfg, params, prompt, GREEDY, eos_id=None), reference)
    eos = int(reference[1, 5])
    np.testing.assert_array_equal(G.generate(cfg, params, prompt, GREEDY, eos_id=eos), theirs(eos))


# ---------------------------------------------------------------------------------------------------------------------
# Sampling.


def test_top_p_keeps_the_nucleus_of_the_tempered_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits_BV = np.broadcast_to(np.log(probs), (4000, 4))
    key = jax.random.key(0)

    def draw(temperature, top_p):
        return np.asarray(G.sample_top_p(key, logits_BV, temperature, top_p))

    # Mass above each token: 0, .5, .8, .95 -> top_p .7 keeps {0, 1}, renormalised to .625 / .375.
    got = draw(1.0, 0.7)
    assert set(got.tolist()) == {0, 1}
    assert abs((got == 0).mean() - 0.625) < 0.03
    # Temperature first: at T = 2 the probabilities are ~ .38 .29 .21 .12, the mass above is 0 .38 .67 .88.
    assert set(draw(2.0, 0.7).tolist()) == {0, 1, 2}
    assert set(draw(1.0, 1.0).tolist()) == {0, 1, 2, 3}
    assert set(draw(1.0, 0.01).tolist()) == {0}
    np.testing.assert_array_equal(draw(1.0, 0.7), got)  # same key, same draws


def test_top_p_generation_is_reproducible_and_stays_in_the_nucleus():
    cfg = tiny_model(vocab_size=8)
    params = random_params(cfg, seed=3)
    prompt = _prompts(cfg, rows=4, length=3)
    top_p = 0.6
    sampling = G.SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=top_p, seed=5)
    new = G.generate(cfg, params, prompt, sampling, eos_id=None)
    np.testing.assert_array_equal(G.generate(cfg, params, prompt, sampling, eos_id=None), new)
    other = G.generate(cfg, params, prompt, G.SamplingConfig(24, 1.0, top_p, seed=6), eos_id=None)
    assert not np.array_equal(other, new)

    seq = np.concatenate([prompt, new], axis=1)
    logits = _full_forward_logits(cfg, params, seq)[:, prompt.shape[1] - 1:-1]  # the logits each token came from
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    above = np.empty_like(probs)
    np.put_along_axis(above, order, np.cumsum(sorted_probs, -1) - sorted_probs, -1)
    above_of_emitted = np.take_along_axis(above, new[..., None], -1)[..., 0]
    # 1e-4: the cached and the full forward round differently; a token that close to the edge could go either way.
    assert (above_of_emitted < top_p + 1e-4).all(), "a token outside the nucleus was sampled"
    nucleus_size = (above < top_p).sum(-1)
    assert (nucleus_size < cfg.vocab_size).all() and (nucleus_size > 1).mean() > 0.3, "a weak test: nucleus sizes"
    assert (new != logits.argmax(-1)).any(), "never left the argmax: not sampling"


# ---------------------------------------------------------------------------------------------------------------------
# A run directory and the command line.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two steps of a tiny run (synthetic data, so no tokenizer of its own) with a vocabulary a BPE fits into."""
    run = tmp_path_factory.mktemp("gen") / "run"
    train(tiny_config(model=dict(vocab_size=320), run=dict(steps=2, dir=str(run)),
                      checkpoint=dict(every_outer_steps=1)))
    return run


def _args(*argv: str) -> argparse.Namespace:
    return G.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(argv)


def test_cli_generates_from_a_run(run_dir, tmp_path, capsys):
    tok = _train_tokenizer(tmp_path)
    prompt = "hello world"
    assert G.cmd_generate(_args("--run-dir", str(run_dir), "--prompt", prompt, "--max-new-tokens", "6",
                                "--temperature", "0", "--tokenizer", str(tok)), []) == 0
    out, err = capsys.readouterr()
    run = G.load_run(run_dir, tokenizer_json=tok)
    text, new = G.generate_text(run, prompt, G.SamplingConfig(6, temperature=0.0))
    assert out == prompt + text + "\n" and 0 < len(new) <= 6
    assert f"step 2 of {run_dir}: {len(new)} new tokens (greedy)" in err
    assert run.step == 2 and run.eos_id == run.tokenizer.token_to_id("<|endoftext|>")
    _, saved, _ = load_global_params(run_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), saved)


def test_errors_name_the_problem_and_the_fix(run_dir, tmp_path):
    bad = [(dict(temperature=-1.0), r"--temperature=-1.0 must be a finite number >= 0 \(0 means greedy"),
           (dict(temperature=float("nan")), "--temperature=nan must be a finite number"),
           (dict(top_p=0.0), r"--top-p=0.0 must be in \(0, 1\]"),
           (dict(top_p=1.5), r"--top-p=1.5 must be in \(0, 1\]"),
           (dict(max_new_tokens=0), "--max-new-tokens=0 must be at least 1")]
    for fields, message in bad:
        with pytest.raises(G.GenerateError, match=message):
            G.SamplingConfig(**fields).validate()

    cfg = tiny_model()  # max_position_embeddings=128
    params = random_params(cfg)
    with pytest.raises(G.GenerateError, match=r"prompt \(120 tokens\) \+ --max-new-tokens=12 exceeds the model's "
                                              r"max_position_embeddings=128; lower --max-new-tokens to 8"):
        G.generate(cfg, params, _prompts(cfg, 1, 120), GREEDY, None)
    with pytest.raises(G.GenerateError, match="shorten the prompt to at most 127 tokens"):
        G.generate(cfg, params, _prompts(cfg, 1, 130), GREEDY, None)

    with pytest.raises(CheckpointError, match="no checkpoints in .*; train first or pass the right --run-dir"):
        G.load_run(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"checkpoint step 7\b.*\b2\b"):  # names the steps there are
        G.load_run(run_dir, step=7)
    with pytest.raises(TokenizerError, match="records no tokenizer.*data.kind='synthetic'.*pass --tokenizer"):
        G.load_run(run_dir)
    with pytest.raises(TokenizerError, match="does not exist"):
        G.load_run(run_dir, tokenizer_json=tmp_path / "missing.json")

    # The command raises them for cli.main, which prints the message (exit code 2); bad settings fail first.
    with pytest.raises(TokenizerError, match="records no tokenizer"):
        G.cmd_generate(_args("--run-dir", str(run_dir), "--prompt", "x"), [])
    with pytest.raises(G.GenerateError, match=r"--top-p=2.0 must be in \(0, 1\]"):
        G.cmd_generate(_args("--run-dir", str(tmp_path / "empty"), "--prompt", "x", "--top-p", "2"), [])
