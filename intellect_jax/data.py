"""Training batches on Grain: per-(island, row) document streams, a token-share mixture, packing, prefetch.

Layout. A run reads ``num_slots = num_islands * batch_size`` independent token streams, one per (island, row)
"slot" (``slot = island * batch_size + row``). Slot ``s`` owns documents ``k`` with ``k % num_slots == s`` of every
source (``grain.MapDataset.source(src)[s::num_slots]``), so islands, and the processes that load parts of an
island's batch, never read the same document, and together they cover every document. Each slot walks its
documents in an order that is new every epoch, seeded from ``(data.seed, source, slot)``. The content of
``(step, island, row)`` therefore depends only on the config, never on how many processes load the batch or which
rows each one loads.

What Grain does: the random-access sources and the per-slot slicing (``MapDataset.source`` / ``slice``), the
per-epoch shuffle of large epochs (``shuffle().repeat()``), assembling the batch from the slots' rows
(``experimental.ZipIterDataset`` + ``map``), prefetch (``experimental.ThreadPrefetchIterDataset``), and the
iterator state that Orbax checkpoints through Grain's ``checkpoint.CheckpointHandler`` (see
:mod:`intellect_jax.checkpoint`).

Three small custom pieces, each a Grain dataset so the pipeline stays one Grain graph with one state:

* ``_SmallEpochShuffle`` (a ``MapDataset``): a slot's share of a source is often tiny (1,500 documents over 256
  slots is 6 per slot), and Grain's ``index_shuffle`` costs 0.2-2 ms per index on domains under 100 (20 us at
  1,000, 4 us at 8,192). Epochs of up to ``_SMALL_EPOCH`` documents use a cached numpy permutation per epoch instead.
* ``_TokenMix`` (an ``IterDataset``): sources are mixed by *tokens*: before every document a slot draws from the
  source with the smallest ``tokens_drawn / weight`` (ties to the first). This deterministic deficit rule keeps each
  slot's token shares within one document of the weights at every point. ``MapDataset.mix`` weights count
  *documents*; converting token weights through mean document lengths only holds on average, and with
  heavy-tailed lengths (web text) the shares drift by many documents over short horizons.
* ``_PackRows`` (an ``IterDataset``): the same rows as Grain's ``ConcatThenSplitIterDataset`` (no padding, same
  segment ids and positions; benchmarks/data_throughput.py checks them row for row) at 3-5x its speed there.
  Grain's ``FirstFitPackIterDataset`` keeps documents whole and so pads rows (1-4% on the demo corpus), and is
  slower still.

Packing (INTELLECT-1 style): each document becomes the pair ``inputs = [EOS d1 .. dn]``, ``targets = [d1 .. dn
EOS]``; a slot's pairs are concatenated and cut into rows of ``seq_len``. So a slot's stream is ``EOS d1
EOS d2 ...``, a row's targets are its inputs shifted by one (consecutive rows overlap by one token, every token is a
target exactly once), and no row is padded. A segment starts at every document's EOS and at the start of each row
(a document continued from the previous row is a new segment); ``positions`` restart at 0 per segment, so
per-document attention masking never lets a token see another document. The leading EOS acts as Llama's BOS: it
predicts a document's first token, and a document's last token predicts the next EOS. ``loss_mask`` is 1
everywhere; ``segment_ids == 0`` would mark padding.

Held-out evaluation. With evaluation on (``run.eval_every > 0``; the trainer passes ``hold_out=True``), every
``data.eval_holdout_every``-th document of each source (``k % m == m - 1``) is held out: the training streams read
the other documents exactly as above (slot ``s`` owns every ``num_slots``-th of *them*), and :func:`make_eval_set`
packs the held-out ones into a fixed evaluation set, the same in every process and every run (its order is seeded
by a constant, not ``data.seed``, so runs of different seeds are scored on the same tokens). With evaluation off
nothing is held out and the streams are exactly those of a run without this feature.

State. ``get_state()`` is a small JSON dict: per slot, the packer's state (the mixer's documents and tokens drawn
per source before the document under the cursor, and the cursor's offset in it). Every process holds only its slots;
:func:`merge_states` joins the states of several processes into one that restores any process layout of the run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset, ZipIterDataset

from intellect_jax.config import DataConfig, SourceConfig
from intellect_jax.shards import MANIFEST, DataError, Manifest, ShardSource, read_manifest, sha256_file

__all__ = ["BATCH_KEYS", "BatchIterator", "DataError", "Manifest", "ShardSource", "SyntheticSource",
           "ensure_prepared", "make_eval_set", "make_iterator", "merge_states", "open_sources", "read_manifest",
           "sha256_file", "tokenizer_path"]

log = logging.getLogger(__name__)

STATE_VERSION = 2
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_SMALL_EPOCH = 8192  # documents per slot and source up to which an epoch's permutation is materialised
_EVAL_SEED = 0x5EED0E7A  # the evaluation set's document order (fixed: independent of data.seed)


# --------------------------------------------------------------------------------------------------------------------
# Document sources: Grain random-access sources (``len`` and ``[k]`` -> a 1-D integer array of document k).


class DocumentSource(Protocol):
    name: str
    num_docs: int

    def __len__(self) -> int: ...

    def __getitem__(self, k: int) -> np.ndarray:
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

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, k: int) -> np.ndarray:
        return self.doc(k)

    def doc(self, k: int) -> np.ndarray:
        rng = np.random.default_rng((self._seed, k))
        v = self.vocab_size - 1  # token values other than EOS
        n = int(rng.integers(4, 193))
        a, b = int(rng.integers(0, v)), int(rng.integers(1, 5))
        x = (a + b * np.arange(n)) % v
        noise = rng.random(n) < 0.1
        x[noise] = rng.integers(0, v, int(noise.sum()))
        return np.where(x >= self.eos_id, x + 1, x).astype(np.int32)


class _EveryKth:
    """The held-out documents of a source (``k % m == m - 1``) or the others (``held_out=False``), in source order.

    A random-access source like the one it wraps, so the slots slice and shuffle it exactly as they would the source.
    """

    def __init__(self, src: DocumentSource, m: int, *, held_out: bool):
        self._src, self._m, self._held_out = src, m, held_out
        self.name = f"{src.name} (held out)" if held_out else src.name
        n_held = len(src) // m  # documents m-1, 2m-1, ... below len(src)
        self.num_docs = n_held if held_out else len(src) - n_held

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, j: int) -> np.ndarray:
        j, m = int(j), self._m
        return self._src[j * m + m - 1 if self._held_out else (j // (m - 1)) * m + j % (m - 1)]


# --------------------------------------------------------------------------------------------------------------------
# One slot's rows.


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class _SmallEpochShuffle(grain.MapDataset):
    """A finite MapDataset repeated forever in a new order every epoch (cached numpy permutation per epoch).

    Same contract as Grain's ``shuffle(seed).repeat()``, at ~0.1 us per index on small domains where Grain's
    ``index_shuffle`` takes 0.2-2 ms. Reads are sequential per slot, so one cached epoch suffices.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._size, self._seed = len(parent), seed
        self._epoch, self._order = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"_SmallEpochShuffle(size={self._size})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, self._size)
        if epoch != self._epoch:
            self._order = np.random.default_rng(_seed(self._seed, epoch)).permutation(self._size)
            self._epoch = epoch
        return self._parent[int(self._order[j])]


def _slot_documents(src: DocumentSource, source: int, slot: int, num_slots: int, seed: int) -> grain.MapDataset:
    """Slot ``slot``'s documents of ``src`` (every ``num_slots``-th), reshuffled every epoch, endless."""
    own = grain.MapDataset.source(src)[slot::num_slots]
    if len(own) == 0:
        raise DataError(
            f"source {src.name!r} has {src.num_docs} documents, fewer than the {num_slots} reading slots "
            f"(islands x data.batch_size); each slot needs its own documents. Prepare more data, or lower "
            f"data.batch_size or the number of islands")
    key = _seed(seed, source, slot)
    if len(own) <= _SMALL_EPOCH:
        return _SmallEpochShuffle(own, seed=key)
    return own.shuffle(seed=key).repeat()  # Grain reseeds its shuffle every epoch (seed + epoch)


class _TokenMix(grain.IterDataset):
    """Mixes endless document MapDatasets by token share (deficit rule) into ``{inputs, targets}`` pairs."""

    def __init__(self, sources: Sequence[grain.MapDataset], weights: Sequence[float], eos_id: int):
        super().__init__(list(sources))
        self._sources, self._weights, self._eos = list(sources), [float(w) for w in weights], eos_id

    def __iter__(self) -> "_TokenMixIterator":
        return _TokenMixIterator(self._sources, self._weights, self._eos)

    def __str__(self) -> str:
        return f"_TokenMix(weights={self._weights})"


class _TokenMixIterator(grain.DatasetIterator):
    def __init__(self, sources: Sequence[grain.MapDataset], weights: Sequence[float], eos_id: int):
        super().__init__()
        self._sources, self._weights, self._eos = sources, weights, eos_id
        self._live = [i for i, w in enumerate(weights) if w > 0]
        self._drawn = [0] * len(sources)
        self._tokens = [0] * len(sources)

    def __next__(self) -> dict[str, np.ndarray]:
        i = min(self._live, key=lambda i: (self._tokens[i] / self._weights[i], i))
        doc = self._sources[i][self._drawn[i]]
        unit = np.empty(len(doc) + 2, np.int32)
        unit[0] = unit[-1] = self._eos
        unit[1:-1] = doc
        self._drawn[i] += 1
        self._tokens[i] += len(doc) + 1
        return {"inputs": unit[:-1], "targets": unit[1:]}

    def get_state(self) -> dict[str, Any]:
        return {"drawn": list(self._drawn), "tokens": list(self._tokens)}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["drawn"]) != len(self._sources) or len(state["tokens"]) != len(self._sources):
            raise DataError(f"data iterator state has {len(state['drawn'])} sources, the config has "
                            f"{len(self._sources)}; restore with the data config the state was saved with")
        self._drawn = [int(x) for x in state["drawn"]]
        self._tokens = [int(x) for x in state["tokens"]]


class _Snapshot(dict):
    """A slot state, never mutated once built, so deep copies may share it: Grain's prefetch thread deep-copies
    every batch's state, which for 256 slots of nested dicts cost as much as packing the batch."""

    def __deepcopy__(self, memo: dict) -> "_Snapshot":
        return self


class _PackRows(grain.IterDataset):
    """Concat-then-split of a slot's ``{inputs, targets}`` pairs into full rows with segment ids and positions.

    The output equals ``ConcatThenSplitIterDataset(pairs, length_struct={"inputs": L, "targets": L})`` with its
    ``inputs_segment_ids`` / ``inputs_positions`` (benchmarks/data_throughput.py checks this row for row), 3-5x
    faster: Grain's version slices and copies every feature separately, through per-piece dataclasses, and builds
    segment ids and positions for ``targets`` too. Since a pair's targets are its inputs shifted by one with the
    next document's EOS last, a row is the window ``stream[kL:(k+1)L + 1]`` of the concatenated inputs.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> "_PackRowsIterator":
        return _PackRowsIterator(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"_PackRows(seq_len={self._seq_len})"


class _PackRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._idx = np.arange(seq_len, dtype=np.int32)
        # Documents (their ``inputs``: EOS d1 .. dn) not yet fully consumed, each with the parent state before it.
        self._units: collections.deque[tuple[np.ndarray, dict[str, Any]]] = collections.deque()
        self._offset = 0  # tokens of the first unit already consumed

    def _pull(self) -> None:
        before = self._parent.get_state()
        self._units.append((next(self._parent)["inputs"], before))

    def __next__(self) -> dict[str, np.ndarray]:
        L = self._seq_len
        window = np.empty(L + 1, np.int32)
        segment_ids = np.empty(L, np.int32)
        positions = np.empty(L, np.int32)
        pos, off, b, seg = 0, self._offset, 0, 0
        while pos <= L:
            if b == len(self._units):
                self._pull()
            unit = self._units[b][0]
            n = min(len(unit) - off, L + 1 - pos)
            window[pos:pos + n] = unit[off:off + n]
            if pos < L:  # a segment: a document's piece (from its EOS, or continued at the row start)
                end = min(pos + n, L)
                seg += 1
                segment_ids[pos:end] = seg
                positions[pos:end] = self._idx[:end - pos]
            pos, off, b = pos + n, 0, b + 1
        # Advance by L: the window's last token is the next row's first input.
        self._offset += L
        while self._units and self._offset >= len(self._units[0][0]):
            self._offset -= len(self._units.popleft()[0])
        return {"inputs": window[:-1], "targets": window[1:], "segment_ids": segment_ids, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        if self._units:
            return _Snapshot(parent=self._units[0][1], offset=self._offset)
        return _Snapshot(parent=self._parent.get_state(), offset=0)

    def set_state(self, state: dict[str, Any]) -> None:
        self._units.clear()
        self._parent.set_state(state["parent"])
        self._offset = int(state["offset"])
        if self._offset:
            self._pull()
            if not 0 < self._offset < len(self._units[0][0]):
                raise DataError(f"data iterator state has offset {self._offset} outside its document; the state "
                                "does not belong to this data config")


def _slot_rows(sources: Sequence[DocumentSource], weights: Sequence[float], slot: int, num_slots: int, seed: int,
               eos_id: int, seq_len: int) -> grain.IterDataset:
    """Slot ``slot``'s packed rows: ``{inputs, targets, segment_ids, positions}``, each ``[seq_len]``."""
    docs = [_slot_documents(src, i, slot, num_slots, seed) for i, src in enumerate(sources)]
    return _PackRows(_TokenMix(docs, weights, eos_id), seq_len)


# --------------------------------------------------------------------------------------------------------------------
# The batch iterator.


class BatchIterator(grain.DatasetIterator):
    """Yields ``{inputs, targets, segment_ids, positions, loss_mask}``, each ``[islands, rows, seq_len]``.

    A Grain ``DatasetIterator`` (so Grain's Orbax handler checkpoints it): ``get_state()`` / ``set_state()`` give
    the position exactly; ``close()`` stops the prefetch thread.
    """

    def __init__(self, pipeline: grain.IterDataset, slots: Sequence[int], fingerprint: str):
        self._it = pipeline.__iter__()
        super().__init__(self._it)
        self.slots, self.fingerprint = list(slots), fingerprint
        self._step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("the data iterator is closed")
        batch = next(self._it)
        self._step += 1
        return batch

    def next(self) -> dict[str, np.ndarray]:
        return self.__next__()

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned by next() (JSON-serialisable)."""
        parents = self._it.get_state()["parents"]
        state = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "step": self._step,
                 "slots": {str(s): st for s, st in zip(self.slots, parents)}}
        return json.loads(json.dumps(state))

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position from get_state() (or a merge_states() of several processes' states)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}; it was "
                            "written by another version of intellect-jax, whose data pipeline this one cannot "
                            "continue; resume without the data state (the streams restart) or use that version")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("the data iterator state was saved with a different data config (sources, weights, "
                            "seq_len, batch_size, seed, number of islands, or the held-out split of evaluation: "
                            "run.eval_every on or off, data.eval_holdout_every); resume with the same data.* settings, "
                            "islands and evaluation, or start the data stream afresh")
        missing = [s for s in self.slots if str(s) not in state["slots"]]
        if missing:
            raise DataError(f"the data iterator state has no position for slots {missing[:8]} "
                            f"(slot = island * batch_size + row); merge every process's state with "
                            "intellect_jax.data.merge_states() before restoring on another process layout")
        self._it.set_state({"parents": [state["slots"][str(s)] for s in self.slots]})
        self._step = int(state["step"])

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return f"BatchIterator(slots={len(self.slots)})"


def _pipeline(sources: Sequence[DocumentSource], weights: Sequence[float], *, seq_len: int, batch_size: int,
              seed: int, eos_id: int, num_islands: int, islands: Sequence[int], rows: range,
              prefetch: int) -> tuple[grain.IterDataset, list[int]]:
    """The Grain dataset of this process's batches (its islands x rows block), and the slots it reads."""
    num_slots = num_islands * batch_size
    slots = [i * batch_size + r for i in islands for r in rows]
    shape = (len(islands), len(rows), seq_len)
    ds = ZipIterDataset([_slot_rows(sources, weights, s, num_slots, seed, eos_id, seq_len) for s in slots])
    ds = ds.map(lambda rows: _stack(rows, shape))
    if prefetch:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds, slots


def _stack(rows: Sequence[dict[str, np.ndarray]], shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]).astype(np.int32, copy=False).reshape(shape) for k in BATCH_KEYS[:4]}
    batch["loss_mask"] = np.ones(shape, np.float32)
    return batch


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
                  row_start: int = 0, row_stop: int | None = None, eos_id: int | None = None,
                  hold_out: bool = False) -> BatchIterator:
    """The batch iterator for ``islands`` (default: all) and rows ``[row_start, row_stop)`` of each island's batch.

    Batches are ``[len(islands), row_stop - row_start, seq_len]``; the content of (step, island, row) depends only
    on ``cfg``, ``vocab_size``, ``num_islands`` and ``hold_out``. For ``kind="prepared"`` the EOS id comes from the
    manifests (an ``eos_id`` that disagrees is an error); for ``kind="synthetic"`` it defaults to 0. ``hold_out``
    (evaluation on): never read the documents of :func:`make_eval_set`.
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
    sources, weights, eos, extra = _documents(cfg, vocab_size, eos_id)
    if hold_out:
        sources = [_EveryKth(src, cfg.eval_holdout_every, held_out=False) for src in sources]
        extra = [*extra, ["hold_out", cfg.eval_holdout_every]]  # only then: without evaluation, the old fingerprint
    pipeline, slots = _pipeline(sources, weights, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                eos_id=eos, num_islands=num_islands, islands=islands,
                                rows=range(row_start, row_stop), prefetch=cfg.prefetch)
    return BatchIterator(pipeline, slots, _fingerprint(cfg, num_islands, extra))


def make_eval_set(cfg: DataConfig, *, vocab_size: int, eos_id: int | None = None) -> list[dict[str, np.ndarray]]:
    """The evaluation set: ``data.eval_batches`` batches of ``[batch_size, seq_len]`` rows, packed like training rows
    from the held-out documents (every ``data.eval_holdout_every``-th of each source, mixed by the same token shares).

    Deterministic: the same for every process, process layout, island count and ``data.seed``. Where the set needs
    more tokens than the held-out documents hold, documents repeat (logged).
    """
    cfg.validate()
    if cfg.eval_batches < 1:
        raise ValueError("make_eval_set needs data.eval_batches >= 1")
    sources, weights, eos, _ = _documents(cfg, vocab_size, eos_id)
    m = cfg.eval_holdout_every
    held = [_EveryKth(src, m, held_out=True) for src in sources]
    for src, h in zip(sources, held):
        if h.num_docs == 0:
            raise DataError(f"source {src.name!r} has {len(src)} documents, fewer than data.eval_holdout_every={m}, "
                            "so none is held out for evaluation; lower data.eval_holdout_every, or turn evaluation "
                            "off (run.eval_every=0)")
    it = _slot_rows(held, weights, 0, 1, _EVAL_SEED, eos, cfg.seq_len).__iter__()
    B = cfg.batch_size
    batches = [_stack([next(it) for _ in range(B)], (B, cfg.seq_len)) for _ in range(cfg.eval_batches)]
    drawn = it._parent.get_state()["drawn"]  # documents the mixer has handed to the packer, per source
    over = [f"{h.name}: {d} of {h.num_docs}" for h, d in zip(held, drawn) if d > h.num_docs]
    if over:
        log.warning("the evaluation set (%d batches of %d x %d tokens) needs more documents than are held out, so "
                    "some repeat (%s); lower data.eval_batches or data.eval_holdout_every", cfg.eval_batches, B,
                    cfg.seq_len, ", ".join(over))
    return batches


def _documents(cfg: DataConfig, vocab_size: int,
               eos_id: int | None) -> tuple[list[DocumentSource], list[float], int, list[Any]]:
    """(sources, token weights, EOS id, what identifies their content for the fingerprint) of a data config."""
    if cfg.kind == "synthetic":
        eos = 0 if eos_id is None else eos_id
        return [SyntheticSource(vocab_size, eos, cfg.synthetic_docs)], [1.0], eos, [vocab_size, eos]
    srcs, weights = open_sources(cfg)
    eos = srcs[0].manifest.eos_id
    if eos_id is not None and eos_id != eos:
        raise DataError(f"eos_id={eos_id} differs from the EOS id {eos} recorded in the prepared data; the "
                        "data and tokenizer do not match")
    big = max(src.manifest.vocab_size for src in srcs)
    if big > vocab_size:
        raise DataError(f"the prepared data's tokenizer has {big} tokens but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size >= {big}")
    extra = [[src.manifest.raw.get("tokens"), src.manifest.tokenizer_sha256] for src in srcs]
    return list(srcs), weights, eos, extra


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
