"""Typed, frozen configuration: one dataclass per concern, TOML presets, ``--section.key=value`` overrides.

This module must not import jax: the CLI reads the config (e.g. ``run.host_devices``) before jax starts.

Every default lives here and only here. ``load_config(path, overrides)`` is the single entry point; it returns a
validated :class:`Config` or raises :class:`ConfigError` with one message naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intellect_jax import codecs


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says how to fix it."""


# --------------------------------------------------------------------------------------------------------------------
# Sections. Field names follow Hugging Face where one exists.


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 42
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    # Llama-3.1 style RoPE frequency scaling ("none" or "llama3").
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Activations/matmuls run in compute_dtype; parameters are stored in param_dtype (fp32 master weights).
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    # "xla" (builds the [B, 1, L, L] mask; the reference), "cudnn" (fused, NVIDIA; without documents no mask,
    # with them the mask), "cudnn_mask" (cuDNN fed the mask), "blockwise" (flash attention in JAX from segment ids,
    # any backend), "pallas" (fused Triton kernel with segment ids, GPU), "auto" (no [L, L] array from L = 2048 on;
    # intellect_jax/attention.py has the rule and the H200 measurements behind it).
    attention_impl: str = "auto"
    # Rematerialisation of each scanned layer: "none", "full", "dots" (save matmul outputs), "dots_no_batch".
    remat: str = "full"
    # Layers under one lax.scan (compiles once per layer shape: fast builds, the CPU tests' choice) or unrolled (XLA
    # then reads each layer's weights and saved activations in place instead of copying them out of the stacked
    # arrays every step: 13% faster on an H200 for the 1B preset, which sets it).
    scan_layers: bool = True

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}; choose a head count that divides it or set model.head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_key_value_heads={self.num_key_value_heads} must divide "
                f"model.num_attention_heads={self.num_attention_heads} (grouped-query attention)")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim={self.resolved_head_dim} must be even for rotary embeddings")
        _choice(self, "rope_scaling", ("none", "llama3"))
        _choice(self, "compute_dtype", ("float32", "bfloat16", "float16"))
        _choice(self, "param_dtype", ("float32", "bfloat16"))
        _choice(self, "attention_impl", ("auto", "xla", "cudnn", "cudnn_mask", "blockwise", "pallas"))
        _choice(self, "remat", ("none", "full", "dots", "dots_no_batch"))
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError("model.rope_high_freq_factor must be greater than model.rope_low_freq_factor")


@dataclass(frozen=True)
class OptimConfig:
    """Inner optimizer (AdamW) and its learning-rate schedule, counted in inner steps."""

    learning_rate: float = 7.5e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    # "wsd_sqrt": linear warmup, constant, then lr * (1 - sqrt((t - decay_start) / (total - decay_start))).
    # "cosine": linear warmup then cosine decay to min_lr_ratio * lr.  "constant": linear warmup then constant.
    schedule: str = "wsd_sqrt"
    warmup_steps: int = 1000
    total_steps: int = 90400
    decay_start: int = -1  # wsd_sqrt: step where the decay begins; -1 means no decay within total_steps
    min_lr_ratio: float = 0.0
    z_loss_weight: float = 0.0  # max-z-loss (Baichuan 2): loss += w * mean(max_logit**2)
    grad_accum_steps: int = 1  # micro-batches per step (the batch is split and gradients are summed)

    def validate(self) -> None:
        _choice(self, "schedule", ("wsd_sqrt", "cosine", "constant"))
        _positive(self, "learning_rate", "total_steps", "grad_accum_steps")
        _nonnegative(self, "warmup_steps", "weight_decay", "grad_clip", "z_loss_weight", "min_lr_ratio", "eps")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError("optim.b1 and optim.b2 must be in [0, 1)")
        if self.warmup_steps > self.total_steps:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} exceeds optim.total_steps={self.total_steps}")
        if self.decay_start != -1 and not (self.warmup_steps <= self.decay_start <= self.total_steps):
            raise ConfigError(
                f"optim.decay_start={self.decay_start} must lie between optim.warmup_steps={self.warmup_steps} "
                f"and optim.total_steps={self.total_steps} (or be -1 for no decay)")


@dataclass(frozen=True)
class SourceConfig:
    """One prepared dataset (a directory with manifest.json + token shards) and its mixture weight."""

    name: str = ""
    path: str = ""
    weight: float = 1.0
    # A built-in recipe used to prepare `path` automatically when it is missing ("python-stdlib"), or "".
    auto_prepare: str = ""
    # Vocabulary size of the byte-level BPE that the auto_prepare recipe trains (part of the recipe's identity).
    auto_prepare_vocab_size: int = 4096


@dataclass(frozen=True)
class DataConfig:
    # "synthetic": an in-memory learnable sequence task (tests, smoke runs). "prepared": tokenized shards on disk.
    kind: str = "synthetic"
    sources: tuple[SourceConfig, ...] = ()
    tokenizer: str = ""  # path to a tokenizer.json; "" means "the one recorded in the sources' manifests"
    seq_len: int = 8192
    batch_size: int = 128  # sequences per island per inner step (over all of the island's devices)
    seed: int = 0
    prefetch: int = 2  # batches prepared ahead in background threads (0: none)
    # Held-out evaluation (on when run.eval_every > 0): the evaluation set is eval_batches batches of batch_size x
    # seq_len tokens packed from every eval_holdout_every-th document of each source, which training then never reads.
    eval_batches: int = 0
    eval_holdout_every: int = 100
    # kind="synthetic": number of distinct generated documents (one epoch), shared by all islands.
    synthetic_docs: int = 65536
    # kind="prepared": check every shard's sha256 against its manifest when it is first opened (sizes and document
    # offsets are always checked). Turn off for very large datasets where hashing at start-up takes too long.
    verify_checksums: bool = True

    def validate(self) -> None:
        _choice(self, "kind", ("synthetic", "prepared"))
        _positive(self, "seq_len", "batch_size", "synthetic_docs")
        _nonnegative(self, "prefetch", "eval_batches")
        if self.eval_holdout_every < 2:
            raise ConfigError(f"data.eval_holdout_every={self.eval_holdout_every} must be >= 2 (every N-th document "
                              "of each source is held out for evaluation; 1 would leave none to train on)")
        if self.kind == "prepared":
            if not self.sources:
                raise ConfigError("data.kind='prepared' needs at least one [[data.sources]] entry with a path")
            names = set()
            for i, s in enumerate(self.sources):
                if not s.path:
                    raise ConfigError(f"data.sources[{i}].path is empty; give the prepared dataset's directory")
                if s.weight < 0 or not math.isfinite(s.weight):
                    raise ConfigError(f"data.sources[{i}].weight={s.weight} must be a finite number >= 0")
                if s.auto_prepare not in ("", "python-stdlib"):
                    raise ConfigError(f"data.sources[{i}].auto_prepare={s.auto_prepare!r} is not a known recipe; "
                                      "use 'python-stdlib' or '' (prepare the data with `intellect-jax prepare-data`)")
                if s.auto_prepare and not 256 < s.auto_prepare_vocab_size <= 1 << 20:
                    raise ConfigError(f"data.sources[{i}].auto_prepare_vocab_size={s.auto_prepare_vocab_size} must "
                                      "be in (256, 1048576]: a byte-level BPE starts from 256 byte tokens")
                name = s.name or s.path
                if name in names:
                    raise ConfigError(f"data.sources[{i}] repeats the source {name!r}; give each source a unique "
                                      "name (or merge the entries and add their weights)")
                names.add(name)
            total = sum(s.weight for s in self.sources)
            if not total > 0:
                raise ConfigError(f"data.sources weights sum to {total}; give at least one source a positive weight")


# diloco.compression: the wire codecs' names and bits per element (intellect_jax.codecs registers them).
COMPRESSIONS = tuple(codecs.CODECS)
COMPRESSION_BITS = {name: c.bits for name, c in codecs.CODECS.items()}


@dataclass(frozen=True)
class DilocoConfig:
    """DiLoCo (Douillard et al. 2023, arXiv 2311.08105): H inner steps per island, then an outer step on the mean
    pseudo-gradient."""

    inner_steps: int = 100  # H
    outer_optimizer: str = "nesterov"  # "nesterov" (SGD + Nesterov momentum) | "sgd" | "adam"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "int8"  # cross-island payload: "none" (fp32) | "int8" | "int4" (codes + fp32 block scales)
    block_size: int = 256  # elements per quantization scale
    # Each island keeps what quantization dropped from its contribution (fp32, per island, checkpointed) and adds it
    # to its next pseudo-gradient (error feedback; needs compression int8 or int4).
    error_feedback: bool = False
    outer_state_on_host: bool = True  # keep global params + outer state in pinned host memory where supported
    # Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512; intellect_jax/streaming.py): the params split into
    # `fragments` by layer (layer l in fragment l mod P), fragment p synced every H steps at offset p H / P; its mean
    # is applied `overlap_steps` later while the islands keep training, and merged into each island's fragment as
    # merge_alpha x island + (1 - merge_alpha) x global. fragments=1, overlap_steps=0: plain DiLoCo.
    fragments: int = 1
    overlap_steps: int = 0
    merge_alpha: float = 0.0
    # An island whose pseudo-gradient is not finite, or (3+ islands) whose norm exceeds this many times the median,
    # is left out of that outer step's mean and restarts from the result (diloco.guard; 0: only non-finite ones).
    # Both transports apply it: in-program inside the outer step; elastic at the coordinator when the epoch forms.
    max_norm_ratio: float = 5.0

    def validate(self) -> None:
        _positive(self, "inner_steps", "outer_lr", "block_size", "fragments")
        if self.overlap_steps < 0 or self.overlap_steps * self.fragments >= self.inner_steps:
            raise ConfigError(
                f"diloco.overlap_steps={self.overlap_steps} must be >= 0 and less than diloco.inner_steps / "
                f"diloco.fragments = {self.inner_steps}/{self.fragments}, so that a fragment's mean is applied before "
                "the next fragment syncs; lower overlap_steps or fragments, or raise inner_steps")
        if self.fragments > self.inner_steps:
            raise ConfigError(f"diloco.fragments={self.fragments} exceeds diloco.inner_steps={self.inner_steps}: "
                              "each fragment needs its own sync step; use at most inner_steps fragments")
        if self.max_norm_ratio < 0 or 0 < self.max_norm_ratio < 1:
            raise ConfigError(f"diloco.max_norm_ratio={self.max_norm_ratio} must be 0 (off) or >= 1 (x the median "
                              "pseudo-gradient norm; 5 is a loose guard against a diverged or poisoned island)")
        if not 0.0 <= self.merge_alpha <= 1.0:
            raise ConfigError(f"diloco.merge_alpha={self.merge_alpha} must be in [0, 1] (0: an island takes the "
                              "global fragment; 1: it keeps its own)")
        _choice(self, "outer_optimizer", ("nesterov", "sgd", "adam"))
        _choice(self, "compression", COMPRESSIONS)
        if self.error_feedback and self.compression == "none":
            raise ConfigError("diloco.error_feedback=true needs a lossy payload, and diloco.compression='none' sends "
                              "exact fp32 (nothing to feed back); set diloco.compression to 'int8' or 'int4', or "
                              "error_feedback=false")
        if self.compression == "int4" and self.block_size % 2:
            raise ConfigError(f"diloco.block_size={self.block_size} is odd; int4 packs two codes per byte, so a "
                              "block must hold an even number of elements (e.g. 256)")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError("diloco.outer_momentum must be in [0, 1)")


@dataclass(frozen=True)
class ElasticConfig:
    """Islands as separate programs joined over TCP (see intellect_jax/elastic/). Off when coordinator is "".

    The islands (``IslandClient``) and ``intellect-jax coordinator`` both read it; the coordinator's flags default to
    these fields, so give the coordinator the same values the islands use.
    """

    coordinator: str = ""  # HOST:PORT of `intellect-jax coordinator`
    # Identity: this island's private key (`intellect-jax keygen --out FILE`, mode 0600) and the run's islands file
    # (one `NAME ssh-ed25519 PUBLIC_KEY` line per admitted island, plus the coordinator's under "coordinator"); an
    # island's name is the one its key is listed under. Use these on the internet.
    key_file: str = ""
    islands_file: str = ""
    # Shared-secret mode, for local tests and demos only (32 random bytes, mode 0600, the same file everywhere):
    # every identity derives from the secret, so anyone holding it can be any island. Instead of key_file and
    # islands_file.
    secret_file: str = ""
    # Frames after the handshake sealed with AES-256-GCM under per-connection, per-direction keys (else HMAC only:
    # authenticated but readable on the wire). Every island and the coordinator must agree.
    encrypt: bool = True
    run_id: str = ""  # "" -> run.name; frames from another run are refused
    island_name: str = ""  # "" -> hostname-pid
    listen: str = "0.0.0.0:0"  # where this island accepts ring and state-transfer peers (port 0: any free port)
    advertise_host: str = ""  # address peers use to reach this island ("" -> the address seen by the coordinator)
    heartbeat_s: float = 2.0
    dead_after_s: float = 10.0  # no heartbeat (or no ring traffic) for this long: the island is dead
    # Parallel TCP connections per ring link. One stream moves at most ~window / RTT (Linux's default 4 MiB window:
    # 42 MB/s at 100 ms, 14 MB/s at 300 ms; measured with launch/delay_relay.py, benchmarks/RESULTS.md), so a link
    # needs streams >= link rate x RTT / 4 MiB; more streams cost host CPU. 0 (auto): the coordinator picks the count
    # for each epoch from the round trips the islands measured to each other (elastic.ordering.auto_streams: 4 to
    # 16, planned for `link_mbit`); a number fixes it (the coordinator's value is the one every island uses).
    streams: int = 0
    link_mbit: float = 1000.0  # access-link rate (Mbit/s) the automatic stream count plans for
    chunk_bytes: int = 4 << 20  # pipelining unit of the ring all-reduce and of state transfers
    # int8/int4 rings, "on": the island packs its pseudo-gradient on its own devices (quant.pack, the jnp twin of
    # the ring's codec: identical bytes), so only the codes + scales cross to the host (1/4 or 1/8 of fp32) and the
    # host packs nothing; the ring's mean comes back as codes and is decoded on the devices. Each hop then adds this
    # island's decoded codes instead of its fp32 values (error feedback keeps what the codes drop either way).
    # "off": the fp32 pseudo-gradient goes to the host and the ring's numpy codec packs it there. "auto": on for
    # accelerators, off on CPU islands (there XLA's pack runs 1.7 GB/s against the numpy codec pool's 5.2 GB/s).
    device_codes: str = "auto"
    # A frame is read whole before its MAC can be checked, so each side caps what a connection may make it buffer.
    # Between islands the frames carry ring chunks, state-transfer chunks and link probes (megabytes); to and from
    # the coordinator they carry only JSON control messages (a few kB per island), so the coordinator, which every
    # island of the run connects to, keeps a much smaller cap.
    peer_max_frame_bytes: int = 256 << 20
    coordinator_max_frame_bytes: int = 1 << 20
    # Aborted reduces of one outer step redone before the island gives up (ReduceFailed); 0: never give up (the
    # coordinator quarantines whoever keeps failing reduces, and the others go on without it).
    reduce_retries: int = 0
    coordinator_timeout_s: float = 120.0  # an island gives up when the coordinator stays unreachable this long
    # Longest an island waits at an outer-step boundary (for the slowest island's inner steps and the decision) or
    # for a peer to fetch the state from.
    barrier_timeout_s: float = 3600.0
    # After a membership change (3+ islands) each island times a transfer of up to this many bytes to every peer
    # (at most 0.5 s of what its last ring sent per second, at least 256 KiB); the coordinator orders the ring to
    # maximise the slowest link. 0: no probes (the ring is ordered by name).
    probe_bytes: int = 1 << 20
    serve_bytes_per_s: float = 0.0  # cap on the rate an island sends its state to a joiner (0: no cap)
    # Coordinator only: islands that must be ready before the first outer step of a fresh run, and how long a
    # restarted coordinator waits for the members of the newest epoch to re-register (0: dead_after_s).
    min_islands: int = 1
    max_islands: int = 256  # the coordinator refuses registrations beyond this many island names
    recovery_grace_s: float = 0.0
    # Coordinator only: deadlines instead of waits. An outer step goes on without an island that is not ready
    # sync_timeout_s after the first one was (islands of different speeds: set it above the gap between them), and a
    # hash vote is decided without members that have not voted vote_timeout_s after the step committed. Every miss,
    # lost vote, guard exclusion or failed reduce (its reporter and the peer it blames) is a strike; quarantine_after
    # strikes in a row quarantine the island for quarantine_s (doubling each time, at most an hour).
    sync_timeout_s: float = 600.0
    vote_timeout_s: float = 300.0
    quarantine_s: float = 60.0
    quarantine_after: int = 3
    # The slowest a ring link may move (Mbit/s): a reduce must finish within its bytes at this rate (or at a fifth
    # of the slowest link the islands measured, if faster) plus dead_after_s, else it is aborted naming the link.
    min_link_mbit: float = 1.0
    # Coordinator only: serve /metrics (Prometheus), /status.json and a status page at HOST:PORT ("": off). Any
    # address but loopback needs a token: a file of mode 0600 (Prometheus sends it as a bearer token, a browser as
    # the password of basic authentication).
    http: str = ""
    http_token_file: str = ""
    # Which disjoint slice of the data this island reads: slice `data_shard` of `data_shards` (give every island of
    # the run its own index; a restarted island keeps its index).
    data_shard: int = 0
    data_shards: int = 1

    def validate(self) -> None:
        _positive(self, "max_islands", "heartbeat_s", "dead_after_s", "link_mbit", "chunk_bytes",
                  "peer_max_frame_bytes",
                  "coordinator_max_frame_bytes", "coordinator_timeout_s", "barrier_timeout_s", "min_islands",
                  "data_shards", "sync_timeout_s", "vote_timeout_s", "quarantine_s", "quarantine_after",
                  "min_link_mbit")
        _nonnegative(self, "reduce_retries", "probe_bytes", "serve_bytes_per_s", "recovery_grace_s")
        if self.device_codes not in ("auto", "on", "off"):
            raise ConfigError(f"elastic.device_codes={self.device_codes!r}: use \"auto\" (on for accelerators, off on "
                              "CPU), \"on\" or \"off\"")
        if not 0 <= self.streams <= 16:
            raise ConfigError(f"elastic.streams={self.streams}: use 0 (automatic, from the measured round trips) or "
                              "1..16 TCP streams per ring link")
        if not 0 <= self.data_shard < self.data_shards:
            raise ConfigError(f"elastic.data_shard={self.data_shard} must be in [0, elastic.data_shards="
                              f"{self.data_shards})")
        if self.secret_file and (self.key_file or self.islands_file):
            raise ConfigError("elastic.secret_file and elastic.key_file/islands_file are both set; use the key and "
                              "islands files (each island its own key) or, for a local test, the secret alone")
        if bool(self.key_file) != bool(self.islands_file):
            missing = "islands_file" if self.key_file else "key_file"
            raise ConfigError(f"elastic.{missing} is empty: an identity needs both elastic.key_file (this island's "
                              "key, `intellect-jax keygen --out FILE`) and elastic.islands_file (the run's admitted "
                              "islands, with the coordinator's key)")
        if self.http and not _hostport(self.http):
            raise ConfigError(f"elastic.http={self.http!r} must be HOST:PORT (e.g. 127.0.0.1:9400) or \"\" (off)")
        if self.http_token_file and not self.http:
            raise ConfigError("elastic.http_token_file is set but elastic.http is empty: the token protects the "
                              "coordinator's HTTP endpoint; set elastic.http too")
        if self.coordinator and not (self.secret_file or self.key_file):
            raise ConfigError("elastic.coordinator is set but this island has no identity: set elastic.key_file "
                              "(make one with `intellect-jax keygen --out island.key` and send the public key it "
                              "prints to the run's operator) and elastic.islands_file; or, for a local test, "
                              "elastic.secret_file (`intellect-jax secret --out secret`)")
        if self.dead_after_s <= self.heartbeat_s:
            raise ConfigError(f"elastic.dead_after_s={self.dead_after_s} must exceed "
                              f"elastic.heartbeat_s={self.heartbeat_s}")
        if self.probe_bytes + FRAME_HEADER_ALLOWANCE > self.peer_max_frame_bytes:
            raise ConfigError(f"elastic.probe_bytes={self.probe_bytes} does not fit in one peer frame; lower it or "
                              f"raise elastic.peer_max_frame_bytes={self.peer_max_frame_bytes}")


def _hostport(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and int(port) < 65536


# Room for a frame's JSON header next to its payload (a ring or probe header is a few hundred bytes).
FRAME_HEADER_ALLOWANCE = 64 << 10


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: islands x data x fsdp x tensor. One axis may be -1 (filled from the device count)."""

    islands: int = 1
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError("only one of mesh.islands/data/fsdp/tensor may be -1 (filled from the device count)")
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{k}={v} must be a positive size or -1")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes for `num_devices`, or a ConfigError naming the mismatch."""
        sizes = dataclasses.asdict(self)
        fixed = math.prod(v for v in sizes.values() if v != -1)
        free = [k for k, v in sizes.items() if v == -1]
        if free:
            if num_devices % fixed:
                raise ConfigError(
                    f"mesh {sizes} cannot fill {num_devices} devices: the fixed axes multiply to {fixed}, which does "
                    f"not divide {num_devices}; change mesh.* so the product divides the device count")
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(
                f"mesh {sizes} needs {fixed} devices but {num_devices} are present; set the mesh.* sizes so their "
                f"product is {num_devices}, or set one of them to -1")
        return sizes


@dataclass(frozen=True)
class CheckpointConfig:
    every_outer_steps: int = 10  # save every K outer steps (single island: every K * diloco.inner_steps steps)
    max_to_keep: int = 3
    async_save: bool = True
    resume_step: int = -1  # -1: the latest checkpoint in the run directory

    def validate(self) -> None:
        _nonnegative(self, "every_outer_steps")
        _positive(self, "max_to_keep")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: str = ""  # "" -> ./runs/<name>
    steps: int = -1  # inner steps to run; -1: optim.total_steps
    seed: int = 0
    log_every: int = 10
    # CPU only: simulate this many XLA devices (sets --xla_force_host_platform_device_count before jax starts).
    host_devices: int = 0
    platform: str = ""  # "" (whatever jax finds), "cpu", "gpu", "tpu"
    # A Hugging Face Llama directory (config.json + safetensors) to start from instead of a random init
    # (continued pre-training); ignored when the run directory already has a checkpoint.
    init_from_hf: str = ""
    wandb_project: str = ""  # also log to Weights & Biases (needs the `wandb` extra)
    # Serve the rows that go to metrics.jsonl as Prometheus gauges at http://HOST:PORT/metrics ("": off), e.g.
    # "127.0.0.1:9401"; bind another address only behind a firewall (the numbers are not secret, the port is open).
    metrics_http: str = ""
    # Held-out loss of the global params every eval_every inner steps (DiLoCo: at the first outer step at or after
    # each multiple) and at the end of the run, on data.eval_batches batches; 0: no evaluation, nothing held out.
    eval_every: int = 0
    # "a:b": a jax.profiler trace of the inner steps after step a up to step b into <run dir>/profile (open it with
    # xprof, TensorBoard's profile plugin); "" traces nothing.
    profile_steps: str = ""

    @property
    def resolved_dir(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """run.profile_steps as (a, b), or None when profiling is off."""
        if not self.profile_steps:
            return None
        a, sep, b = self.profile_steps.partition(":")
        try:
            start, stop = int(a), int(b)
        except ValueError:
            start = stop = -1
        if not sep or not 0 <= start < stop:
            raise ConfigError(f"run.profile_steps={self.profile_steps!r} must be \"a:b\" with 0 <= a < b (inner "
                              "steps, e.g. \"10:15\" traces steps 11 to 15), or \"\" for no trace")
        return start, stop

    def validate(self) -> None:
        if self.metrics_http and not _hostport(self.metrics_http):
            raise ConfigError(f"run.metrics_http={self.metrics_http!r} must be HOST:PORT (e.g. 127.0.0.1:9401) or "
                              "\"\" (off)")
        if self.steps == 0 or self.steps < -1:
            raise ConfigError(f"run.steps={self.steps} must be positive (or -1 for optim.total_steps)")
        _positive(self, "log_every")
        _nonnegative(self, "host_devices", "eval_every")
        _choice(self, "platform", ("", "cpu", "gpu", "tpu"))
        self.profile_range  # noqa: B018 (raises ConfigError for a malformed range)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.data.batch_size % self.optim.grad_accum_steps:
            raise ConfigError(
                f"optim.grad_accum_steps={self.optim.grad_accum_steps} must divide "
                f"data.batch_size={self.data.batch_size}")
        if self.run.eval_every and not self.data.eval_batches:
            raise ConfigError(f"run.eval_every={self.run.eval_every} needs an evaluation set: set "
                              "data.eval_batches > 0 (batches of held-out documents), or run.eval_every=0 for no "
                              "evaluation")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}; shorten the sequence or raise the limit")
        d = self.diloco
        if d.fragments > self.model.num_hidden_layers:
            raise ConfigError(f"diloco.fragments={d.fragments} exceeds model.num_hidden_layers="
                              f"{self.model.num_hidden_layers}: a fragment is a set of layers; use at most one "
                              "fragment per layer")
        # A ring frame carries one chunk: chunk_bytes of codes plus an fp32 scale per block (fp32: chunk_bytes).
        e = self.elastic
        bits = COMPRESSION_BITS[self.diloco.compression]
        elems = max(e.chunk_bytes * 8 // bits, self.diloco.block_size)  # the ring rounds chunks to whole blocks
        scales = 0 if bits == 32 else 4 * -(-elems // self.diloco.block_size)
        ring_frame = elems * bits // 8 + scales + FRAME_HEADER_ALLOWANCE
        if ring_frame > e.peer_max_frame_bytes:
            raise ConfigError(
                f"elastic.chunk_bytes={e.chunk_bytes} makes ring frames of up to {ring_frame} bytes, more than "
                f"elastic.peer_max_frame_bytes={e.peer_max_frame_bytes}; lower the chunk or raise the limit")
        return self

    @property
    def total_inner_steps(self) -> int:
        return self.run.steps if self.run.steps > 0 else self.optim.total_steps

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (JSON/TOML-ready); the one way to serialise a Config."""
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections).validate()


# --------------------------------------------------------------------------------------------------------------------
# Building from TOML and overrides.


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a TOML preset (or the defaults), applies ``section.key=value`` overrides, validates."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass one of the presets in configs/")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "").validate()


def _parse_override(item: str) -> tuple[str, Any]:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} has no value; write it as --section.key=value")
    key, value = text.split("=", 1)
    if "." not in key:
        raise ConfigError(f"override {item!r} names no section; write it as --section.key=value (e.g. --run.steps=10)")
    try:  # TOML literal: numbers, booleans, quoted strings, arrays
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string
    return key, parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        u = unknown[0]
        close = sorted({n for n in names if n.startswith(u[:3]) or u in n or n in u}
                       | set(difflib.get_close_matches(u, names, n=3, cutoff=0.6)))
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(names))}"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise NotImplementedError(f"union field {key}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or (tp in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(
            f"config key {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise ConfigError(f"{_section(obj)}.{n}={getattr(obj, n)!r} must be > 0")


def _nonnegative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{_section(obj)}.{n}={getattr(obj, n)!r} must be >= 0")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{_section(obj)}.{name}={getattr(obj, name)!r} is not one of {', '.join(choices)}")


def _section(obj: Any) -> str:
    sections = {ModelConfig: "model", OptimConfig: "optim", DataConfig: "data", DilocoConfig: "diloco",
                ElasticConfig: "elastic", MeshConfig: "mesh", CheckpointConfig: "checkpoint", RunConfig: "run"}
    return sections.get(type(obj), type(obj).__name__)
