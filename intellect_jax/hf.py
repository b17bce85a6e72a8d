"""Hugging Face ``LlamaForCausalLM`` export and import: safetensors + config.json, numpy only (no torch).

Our model uses transformers' Llama maths and RoPE layout (rotate-half), so converting is a rename plus a
reshape/transpose per tensor, never a permutation. Every matrix of ours is stored as ``[*in_dims, *out_dims]``
(``q_proj`` ``[D, H, Dh]``, ``o_proj`` ``[H, Dh, D]``, ``lm_head`` ``[D, V]``, ...) while HF stores ``nn.Linear``
weights as ``[prod(out_dims), prod(in_dims)]``; one rule (:func:`_to_hf` / :func:`_from_hf`) covers them all.
Decoder layers are stacked on a leading ``[N]`` axis here and numbered ``model.layers.{i}`` there.

The exported directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and, when a tokenizer.json
is given, ``AutoTokenizer.from_pretrained`` and ``pipeline("text-generation")``, with no custom code. config.json
carries both the legacy keys (``rope_theta``, ``rope_scaling``, ``torch_dtype``, read by transformers 4.x) and the
transformers 5 keys (``rope_parameters``, ``dtype``) with the same values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from intellect_jax.config import ModelConfig

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_FLOAT_DTYPES = (*DTYPES.values(), np.dtype(np.float64))

# Special tokens that end (or begin) a document, in order of preference, as spelled by common tokenizers.
EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>")

# Our per-layer parameter name -> HF name under model.layers.{i}, and how many leading dims of our (per-layer)
# tensor are the matmul's input dims (None: a vector, stored as is).
_LAYER_TENSORS = {
    "input_layernorm": ("input_layernorm.weight", None),
    "q_proj": ("self_attn.q_proj.weight", 1),
    "k_proj": ("self_attn.k_proj.weight", 1),
    "v_proj": ("self_attn.v_proj.weight", 1),
    "o_proj": ("self_attn.o_proj.weight", 2),
    "post_attention_layernorm": ("post_attention_layernorm.weight", None),
    "gate_proj": ("mlp.gate_proj.weight", 1),
    "up_proj": ("mlp.up_proj.weight", 1),
    "down_proj": ("mlp.down_proj.weight", 1),
}
# Buffers that old transformers versions saved with the weights; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFError(ValueError):
    """A Hugging Face export/import problem; the message names the tensor, key or file and the fix."""


@dataclass(frozen=True)
class _Tensor:
    hf_name: str
    key: str  # top-level key of our params, or the per-layer name under params["layers"]
    layer: int | None  # None: a top-level parameter
    shape: tuple[int, ...]  # ours (one layer's slice for per-layer tensors)
    n_in: int | None  # leading input dims of a matrix; None for vectors and the embedding table

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return self.shape
        return math.prod(self.shape[self.n_in:]), math.prod(self.shape[:self.n_in])


def _layout(cfg: ModelConfig) -> list[_Tensor]:
    """Every HF tensor of the model, in checkpoint order."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    shapes = {"input_layernorm": (d,), "q_proj": (d, h, dh), "k_proj": (d, k, dh), "v_proj": (d, k, dh),
              "o_proj": (h, dh, d), "post_attention_layernorm": (d,), "gate_proj": (d, f), "up_proj": (d, f),
              "down_proj": (f, d)}
    out = [_Tensor("model.embed_tokens.weight", "embed_tokens", None, (v, d), None)]
    for i in range(cfg.num_hidden_layers):
        for name, (hf_suffix, n_in) in _LAYER_TENSORS.items():
            out.append(_Tensor(f"model.layers.{i}.{hf_suffix}", name, i, shapes[name], n_in))
    out.append(_Tensor("model.norm.weight", "norm", None, (d,), None))
    if not cfg.tie_word_embeddings:
        out.append(_Tensor("lm_head.weight", "lm_head", None, (d, v), 1))
    return out


def _to_hf(x: np.ndarray, t: _Tensor) -> np.ndarray:
    if t.n_in is not None:
        x = x.reshape(t.hf_shape[1], t.hf_shape[0]).T
    return np.ascontiguousarray(x)  # safetensors writes the raw buffer: it must be C-contiguous


def _from_hf(x: np.ndarray, t: _Tensor) -> np.ndarray:
    return x if t.n_in is None else x.T.reshape(t.shape)


# ---------------------------------------------------------------------------------------------------------------------
# State dicts.


def _check_params(params: Mapping, cfg: ModelConfig) -> None:
    want = {"embed_tokens", "layers", "norm"} | (set() if cfg.tie_word_embeddings else {"lm_head"})
    if set(params) != want:
        extra, missing = sorted(set(params) - want), sorted(want - set(params))
        raise HFError(f"params do not match the model config (tie_word_embeddings={cfg.tie_word_embeddings}): "
                      f"missing {missing}, unexpected {extra}")
    if set(params["layers"]) != set(_LAYER_TENSORS):
        raise HFError(f"params['layers'] has keys {sorted(params['layers'])}, expected {sorted(_LAYER_TENSORS)}")
    n = cfg.num_hidden_layers
    for t in _layout(cfg):
        if t.layer not in (None, 0):
            continue
        leaf = params["layers"][t.key] if t.layer is not None else params[t.key]
        want_shape = ((n,) if t.layer is not None else ()) + t.shape
        if tuple(leaf.shape) != want_shape:
            where = f"params['layers'][{t.key!r}]" if t.layer is not None else f"params[{t.key!r}]"
            raise HFError(f"{where} has shape {tuple(leaf.shape)}, expected {want_shape} from the model config")


def _iter_hf_tensors(params: Mapping, cfg: ModelConfig, layout: list[_Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, fp32 array) one tensor at a time, so an export never holds a second copy of the whole model."""
    for t in layout:
        if t.layer is None:
            x = params[t.key]
        else:
            x = params["layers"][t.key][t.layer]  # slice first: a jax array then moves one layer to the host
        yield t.hf_name, _to_hf(np.asarray(x).astype(np.float32, copy=False), t)


def to_hf_state_dict(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our nested params (numpy or jax arrays) -> ``{HF tensor name: fp32 numpy array}`` in HF layout."""
    _check_params(params, cfg)
    return dict(_iter_hf_tensors(params, cfg, _layout(cfg)))


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """``{HF tensor name: array}`` (fp32/bf16/fp16) -> our nested params of fp32 numpy, stacked per layer.

    ``tensors`` may be lazy (read on access); each is read once. Raises :class:`HFError` naming the first missing,
    unexpected or misshapen tensor.
    """
    layout = _layout(cfg)
    expected = {t.hf_name for t in layout}
    present = {name for name in tensors if not name.endswith(_IGNORED_SUFFIXES)}
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in present
    missing = sorted(expected - present, key=_natural)
    unexpected = sorted(present - expected - ({"lm_head.weight"} if tied_head else set()), key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HFError(f"checkpoint is missing tensor {missing[0]!r}{more}; it does not match the config "
                      f"(num_hidden_layers={cfg.num_hidden_layers}, tie_word_embeddings={cfg.tie_word_embeddings})")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise HFError(f"checkpoint has unexpected tensor {unexpected[0]!r}{more}; only plain Llama weights "
                      f"(no biases, {cfg.num_hidden_layers} layers) can be imported")

    n = cfg.num_hidden_layers
    params: dict[str, Any] = {"layers": {name: np.empty((n,) + _shape_of(layout, name), np.float32)
                                         for name in _LAYER_TENSORS}}
    for t in layout:
        x = _read(tensors, t.hf_name, t.hf_shape)
        if t.layer is None:
            params[t.key] = np.ascontiguousarray(_from_hf(x, t))
        else:
            params["layers"][t.key][t.layer] = _from_hf(x, t)
    if tied_head:
        head = _read(tensors, "lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        if not np.array_equal(head, params["embed_tokens"]):
            raise HFError("config.json sets tie_word_embeddings=true but lm_head.weight differs from "
                          "model.embed_tokens.weight; set tie_word_embeddings=false to keep a separate head")
    return params


def _shape_of(layout: list[_Tensor], key: str) -> tuple[int, ...]:
    return next(t.shape for t in layout if t.key == key)


def _read(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(tensors[name])
    if tuple(x.shape) != tuple(shape):
        raise HFError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)} from the model config")
    if x.dtype not in _FLOAT_DTYPES:
        raise HFError(f"tensor {name!r} has dtype {x.dtype}; expected float32, bfloat16 or float16")
    return x.astype(np.float32, copy=False)


def _natural(name: str) -> tuple:
    """Sort key that puts model.layers.2 before model.layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


# ---------------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.


def hf_config_dict(cfg: ModelConfig, *, eos_token_id: int | None, bos_token_id: int | None,
                   dtype: str = "bfloat16") -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` equal to ``cfg`` (weights stored in ``dtype``)."""
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}
    rope_parameters = dict(rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def model_config_from_hf(hf_config: Mapping[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """The model section of a Llama ``config.json``; compute/remat/attention settings come from ``base``.

    Accepts transformers 4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``) spellings. Raises
    :class:`HFError` for anything our model cannot represent (another architecture, biases, other RoPE types).
    """
    c = dict(hf_config)
    model_type, archs = c.get("model_type"), c.get("architectures") or []
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise HFError(f"config.json describes model_type={model_type!r}, architectures={archs}; only Llama "
                      "checkpoints (model_type 'llama', LlamaForCausalLM) can be imported")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, want) != want:
            raise HFError(f"config.json has {key}={c[key]!r}; our Llama supports only {key}={want!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in c:
            raise HFError(f"config.json has no {key!r}; it is not a complete Llama config")

    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise HFError(f"config.json rope_scaling/rope_parameters must be an object, got {rope!r}")
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise HFError("config.json has per-layer-type rope_parameters; our Llama uses one RoPE for all layers")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise HFError(f"config.json uses RoPE type {rope_type!r}; only 'default' and 'llama3' are supported")
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFError("config.json sets partial_rotary_factor != 1; our Llama rotates the whole head dim")

    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    fields: dict[str, Any] = dict(
        vocab_size=c["vocab_size"], hidden_size=hidden, intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=0 if hidden % heads == 0 and head_dim == hidden // heads else head_dim,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        rope_scaling="llama3" if rope_type == "llama3" else "none",
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        initializer_range=float(c.get("initializer_range", 0.02)),
    )
    if rope_type == "llama3":
        try:
            fields.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]))
        except KeyError as e:
            raise HFError(f"config.json llama3 rope_scaling lacks {e.args[0]!r}") from None
        fields["rope_original_max_position_embeddings"] = int(
            rope.get("original_max_position_embeddings", fields["max_position_embeddings"]))
    cfg = dataclasses.replace(base or ModelConfig(), **fields)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer files.


def _special_tokens(tokenizer_json: Path, vocab_size: int) -> dict[str, int]:
    """{special token: id} of a tokenizer.json, after checking that it loads and fits the model's vocabulary."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise HFError(f"{str(tokenizer_json)!r} is not a Hugging Face tokenizer.json ({e})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise HFError(f"tokenizer {str(tokenizer_json)!r} has {size} tokens but the model's vocab_size is "
                      f"{vocab_size}; export with the tokenizer the model was trained with")
    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens") or []
    return {a["content"]: int(a["id"]) for a in added if a.get("special")}


def _pick(special: Mapping[str, int], candidates: tuple[str, ...], wanted: str | None, what: str,
          path: Path) -> str | None:
    if wanted is not None:
        if wanted not in special:
            raise HFError(f"{what} token {wanted!r} is not a special token of {str(path)!r}; its special tokens "
                          f"are {list(special)}")
        return wanted
    return next((c for c in candidates if c in special), None)


# ---------------------------------------------------------------------------------------------------------------------
# Export / import of a directory.


def _shards(layout: list[_Tensor], itemsize: int, max_shard_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors grouped so each group stays within max_shard_bytes (a larger tensor goes alone)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in layout:
        nbytes = math.prod(t.hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def export_hf(params: Mapping, cfg: ModelConfig, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
              tokenizer_json: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
              eos_token: str | None = None, bos_token: str | None = None, overwrite: bool = False) -> Path:
    """Writes a Hugging Face Llama directory (safetensors, config.json, generation_config.json, tokenizer files).

    Weights are written one shard at a time (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` past ``max_shard_bytes``). With ``tokenizer_json``, it is copied and a
    ``tokenizer_config.json`` for ``PreTrainedTokenizerFast`` is written; EOS/BOS are the first of
    :data:`EOS_CANDIDATES` / :data:`BOS_CANDIDATES` among its special tokens unless ``eos_token``/``bos_token`` name
    them. Without a BOS token the EOS doubles as BOS, as in training (data.py starts every document with EOS).

    Everything is written to a temporary sibling directory that is renamed onto ``out_dir`` at the end, so a crash
    never leaves a half-written export there. A non-empty ``out_dir`` is replaced only with ``overwrite=True``.
    """
    if dtype not in DTYPES:
        raise HFError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise HFError(f"max_shard_bytes={max_shard_bytes} must be > 0")
    cfg.validate()
    _check_params(params, cfg)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise HFError(f"export target {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFError(f"export target {str(out)!r} is not empty; choose a new directory or pass overwrite=True")

    tok_files: dict[str, bytes] = {}
    eos_id = bos_id = None
    if tokenizer_json is not None:
        tok_path = Path(tokenizer_json).expanduser()
        if not tok_path.is_file():
            raise HFError(f"tokenizer file {str(tok_path)!r} does not exist")
        special = _special_tokens(tok_path, cfg.vocab_size)
        eos = _pick(special, EOS_CANDIDATES, eos_token, "EOS", tok_path)
        if eos is None:
            raise HFError(f"tokenizer {str(tok_path)!r} has no end-of-text special token (looked for "
                          f"{list(EOS_CANDIDATES)}; its special tokens are {list(special)}); pass eos_token=NAME")
        bos = _pick(special, BOS_CANDIDATES, bos_token, "BOS", tok_path) or eos
        eos_id, bos_id = special[eos], special[bos]
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
                      "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}
        tok_files = {"tokenizer.json": tok_path.read_bytes(), "tokenizer_config.json": _dumps(tok_config).encode()}
    elif eos_token is not None or bos_token is not None:
        raise HFError("eos_token/bos_token name tokens of a tokenizer; pass tokenizer_json as well")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_weights(params, cfg, tmp, DTYPES[dtype], max_shard_bytes)
        config = hf_config_dict(cfg, eos_token_id=eos_id, bos_token_id=bos_id, dtype=dtype)
        (tmp / "config.json").write_text(_dumps(config))
        generation = {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id}
        (tmp / "generation_config.json").write_text(_dumps(generation))
        for name, data in tok_files.items():
            (tmp / name).write_bytes(data)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(params: Mapping, cfg: ModelConfig, out: Path, dtype: np.dtype, max_shard_bytes: int) -> None:
    layout = _layout(cfg)
    shards = _shards(layout, dtype.itemsize, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        names = [SAFETENSORS_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {k: v.astype(dtype) for k, v in _iter_hf_tensors(params, cfg, shard)}
        save_file(tensors, out / name, metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(v.nbytes for v in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(_dumps(index))


def _replace_dir(new: Path, out: Path) -> None:
    """Renames ``new`` onto ``out``; an existing ``out`` is moved aside first and deleted after."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        else:
            out.rmdir()
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


class _SafetensorsDir(Mapping):
    """Lazy ``{tensor name: numpy array}`` over the safetensors files of an HF directory."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFError(f"{str(index)!r} is not a safetensors index ({e!r})") from None
            self.files = {name: hf_dir / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise HFError(f"{str(index)!r} names shard {file.name!r}, which does not exist")
        elif (hf_dir / SAFETENSORS_FILE).is_file():
            with safe_open(hf_dir / SAFETENSORS_FILE, framework="numpy") as f:
                self.files = dict.fromkeys(f.keys(), hf_dir / SAFETENSORS_FILE)
        else:
            bins = sorted(p.name for p in hf_dir.glob("*.bin"))
            hint = f" (found {bins}: re-save them with save_pretrained(..., safe_serialization=True))" if bins else ""
            raise HFError(f"{str(hf_dir)!r} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}")

    def __getitem__(self, name: str) -> np.ndarray:
        with safe_open(self.files[name], framework="numpy") as f:
            if name not in f.keys():
                raise HFError(f"tensor {name!r} is listed in the index but missing from {self.files[name].name!r}")
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def read_hf_config(hf_dir: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of an HF Llama directory, after checking that it has a supported config.json and safetensors
    weights (their tensors are read by :func:`load_hf`): ``import-hf`` checks this before it creates anything."""
    path = Path(hf_dir).expanduser()
    if not path.is_dir():
        raise HFError(f"{str(path)!r} is not a directory; give a local Hugging Face model directory (config.json "
                      "+ *.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFError(f"{str(path)!r} has no config.json; give a directory written by save_pretrained or export_hf")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{str(config_file)!r} is not valid JSON: {e}") from None
    cfg = model_config_from_hf(hf_config, base)
    _SafetensorsDir(path)  # raises when the weights are missing
    return cfg


def load_hf(hf_dir: str | os.PathLike, base: ModelConfig | None = None) -> tuple[dict, ModelConfig]:
    """Reads an HF Llama directory (config.json + safetensors, sharded or not, fp32/bf16/fp16).

    Returns (params as a nested dict of fp32 numpy in our layout, ModelConfig); ``base`` supplies the settings
    config.json does not hold (compute dtype, remat, attention implementation, ...).
    """
    cfg = read_hf_config(hf_dir, base)
    return from_hf_state_dict(_SafetensorsDir(Path(hf_dir).expanduser()), cfg), cfg


# ---------------------------------------------------------------------------------------------------------------------
# Command-line glue: `intellect-jax export-hf` and `intellect-jax import-hf`.


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
               dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Exports a run's global params (latest or `step` checkpoint) with its tokenizer to a HF directory."""
    from intellect_jax import data
    from intellect_jax.checkpoint import load_global_params
    from intellect_jax.config import from_dict

    config, params, step = load_global_params(run_dir, step)
    cfg = from_dict(config)
    tok = data.tokenizer_path(cfg.data) if cfg.data.kind == "prepared" else None
    out = export_hf(params, cfg.model, out_dir, dtype=dtype, tokenizer_json=tok, overwrite=overwrite)
    return out


def add_export_arguments(parser) -> None:
    parser.add_argument("--run-dir", required=True, help="run directory with checkpoints")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_export(args) -> int:
    target = Path(args.out).expanduser()
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:  # before reading the checkpoint
        raise HFError(f"export target {str(target)!r} is not empty; choose a new --out or pass --overwrite to "
                      "replace it")
    out = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
