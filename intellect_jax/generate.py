"""`intellect-jax generate`: sample text from a run's checkpoint with a key/value cache, on one device.

A prefill pass over the prompt fills a cache of ``prompt + max_new_tokens`` slots (:meth:`model.Llama.extend`); a
``lax.while_loop`` then decodes one token per iteration from that cache. Prefill and loop are one jit: it compiles
once per (prompt length, max_new_tokens, greedy or not), never per token. Temperature 0 is greedy (argmax);
otherwise the logits are divided by the temperature and sampled from the nucleus, the smallest set of most likely
tokens whose probability reaches ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
Generation stops when every row has emitted EOS.

The prompt is preceded by the EOS token, as every training document is (data.py packs ``EOS doc EOS doc ...``).

jax is imported inside functions, as in cli.py: the CLI builds its parser (:func:`add_parser`) before it has chosen
jax's platform.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from intellect_jax import tokenizer as toklib
from intellect_jax.config import Config, ConfigError, ModelConfig


class GenerateError(ConfigError):
    """A generation request that cannot be served (sampling settings, prompt length); the message says the fix."""


@dataclass(frozen=True)
class SamplingConfig:
    # Defaults of Meta's Llama 3 text-completion example.
    max_new_tokens: int = 128
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens={self.max_new_tokens} must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerateError(f"--temperature={self.temperature} must be a finite number >= 0 (0 means greedy "
                                "decoding; 0.6-1.0 are usual for sampling)")
        if not (0 < self.top_p <= 1):
            raise GenerateError(f"--top-p={self.top_p} must be in (0, 1]: the probability mass of the most likely "
                                "tokens to sample from (1 samples from the whole vocabulary)")


# ---------------------------------------------------------------------------------------------------------------------
# Token-level generation.


def sample_top_p(key, logits_BV, temperature, top_p):
    """One token per row from softmax(logits / temperature) restricted to its top-p nucleus.

    A token is in the nucleus when the probability of the tokens ranked above it is below ``top_p`` (so the most
    likely token always is), as in transformers' ``TopPLogitsWarper``.
    """
    import jax
    import jax.numpy as jnp

    logits_BV = logits_BV.astype(jnp.float32) / temperature
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (above_BV < top_p) | (top_p >= 1.0)  # at top_p = 1 rounding must not drop the tail
    choice_B = jax.random.categorical(key, jnp.where(keep_BV, sorted_BV, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order_BV, choice_B[:, None], axis=-1)[:, 0]


def _generate_impl(params, prompt_BP, key, temperature, top_p, *, cfg: ModelConfig, max_new_tokens: int,
                   greedy: bool, eos_id: int):
    import jax
    import jax.numpy as jnp

    from intellect_jax import model as M

    B, P = prompt_BP.shape
    graphdef, _, _ = M.abstract_params(cfg)

    def pick(logits_BV, key):
        if greedy:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        return sample_top_p(key, logits_BV, temperature, top_p).astype(jnp.int32)

    logits_BPV, cache = M.apply_cached(graphdef, params, prompt_BP, M.init_cache(cfg, B, P + max_new_tokens), 0)
    key, sub = jax.random.split(key)
    first_B = pick(logits_BPV[:, -1], sub)
    out_BN = jnp.full((B, max_new_tokens), max(eos_id, 0), jnp.int32)

    def cond(state):
        i, _, done_B, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        i, tok_B, done_B, cache, key, out_BN = state
        tok_B = jnp.where(done_B, eos_id, tok_B)  # finished rows are padded with EOS
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, tok_B[:, None], i, axis=1)
        done_B = done_B | (tok_B == eos_id)
        # After the last token this forward is wasted; skipping it (lax.cond) is not worth a second code path.
        logits_B1V, cache = M.apply_cached(graphdef, params, tok_B[:, None], cache, P + i)
        key, sub = jax.random.split(key)
        return i + 1, pick(logits_B1V[:, 0], sub), done_B, cache, key, out_BN

    state = (jnp.int32(0), first_B, jnp.zeros((B,), jnp.bool_), cache, key, out_BN)
    n, *_, out_BN = jax.lax.while_loop(cond, body, state)
    return out_BN, n


@functools.cache
def _jitted():
    import jax

    return jax.jit(_generate_impl, static_argnames=("cfg", "max_new_tokens", "greedy", "eos_id"))


def generate(cfg: ModelConfig, params: Any, prompt_BP: np.ndarray, sampling: SamplingConfig,
             eos_id: int | None) -> np.ndarray:
    """Continues each row of ``prompt_BP`` (token ids, equal lengths) on the default device.

    Returns the new tokens, ``[B, n]`` int32 with ``n <= max_new_tokens``: fewer when every row emitted ``eos_id``
    (rows that ended early are padded with it). ``eos_id=None`` always generates ``max_new_tokens``.
    """
    import jax
    import jax.numpy as jnp

    sampling.validate()
    prompt_BP = np.asarray(prompt_BP, np.int32)
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0:
        raise GenerateError(f"the prompt must be token ids of shape [batch, length >= 1], got {prompt_BP.shape}")
    if prompt_BP.min() < 0 or prompt_BP.max() >= cfg.vocab_size:
        raise GenerateError(f"prompt token ids must lie in [0, {cfg.vocab_size}); the tokenizer does not match "
                            "the model's vocabulary")
    P, limit = prompt_BP.shape[1], cfg.max_position_embeddings
    if P + sampling.max_new_tokens > limit:
        fix = (f"lower --max-new-tokens to {limit - P} or shorten the prompt" if P < limit
               else f"shorten the prompt to at most {limit - 1} tokens")
        raise GenerateError(f"prompt ({P} tokens) + --max-new-tokens={sampling.max_new_tokens} exceeds the model's "
                            f"max_position_embeddings={limit}; {fix}")
    out_BN, n = _jitted()(params, jnp.asarray(prompt_BP), jax.random.key(sampling.seed),
                          jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                          cfg=cfg, max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy,
                          eos_id=-1 if eos_id is None else int(eos_id))
    return np.asarray(out_BN)[:, :int(n)]


# ---------------------------------------------------------------------------------------------------------------------
# A run directory: checkpoint, tokenizer, EOS.


@dataclass(frozen=True)
class LoadedRun:
    cfg: Config
    params: Any  # global params on one device
    step: int
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int


def load_run(run_dir: str | Path, step: int | None = None, tokenizer_json: str | Path | None = None) -> LoadedRun:
    """The config and global params of a run's latest (or ``step``) checkpoint, with the tokenizer it trained with.

    The tokenizer is ``tokenizer_json`` if given, else the one export-hf would copy (``data.tokenizer``, or the
    tokenizer.json beside the prepared data). Raises CheckpointError (no such checkpoint) or TokenizerError.
    """
    import jax

    from intellect_jax import data
    from intellect_jax.checkpoint import load_global_params
    from intellect_jax.config import from_dict

    config, params, step = load_global_params(run_dir, step)
    cfg = from_dict(config)
    path = Path(tokenizer_json).expanduser() if tokenizer_json else data.tokenizer_path(cfg.data)
    if path is None:
        raise toklib.TokenizerError(
            f"the run in {str(run_dir)!r} records no tokenizer (data.kind={cfg.data.kind!r}, data.tokenizer is empty "
            "and no prepared source holds a tokenizer.json); pass --tokenizer PATH/tokenizer.json")
    tok = toklib.load(path)
    if tok.get_vocab_size(with_added_tokens=True) > cfg.model.vocab_size:
        raise toklib.TokenizerError(
            f"tokenizer {str(path)!r} has {tok.get_vocab_size(with_added_tokens=True)} tokens but the model's "
            f"vocab_size is {cfg.model.vocab_size}; use the tokenizer the run was trained with")
    eos = None if tokenizer_json else _manifest_eos(cfg)
    eos = toklib.eos_id(tok)[1] if eos is None else eos
    return LoadedRun(cfg, jax.device_put(params, jax.devices()[0]), step, tok, eos)


def _manifest_eos(cfg: Config) -> int | None:
    """The EOS id the prepared data recorded (what training packed documents with), if any."""
    from intellect_jax.shards import MANIFEST, read_manifest

    if cfg.data.kind != "prepared":
        return None
    for s in cfg.data.sources:
        d = Path(s.path).expanduser()
        if s.weight > 0 and (d / MANIFEST).is_file():
            return read_manifest(d).eos_id
    return None


def generate_text(run: LoadedRun, prompt: str, sampling: SamplingConfig) -> tuple[str, np.ndarray]:
    """(completion text, its token ids without EOS) for one prompt."""
    ids = [run.eos_id] + run.tokenizer.encode(prompt, add_special_tokens=False).ids
    new = generate(run.cfg.model, run.params, np.asarray([ids], np.int32), sampling, run.eos_id)[0]
    stop = np.flatnonzero(new == run.eos_id)
    new = new[:stop[0]] if stop.size else new
    return run.tokenizer.decode(new.tolist(), skip_special_tokens=False), new


# ---------------------------------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="sample text from a run's checkpoint (KV cache, one device)")
    d = SamplingConfig()
    p.add_argument("--run-dir", required=True, help="run directory with checkpoints")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="at most this many new tokens")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy; else the sampling "
                   f"temperature (default {d.temperature})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus mass to sample from (default {d.top_p})")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--seed", type=int, default=d.seed, help="PRNG seed of the sampler")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one the run trained with)")
    p.set_defaults(func=cmd_generate, takes_overrides=False)
    return p


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Prints the prompt and its continuation to stdout, the checkpoint, stop reason and time to stderr.

    Raises GenerateError, CheckpointError or TokenizerError (cli.main prints their message, exit code 2).
    """
    del overrides
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.validate()  # before the (slow) checkpoint read
    run = load_run(args.run_dir, args.step, args.tokenizer)
    t0 = time.perf_counter()
    text, new = generate_text(run, args.prompt, sampling)
    elapsed = time.perf_counter() - t0
    print(args.prompt + text)
    how = "greedy" if sampling.greedy else f"temperature {sampling.temperature}, top-p {sampling.top_p}"
    end = "EOS" if len(new) < sampling.max_new_tokens else f"--max-new-tokens={sampling.max_new_tokens}"
    print(f"step {run.step} of {args.run_dir}: {len(new)} new tokens ({how}), stopped at {end}, {elapsed:.1f} s "
          "including compilation", file=sys.stderr)
    return 0
