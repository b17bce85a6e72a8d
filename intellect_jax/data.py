"""Training batches: document sources, a weighted mixture, packing with segment ids, per-island disjoint reading.

Layout. A run reads ``num_slots = num_islands * batch_size`` independent token streams, one per (island, row)
"slot" (``slot = island * batch_size + row``). Slot ``s`` owns documents ``k`` with ``k % num_slots == s`` of every
source, so islands, and the processes that load parts of an island's batch, never read the same document, and
together they cover every document. Each slot walks its documents in a shuffled order that is new every epoch,
seeded from ``(data.seed, source, slot, epoch)`` (a cached permutation for small epochs, the lazy
``grain.experimental.index_shuffle`` with O(1) memory for large ones). The content of ``(step, island, row)``
therefore depends only on the config, never on how many processes load the batch or which rows each one loads.

Mixture. Sources are mixed by *tokens*: before every document a slot draws from the source with the smallest
``tokens_drawn / weight`` (ties to the first). This deterministic deficit rule keeps each slot's token shares within
one document of the weights at every point, with no sampling noise.

Packing (INTELLECT-1 style): a slot's stream is ``EOS d1 EOS d2 EOS d3 ...``; a row is the next ``seq_len + 1``
tokens (``inputs = w[:-1]``, ``targets = w[1:]``), and consecutive rows overlap by one token so every token is a
target exactly once. A segment starts at every document's EOS and at the start of each row (a document continued
from the previous row is a new segment), ``positions`` restart at 0 per segment, so per-document attention
masking never lets a token see another document. The leading EOS acts as Llama's BOS: it predicts a document's
first token, and a document's last token predicts the next EOS. Rows are always full, so ``loss_mask`` is 1
everywhere; ``segment_ids == 0`` would mark padding.

State. ``get_state()`` is a small JSON dict: per slot, how many documents and tokens it has drawn from each
source before the document under its cursor, and the cursor's offset in that document. States of several
processes can be merged with :func:`merge_states`; a merged state restores any process layout of the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from grain.experimental import index_shuffle

from intellect_jax.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "intellect-jax-tokens"
FORMAT_VERSION = 1
STATE_VERSION = 1
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_SMALL_EPOCH = 8192  # documents per slot and source up to which the epoch's permutation is materialised


class DataError(RuntimeError):
    """A data problem (missing or corrupt shard, empty dataset, tokenizer mismatch); the message says the fix."""


# --------------------------------------------------------------------------------------------------------------------
# Document sources.


class DocumentSource(Protocol):
    name: str
    num_docs: int

    def doc(self, k: int) -> np.ndarray:
        """Tokens of document ``k`` (without EOS), a 1-D integer array."""


class SyntheticSource:
    """A learnable in-memory task: noisy arithmetic progressions mod the vocabulary.

    Document ``k`` has a length in [4, 192] and tokens ``x_t = (a + b t) mod V`` with ``b`` in {1, 2, 3, 4} and 10%
    of tokens replaced by random ones, all derived from ``k`` alone. A model first learns the bigram structure (the
    next token is one of four), then infers ``b`` from context, so the loss falls quickly from ``ln(vocab_size)``.
    """

    def __init__(self, vocab_size: int, eos_id: int, num_docs: int, content_seed: int = 20241129):
        if vocab_size < 3:
            raise DataError(f"synthetic data needs model.vocab_size >= 3, got {vocab_size}")
        if not 0 <= eos_id < vocab_size:
            raise DataError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")
        self.name = "synthetic"
        self.num_docs = num_docs
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._seed = content_seed

    def doc(self, k: int) -> np.ndarray:
        rng = np.random.default_rng((self._seed, k))
        v = self.vocab_size - 1  # token values other than EOS
        n = int(rng.integers(4, 193))
        a, b = int(rng.integers(0, v)), int(rng.integers(1, 5))
        x = (a + b * np.arange(n)) % v
        noise = rng.random(n) < 0.1
        x[noise] = rng.integers(0, v, int(noise.sum()))
        return np.where(x >= self.eos_id, x + 1, x).astype(np.int32)


@dataclass(frozen=True)
class Manifest:
    path: Path
    raw: dict[str, Any]

    @property
    def eos_id(self) -> int:
        return int(self.raw["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.raw.get("tokenizer_sha256", ""))


def read_manifest(directory: str | Path) -> Manifest:
    """Reads and checks ``directory/manifest.json`` (not the shards); raises DataError with the fix."""
    d = Path(directory).expanduser()
    p = d / MANIFEST
    if not p.is_file():
        raise DataError(f"no prepared dataset at {str(d)!r}: {MANIFEST} is missing; prepare it with "
                        f"`intellect-jax prepare-data --input ... --out {d}` (or set auto_prepare on the source)")
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p} is not readable JSON ({e}); re-run `intellect-jax prepare-data` for this "
                        "dataset") from None
    if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
        raise DataError(f"{p} is not an {FORMAT} v{FORMAT_VERSION} manifest (format={raw.get('format')!r}, "
                        f"version={raw.get('version')!r}); re-run `intellect-jax prepare-data` with this version")
    for key in ("dtype", "eos_id", "vocab_size", "documents", "tokens", "shards"):
        if key not in raw:
            raise DataError(f"{p} lacks the key {key!r}; the manifest is corrupt, re-run prepare-data")
    return Manifest(d, raw)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardSource:
    """A prepared dataset: token shards (raw uint16/uint32) with document offsets, memory-mapped lazily."""

    def __init__(self, directory: str | Path, name: str = "", verify_checksums: bool = True):
        self.manifest = read_manifest(directory)
        m = self.manifest.raw
        self.name = name or str(self.manifest.path)
        self.dtype = np.dtype(m["dtype"])
        self._verify = verify_checksums
        shards = m["shards"]
        docs = np.array([int(s["documents"]) for s in shards], dtype=np.int64)
        self._first_doc = np.concatenate([[0], np.cumsum(docs)])
        self.num_docs = int(self._first_doc[-1])
        if self.num_docs != int(m["documents"]):
            raise DataError(f"{self.manifest.path / MANIFEST}: shards hold {self.num_docs} documents but the "
                            f"manifest says {m['documents']}; the manifest is corrupt, re-run prepare-data")
        if self.num_docs == 0:
            raise DataError(f"the prepared dataset {str(self.manifest.path)!r} has no documents; check the inputs "
                            "given to prepare-data (empty files and empty text fields are skipped)")
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        for i in range(len(shards)):  # cheap checks (existence, sizes) up front; hashes on first use
            self._check_sizes(i)

    def _check_sizes(self, i: int) -> None:
        s = self.manifest.raw["shards"][i]
        for key, n, itemsize in (("tokens_file", s["tokens"], self.dtype.itemsize),
                                 ("offsets_file", s["documents"] + 1, 8)):
            f = self.manifest.path / s[key]
            if not f.is_file():
                raise DataError(f"shard file {str(f)!r} is missing; re-run `intellect-jax prepare-data` for "
                                f"{str(self.manifest.path)!r} (it rewrites missing shards)")
            if f.stat().st_size != n * itemsize:
                raise DataError(f"shard file {str(f)!r} has {f.stat().st_size} bytes, the manifest expects "
                                f"{n * itemsize}; it is truncated or corrupt: delete it and re-run prepare-data")

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if i not in self._open:
                s = self.manifest.raw["shards"][i]
                tok_path, off_path = self.manifest.path / s["tokens_file"], self.manifest.path / s["offsets_file"]
                if self._verify:
                    for key, f in (("tokens_sha256", tok_path), ("offsets_sha256", off_path)):
                        if sha256_file(f) != s[key]:
                            raise DataError(f"shard file {str(f)!r} does not match its sha256 in the manifest; "
                                            "it is corrupt: delete it and re-run `intellect-jax prepare-data`")
                tokens = np.memmap(tok_path, dtype=self.dtype, mode="r") if s["tokens"] else np.zeros(0, self.dtype)
                offsets = np.fromfile(off_path, dtype=np.uint64).astype(np.int64)
                if offsets[0] != 0 or offsets[-1] != s["tokens"] or np.any(np.diff(offsets) < 0):
                    raise DataError(f"document offsets in {str(off_path)!r} are inconsistent; the shard is "
                                    "corrupt: delete it and re-run `intellect-jax prepare-data`")
                self._open[i] = (tokens, offsets)
            return self._open[i]

    def doc(self, k: int) -> np.ndarray:
        i = int(np.searchsorted(self._first_doc, k, side="right")) - 1
        tokens, offsets = self._shard(i)
        j = k - int(self._first_doc[i])
        return np.asarray(tokens[offsets[j]:offsets[j + 1]], dtype=np.int32)


# --------------------------------------------------------------------------------------------------------------------
# One slot's packed stream.


def _shuffle_seed(seed: int, source: int, slot: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, source, slot, epoch]).generate_state(1)[0])


class _SlotStream:
    """The token stream of one (island, row) slot: its own documents of every source, mixed, EOS-separated."""

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], slot: int, num_slots: int,
                 seed: int, eos_id: int, seq_len: int):
        self.sources, self.slot, self.num_slots, self.seed, self.eos_id = sources, slot, num_slots, seed, eos_id
        self.seq_len = seq_len
        self.weights = [float(w) for w in weights]
        self.local = [(src.num_docs - slot + num_slots - 1) // num_slots for src in sources]
        for src, n, w in zip(sources, self.local, self.weights):
            if w > 0 and n <= 0:
                raise DataError(
                    f"source {src.name!r} has {src.num_docs} documents, fewer than the {num_slots} reading slots "
                    f"(islands x data.batch_size); each slot needs its own documents. Prepare more data, or lower "
                    f"data.batch_size or the number of islands")
        self._orders: dict[tuple[int, int], np.ndarray | int] = {}
        self.set_state({"drawn": [0] * len(sources), "tokens": [0] * len(sources), "offset": 0})

    def get_state(self) -> dict[str, Any]:
        drawn, tokens = self._buffer[0][1]
        return {"drawn": list(drawn), "tokens": list(tokens), "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["drawn"]) != len(self.sources) or len(state["tokens"]) != len(self.sources):
            raise DataError(f"iterator state for slot {self.slot} has {len(state['drawn'])} sources, the config "
                            f"has {len(self.sources)}; restore with the data config the state was saved with")
        self._drawn = [int(x) for x in state["drawn"]]
        self._tokens = [int(x) for x in state["tokens"]]
        self._buffer: list[tuple[np.ndarray, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        self._draw()
        self._offset = int(state["offset"])
        if not 0 <= self._offset < len(self._buffer[0][0]):
            raise DataError(f"iterator state for slot {self.slot} has offset {self._offset} outside its document; "
                            "the state does not belong to this data config")

    def _draw(self) -> None:
        snapshot = (tuple(self._drawn), tuple(self._tokens))
        i = min((t / w, i) for i, (t, w) in enumerate(zip(self._tokens, self.weights)) if w > 0)[1]
        j = self._shuffled(i, self._drawn[i])
        doc = self.sources[i].doc(self.slot + j * self.num_slots)
        unit = np.empty(len(doc) + 1, np.int32)
        unit[0] = self.eos_id
        unit[1:] = doc
        self._drawn[i] += 1
        self._tokens[i] += len(unit)
        self._buffer.append((unit, snapshot))

    def _shuffled(self, source: int, n: int) -> int:
        """The slot-local index of the ``n``-th document drawn from ``source`` (a new permutation every epoch)."""
        size = self.local[source]
        epoch, j = divmod(n, size)
        key = (source, epoch)
        order = self._orders.get(key)
        if order is None:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # one epoch per source
            seed = _shuffle_seed(self.seed, source, self.slot, epoch)
            # Small epochs: a cached permutation (grain's index_shuffle is slow on tiny domains). Large epochs: the
            # lazy index_shuffle, O(1) memory.
            order = np.random.default_rng(seed).permutation(size).astype(np.uint32) if size <= _SMALL_EPOCH else seed
            self._orders[key] = order
        if isinstance(order, np.ndarray):
            return int(order[j])
        return index_shuffle(j, max_index=size - 1, seed=order, rounds=4)

    def next_row(self, out: dict[str, np.ndarray]) -> None:
        """Writes the next row into the 1-D views ``out[key]`` (length seq_len) and advances by seq_len tokens."""
        need = self.seq_len + 1
        have = len(self._buffer[0][0]) - self._offset
        b = 1
        while have < need:
            if b == len(self._buffer):
                self._draw()
            have += len(self._buffer[b][0])
            b += 1
        window = np.empty(need, np.int32)
        starts = np.zeros(self.seq_len, bool)
        pos, off = 0, self._offset
        for unit, _ in self._buffer[:b]:
            n = min(len(unit) - off, need - pos)
            window[pos:pos + n] = unit[off:off + n]
            if off == 0 and pos < self.seq_len:
                starts[pos] = True
            pos, off = pos + n, 0
        starts[0] = True
        out["inputs"][:] = window[:-1]
        out["targets"][:] = window[1:]
        out["segment_ids"][:] = np.cumsum(starts)
        idx = np.arange(self.seq_len)
        out["positions"][:] = idx - np.maximum.accumulate(np.where(starts, idx, 0))
        out["loss_mask"][:] = 1.0
        # Advance by seq_len: the window's last token is the next row's first input.
        self._offset += self.seq_len
        while self._offset >= len(self._buffer[0][0]):
            self._offset -= len(self._buffer[0][0])
            self._buffer.pop(0)
            if not self._buffer:
                self._draw()


# --------------------------------------------------------------------------------------------------------------------
# The batch iterator.


class BatchIterator:
    """Yields ``{inputs, targets, segment_ids, positions, loss_mask}``, each ``[islands, rows, seq_len]``.

    ``get_state()`` / ``set_state()`` checkpoint the position exactly; ``close()`` stops the prefetch thread.
    """

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], *, seq_len: int, batch_size: int,
                 seed: int, eos_id: int, num_islands: int, islands: Sequence[int], rows: range, prefetch: int,
                 fingerprint: str):
        self.seq_len, self.batch_size, self.islands, self.rows = seq_len, batch_size, list(islands), rows
        self.fingerprint = fingerprint
        num_slots = num_islands * batch_size
        self._slots = {i * batch_size + r: _SlotStream(sources, weights, i * batch_size + r, num_slots, seed,
                                                       eos_id, seq_len)
                       for i in self.islands for r in rows}
        self._step = 0
        self._prefetch = prefetch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._closed = False
        self._consumed_state: dict[str, Any] | None = None

    # Production (the prefetch thread, or the caller's thread when prefetch == 0).
    def _produce(self) -> dict[str, np.ndarray]:
        shape = (len(self.islands), len(self.rows), self.seq_len)
        batch = {k: np.empty(shape, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        for a, i in enumerate(self.islands):
            for b, r in enumerate(self.rows):
                self._slots[i * self.batch_size + r].next_row({k: v[a, b] for k, v in batch.items()})
        return batch

    def _state_now(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "step": self._step,
                "slots": {str(s): st.get_state() for s, st in sorted(self._slots.items())}}

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._produce()
                self._step += 1
                item: Any = (batch, self._state_now())
            except BaseException as e:  # surfaced to the consumer on its next()
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _start(self) -> None:
        if self._prefetch and self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self._prefetch)
            self._thread = threading.Thread(target=self._worker, name="intellect-jax-data", daemon=True)
            self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    # Public interface.
    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("the data iterator is closed")
        if not self._prefetch:
            batch = self._produce()
            self._step += 1
            self._consumed_state = self._state_now()
            return batch
        self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._halt()
            raise item
        batch, self._consumed_state = item
        return batch

    def next(self) -> dict[str, np.ndarray]:
        return self.__next__()

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned by next() (JSON-serialisable)."""
        if self._consumed_state is None:  # nothing consumed yet: the worker has not run, the state is initial
            self._consumed_state = self._state_now()
        return json.loads(json.dumps(self._consumed_state))

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position from get_state() (or a merge_states() of several processes' states)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}; it was "
                            "written by another version of intellect-jax")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("the data iterator state was saved with a different data config (sources, weights, "
                            "seq_len, batch_size, seed or number of islands); resume with the same data.* settings "
                            "and islands, or start the data stream afresh")
        missing = [s for s in self._slots if str(s) not in state["slots"]]
        if missing:
            raise DataError(f"the data iterator state has no position for slots {missing[:8]} "
                            f"(slot = island * batch_size + row); merge every process's state with "
                            "intellect_jax.data.merge_states() before restoring on another process layout")
        self._halt()
        for s, stream in self._slots.items():
            stream.set_state(state["slots"][str(s)])
        self._step = int(state["step"])
        self._consumed_state = self._state_now()

    def close(self) -> None:
        self._halt()
        self._closed = True

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merges per-process iterator states of one run (same step) into one state that restores any layout."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    steps = {s["step"] for s in states}
    fps = {s["fingerprint"] for s in states}
    if len(steps) != 1 or len(fps) != 1:
        raise DataError(f"cannot merge data iterator states of different steps {sorted(steps)} or data configs; "
                        "save every process's state at the same step of the same run")
    merged = {"version": STATE_VERSION, "fingerprint": fps.pop(), "step": steps.pop(), "slots": {}}
    for s in states:
        merged["slots"].update(s["slots"])
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Entry points.


def _fingerprint(cfg: DataConfig, num_islands: int, extra: Sequence[Any]) -> str:
    key = json.dumps([cfg.kind, cfg.seq_len, cfg.batch_size, cfg.seed, num_islands, cfg.synthetic_docs,
                      [[s.name or s.path, s.weight] for s in cfg.sources], list(extra)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def source_name(s: SourceConfig) -> str:
    return s.name or Path(s.path).name


def open_sources(cfg: DataConfig) -> tuple[list[ShardSource], list[float]]:
    """Opens the prepared sources with positive weight and checks they agree on tokenizer and EOS."""
    chosen = [s for s in cfg.sources if s.weight > 0]
    srcs = [ShardSource(s.path, name=source_name(s), verify_checksums=cfg.verify_checksums) for s in chosen]
    shas = {src.manifest.tokenizer_sha256 for src in srcs}
    if len(shas) > 1:
        listing = ", ".join(f"{src.name}: {src.manifest.tokenizer_sha256[:12]}" for src in srcs)
        raise DataError(f"the data sources were tokenized with different tokenizers ({listing}); re-prepare them "
                        "with one tokenizer (`prepare-data --tokenizer tokenizer.json`)")
    if cfg.tokenizer:
        p = Path(cfg.tokenizer).expanduser()
        if not p.is_file():
            raise DataError(f"data.tokenizer={cfg.tokenizer!r} does not exist; give a tokenizer.json path or '' to "
                            "use the one recorded in the sources' manifests")
        sha = sha256_file(p)
        if shas and sha not in shas:
            raise DataError(f"data.tokenizer={cfg.tokenizer!r} (sha256 {sha[:12]}) is not the tokenizer the "
                            f"sources were prepared with ({next(iter(shas))[:12]}); point data.tokenizer at the "
                            "tokenizer.json in the prepared directory, or re-prepare the data with this tokenizer")
    eos = {src.manifest.eos_id for src in srcs}
    if len(eos) > 1:
        raise DataError(f"the data sources record different EOS ids {sorted(eos)}; re-prepare them with one "
                        "tokenizer")
    return srcs, [s.weight for s in chosen]


def make_iterator(cfg: DataConfig, *, vocab_size: int, num_islands: int = 1, islands: Sequence[int] | None = None,
                  row_start: int = 0, row_stop: int | None = None, eos_id: int | None = None) -> BatchIterator:
    """The batch iterator for ``islands`` (default: all) and rows ``[row_start, row_stop)`` of each island's batch.

    Batches are ``[len(islands), row_stop - row_start, seq_len]``; the content of (step, island, row) depends only
    on ``cfg``, ``vocab_size`` and ``num_islands``. For ``kind="prepared"`` the EOS id comes from the manifests
    (an ``eos_id`` that disagrees is an error); for ``kind="synthetic"`` it defaults to 0.
    """
    cfg.validate()
    islands = list(range(num_islands)) if islands is None else [int(i) for i in islands]
    row_stop = cfg.batch_size if row_stop is None else row_stop
    if num_islands < 1:
        raise ValueError(f"num_islands={num_islands} must be >= 1")
    if not islands or any(not 0 <= i < num_islands for i in islands) or len(set(islands)) != len(islands):
        raise ValueError(f"islands={islands} must be distinct ids in [0, {num_islands})")
    if not 0 <= row_start < row_stop <= cfg.batch_size:
        raise ValueError(f"rows [{row_start}, {row_stop}) must be a non-empty range within data.batch_size="
                         f"{cfg.batch_size}")
    if cfg.kind == "synthetic":
        eos = 0 if eos_id is None else eos_id
        sources: list[DocumentSource] = [SyntheticSource(vocab_size, eos, cfg.synthetic_docs)]
        weights = [1.0]
        extra: list[Any] = [vocab_size, eos]
    else:
        srcs, weights = open_sources(cfg)
        eos = srcs[0].manifest.eos_id
        if eos_id is not None and eos_id != eos:
            raise DataError(f"eos_id={eos_id} differs from the EOS id {eos} recorded in the prepared data; the "
                            "data and tokenizer do not match")
        big = max(src.manifest.vocab_size for src in srcs)
        if big > vocab_size:
            raise DataError(f"the prepared data's tokenizer has {big} tokens but model.vocab_size={vocab_size}; "
                            f"set model.vocab_size >= {big}")
        sources = list(srcs)
        extra = [[src.manifest.raw.get("tokens"), src.manifest.tokenizer_sha256] for src in srcs]
    it = BatchIterator(sources, weights, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, eos_id=eos,
                       num_islands=num_islands, islands=islands, rows=range(row_start, row_stop),
                       prefetch=cfg.prefetch, fingerprint=_fingerprint(cfg, num_islands, extra))
    return it


def ensure_prepared(cfg: DataConfig) -> None:
    """Prepares missing sources that name an ``auto_prepare`` recipe (logged); a missing plain source is an error."""
    if cfg.kind != "prepared":
        return
    for i, s in enumerate(cfg.sources):
        out = Path(s.path).expanduser()
        if (out / MANIFEST).is_file():
            if s.auto_prepare:
                m = read_manifest(out)
                want = s.auto_prepare_vocab_size
                if m.raw.get("recipe") == s.auto_prepare and m.vocab_size != want:
                    raise DataError(
                        f"data.sources[{i}] at {str(out)!r} was prepared with a vocabulary of {m.vocab_size}, but "
                        f"auto_prepare_vocab_size={want}; point the source at another path or delete the directory")
            continue
        if not s.auto_prepare:
            read_manifest(out)  # raises the "prepare it with ..." error
        from intellect_jax.prepare_data import prepare_recipe

        log.warning("data source %r: no prepared data at %s; preparing the %r recipe now (byte-level BPE, vocab "
                    "%d; runs once, 10-30 s on 2 cores)", source_name(s), out, s.auto_prepare,
                    s.auto_prepare_vocab_size)
        prepare_recipe(s.auto_prepare, out, vocab_size=s.auto_prepare_vocab_size, progress=False)


def tokenizer_path(cfg: DataConfig) -> Path | None:
    """The tokenizer.json the data was tokenized with: data.tokenizer, else the one beside the first source's shards."""
    if cfg.tokenizer:
        return Path(cfg.tokenizer).expanduser()
    if cfg.kind != "prepared":
        return None
    for s in cfg.sources:
        d = Path(s.path).expanduser()
        if s.weight > 0 and (d / MANIFEST).is_file():
            name = read_manifest(d).raw.get("tokenizer_file") or ""
            if name and (d / name).is_file():
                return d / name
    return None
