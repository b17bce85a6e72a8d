"""Tests for intellect_jax.data: layout independence, packing, disjoint coverage, mixture, exact resume (also through
Orbax checkpoints), errors."""

import dataclasses
import json
import math

import numpy as np
import pytest

from intellect_jax import data
from intellect_jax.checkpoint import CheckpointError
from intellect_jax.config import ConfigError, DataConfig, SourceConfig, load_config
from intellect_jax.data import (BATCH_KEYS, DataError, SyntheticSource, ensure_prepared, make_iterator, merge_states,
                                tokenizer_path)
from intellect_jax.prepare_data import write_dataset

EOS = 0
STRIDE = 1000  # token = doc * STRIDE + position + 1: every token names its document and position


def tagged_docs(n, lo=3, hi=40, seed=0, first=0):
    rng = np.random.default_rng(seed)
    return [(first + k) * STRIDE + 1 + np.arange(int(rng.integers(lo, hi))) for k in range(n)]


def write(tmp_path, name, docs, vocab=1 << 24, sha="tok-a"):
    return write_dataset(tmp_path / name, docs, eos_id=EOS, vocab_size=vocab, tokenizer_sha256=sha,
                         shard_tokens=500)


def prepared_cfg(tmp_path, names_weights, **kw):
    sources = tuple(SourceConfig(name=n, path=str(tmp_path / n), weight=w) for n, w in names_weights)
    return DataConfig(kind="prepared", sources=sources, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------------
# Interface and layout.


def test_shapes_dtypes_and_ranges():
    cfg = DataConfig(seq_len=24, batch_size=5, prefetch=0)
    with make_iterator(cfg, vocab_size=50, num_islands=3, islands=[0, 2], row_start=1, row_stop=4) as it:
        b = next(it)
    for k in BATCH_KEYS:
        assert b[k].shape == (2, 3, 24), k
    assert {k: b[k].dtype.name for k in BATCH_KEYS} == {
        "inputs": "int32", "targets": "int32", "segment_ids": "int32", "positions": "int32", "loss_mask": "float32"}
    assert b["inputs"].min() >= 0 and b["inputs"].max() < 50
    assert np.all(b["loss_mask"] == 1) and np.all(b["segment_ids"] >= 1)
    np.testing.assert_array_equal(b["inputs"][..., 1:], b["targets"][..., :-1])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_batches_do_not_depend_on_process_layout(prefetch):
    cfg = DataConfig(seq_len=16, batch_size=4, prefetch=prefetch, synthetic_docs=500)
    with make_iterator(cfg, vocab_size=40, num_islands=2) as full:
        whole = take(full, 12)
    # Four "processes", each loading one island's half batch.
    for island in (0, 1):
        for lo, hi in ((0, 2), (2, 4)):
            with make_iterator(cfg, vocab_size=40, num_islands=2, islands=[island], row_start=lo, row_stop=hi) as p:
                part = take(p, 12)
            assert_same(part, [{k: w[k][island:island + 1, lo:hi] for k in BATCH_KEYS} for w in whole])


def test_seed_changes_order_not_content(tmp_path):
    a = next(make_iterator(DataConfig(seq_len=64, batch_size=2, prefetch=0, seed=0), vocab_size=64))
    b = next(make_iterator(DataConfig(seq_len=64, batch_size=2, prefetch=0, seed=1), vocab_size=64))
    assert not np.array_equal(a["inputs"], b["inputs"])
    # Each reading slot's first epoch, read back from its packed rows (the inputs of consecutive rows tile the slot's
    # stream: each document after an EOS): under every seed it is exactly the slot's own documents (every 2nd), each
    # once, and the seeds put them in different orders.
    docs = tagged_docs(40, lo=3, hi=30)
    write(tmp_path, "a", docs)
    epochs = {}
    for seed in (0, 1, 2):
        cfg = prepared_cfg(tmp_path, [("a", 1.0)], seq_len=32, batch_size=2, prefetch=0, seed=seed)
        with make_iterator(cfg, vocab_size=1 << 24) as it:
            rows = take(it, 40)  # > 2 epochs of a slot's ~20 x 17 tokens
        for slot in range(2):
            stream = np.concatenate([r["inputs"][0, slot] for r in rows])
            cuts = np.flatnonzero(stream == EOS)
            assert cuts[0] == 0 and len(cuts) > 21  # an EOS before every document; more than an epoch read
            first = [tuple(d[1:]) for d in np.split(stream, cuts)[1:21]]  # whole documents: an EOS follows each
            own = [tuple(d) for d in docs[slot::2]]
            assert sorted(first) == sorted(own), (seed, slot)
            epochs[seed, slot] = first
    for slot in range(2):
        assert len({tuple(epochs[seed, slot]) for seed in (0, 1, 2)}) == 3, slot


# ---------------------------------------------------------------------------------------------------------------------
# Packing.


def test_packing_boundaries_and_segments(tmp_path):
    docs = tagged_docs(120, lo=1, hi=30)
    write(tmp_path, "a", docs)
    cfg = prepared_cfg(tmp_path, [("a", 1.0)], seq_len=32, batch_size=3, prefetch=0)
    rows_by_slot = {s: [] for s in range(6)}
    with make_iterator(cfg, vocab_size=1 << 24, num_islands=2) as it:
        for b in take(it, 15):
            for i in range(2):
                for r in range(3):
                    rows_by_slot[i * 3 + r].append({k: b[k][i, r] for k in BATCH_KEYS})
    for rows in rows_by_slot.values():
        for prev, row in zip(rows, rows[1:]):
            assert row["inputs"][0] == prev["targets"][-1], "rows of a slot must continue the same stream"
        for row in rows:
            inp, tgt, seg, pos = row["inputs"], row["targets"], row["segment_ids"], row["positions"]
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
            np.testing.assert_array_equal(inp[1:], tgt[:-1])
            for s in np.unique(seg):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment is contiguous"
                np.testing.assert_array_equal(pos[idx], np.arange(len(idx)), err_msg="positions restart at 0")
                toks = inp[idx]
                if toks[0] == EOS:  # a document starts here: EOS then its first tokens
                    body = toks[1:]
                    if len(body):
                        assert body[0] % STRIDE == 1, "after EOS comes the document's first token"
                else:
                    assert idx[0] == 0, "only a row's first segment may continue a document"
                    body = toks
                assert np.all(body != EOS), "EOS only opens a segment"
                if len(body):
                    assert np.all(body // STRIDE == body[0] // STRIDE), "one document per segment"
                    np.testing.assert_array_equal(np.diff(body), 1, err_msg="document tokens in order, none lost")
                    d = body[0] // STRIDE
                    last_pos = idx[-1]
                    if body[-1] - d * STRIDE == len(docs[d]):  # the document ends inside this row
                        assert tgt[last_pos] == EOS, "a document's last token predicts EOS"
                # A segment boundary inside the row is exactly where the next document's EOS stands.
                if idx[-1] + 1 < len(inp):
                    assert inp[idx[-1] + 1] == EOS


def test_synthetic_is_a_learnable_progression():
    src = SyntheticSource(vocab_size=97, eos_id=0, num_docs=200)
    hits = total = 0
    for k in range(200):
        d = src.doc(k)
        assert np.all(d != 0) and d.max() < 97 and 4 <= len(d) <= 192
        x = np.where(d > 0, d - 1, d)
        step = (x[2:] - x[1:-1]) % 96 == (x[1:-1] - x[:-2]) % 96
        hits, total = hits + step.sum(), total + len(step)
    assert hits / total > 0.7  # ~0.9^3 of triples follow the progression
    np.testing.assert_array_equal(src.doc(5), SyntheticSource(97, 0, 200).doc(5))


def test_synthetic_loss_falls_with_a_bigram_model():
    """The synthetic task is learnable: a bigram model trained on the batches beats ln(V) clearly in 100 steps."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    vocab = 64
    it = make_iterator(DataConfig(seq_len=64, batch_size=16, prefetch=2), vocab_size=vocab)
    w = jnp.zeros((vocab, vocab))
    opt = optax.adam(0.1)
    st = opt.init(w)

    @jax.jit
    def step(w, st, x, y, m):
        def loss(w):
            lp = jax.nn.log_softmax(w[x])
            return -(jnp.take_along_axis(lp, y[..., None], -1)[..., 0] * m).sum() / m.sum()
        val, g = jax.value_and_grad(loss)(w)
        upd, st = opt.update(g, st)
        return optax.apply_updates(w, upd), st, val

    losses = []
    for _ in range(100):
        b = next(it)
        w, st, val = step(w, st, b["inputs"], b["targets"], b["loss_mask"])
        losses.append(float(val))
    it.close()
    assert losses[0] == pytest.approx(math.log(vocab), rel=1e-3)
    assert np.mean(losses[-10:]) < 0.6 * math.log(vocab), losses[-10:]


# ---------------------------------------------------------------------------------------------------------------------
# Disjointness and coverage.


def doc_starts(rows):
    """Documents in the order a slot starts them (a segment opening with EOS followed by the first token)."""
    out = []
    for row in rows:
        for t in np.flatnonzero(row["inputs"] == EOS):
            out.append(int(row["targets"][t] // STRIDE))
    return out


@pytest.mark.parametrize("small_epoch", [8192, 0], ids=["cached-permutation", "grain-index-shuffle"])
def test_islands_and_processes_are_disjoint_and_cover_each_epoch(tmp_path, monkeypatch, small_epoch):
    monkeypatch.setattr(data, "_SMALL_EPOCH", small_epoch)
    n_docs = 90
    write(tmp_path, "a", tagged_docs(n_docs, lo=2, hi=12))
    cfg = prepared_cfg(tmp_path, [("a", 1.0)], seq_len=16, batch_size=3, prefetch=2)
    n_slots = 2 * 3
    seen: dict[tuple[int, int], list[int]] = {}
    # Two processes per island, each loading part of the rows, as a multi-host run would.
    for island in (0, 1):
        for lo, hi in ((0, 1), (1, 3)):
            with make_iterator(cfg, vocab_size=1 << 24, num_islands=2, islands=[island], row_start=lo,
                               row_stop=hi) as it:
                batches = take(it, 40)
            for r in range(lo, hi):
                seen[(island, r)] = doc_starts([{k: b[k][0, r - lo] for k in ("inputs", "targets")}
                                                for b in batches])
    per_slot = n_docs // n_slots
    epoch1 = {}
    for (island, r), docs in seen.items():
        assert len(docs) >= 2 * per_slot, "test must run each slot through two epochs"
        first, second = docs[:per_slot], docs[per_slot:2 * per_slot]
        assert len(set(first)) == per_slot, f"slot {(island, r)} repeated a document within an epoch"
        assert set(second) == set(first) and second != first, "each epoch: same documents, new order"
        epoch1[(island, r)] = set(first)
    union = set().union(*epoch1.values())
    assert sum(len(s) for s in epoch1.values()) == len(union), "two slots (islands/processes) read one document"
    assert union == set(range(n_docs)), "together the slots cover every document"


def test_too_few_documents_for_the_slots(tmp_path):
    write(tmp_path, "a", tagged_docs(5))
    cfg = prepared_cfg(tmp_path, [("a", 1.0)], seq_len=8, batch_size=4)
    with pytest.raises(DataError, match="fewer than the 8 reading slots"):
        make_iterator(cfg, vocab_size=1 << 24, num_islands=2)


# ---------------------------------------------------------------------------------------------------------------------
# Mixture.

INTELLECT1_MIX = """
[data]
kind = "prepared"
seq_len = 64
batch_size = 4
[[data.sources]]
name = "fineweb-edu"
path = "{d}/fineweb-edu"
weight = 55
[[data.sources]]
name = "fineweb"
path = "{d}/fineweb"
weight = 10
[[data.sources]]
name = "stack"
path = "{d}/stack"
weight = 20
[[data.sources]]
name = "dclm"
path = "{d}/dclm"
weight = 10
[[data.sources]]
name = "openwebmath"
path = "{d}/openwebmath"
weight = 5
"""


def test_intellect1_mixture_proportions(tmp_path):
    toml = tmp_path / "mix.toml"
    toml.write_text(INTELLECT1_MIX.format(d=tmp_path))
    cfg = load_config(toml).data
    names = [s.name for s in cfg.sources]
    weights = np.array([s.weight for s in cfg.sources]) / sum(s.weight for s in cfg.sources)
    max_unit = 60
    for j, n in enumerate(names):  # source j's documents are numbered from j * 1000: tokens name their source
        # Mean document lengths differ by source (7 ... 47 tokens): weights are shares of tokens, not of documents.
        write(tmp_path, n, tagged_docs(200, lo=3 + 8 * j, hi=12 + 12 * j, seed=j, first=j * 1000))
    n_steps = 60
    counts = np.zeros(len(names))
    with make_iterator(cfg, vocab_size=1 << 24, num_islands=2) as it:
        for b in take(it, n_steps):
            tok = b["targets"][b["targets"] != EOS]
            counts += np.bincount(tok // (1000 * STRIDE), minlength=len(names))
    shares = counts / counts.sum()
    # Deterministic bound, per slot: drawn tokens stay within one document of the weights, and consumed tokens lag
    # drawn ones by at most one row plus one document. Summed over slots, relative to all consumed tokens:
    n_slots, consumed = 2 * 4, counts.sum()
    tol = n_slots * (2 * max_unit + cfg.seq_len) / consumed
    assert tol < 0.08, "sample too small for a meaningful check"
    np.testing.assert_allclose(shares, weights, atol=tol)


def test_zero_weight_source_is_never_read(tmp_path):
    write(tmp_path, "a", tagged_docs(50))
    write(tmp_path, "b", tagged_docs(50, first=10000))
    cfg = prepared_cfg(tmp_path, [("a", 1.0), ("b", 0.0)], seq_len=32, batch_size=2, prefetch=0)
    with make_iterator(cfg, vocab_size=1 << 24) as it:
        for b in take(it, 20):
            assert b["inputs"].max() < 10000 * STRIDE


def test_source_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="weights sum to 0"):
        prepared_cfg(tmp_path, [("a", 0.0), ("b", 0.0)]).validate()
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        prepared_cfg(tmp_path, [("a", -1.0)]).validate()
    with pytest.raises(ConfigError, match="repeats the source 'a'"):
        prepared_cfg(tmp_path, [("a", 1.0), ("a", 2.0)]).validate()
    bad = DataConfig(kind="prepared", sources=(SourceConfig(path="x", auto_prepare="wikipedia"),))
    with pytest.raises(ConfigError, match="not a known recipe"):
        bad.validate()
    small = DataConfig(kind="prepared", sources=(SourceConfig(path="x", auto_prepare="python-stdlib",
                                                              auto_prepare_vocab_size=100),))
    with pytest.raises(ConfigError, match="auto_prepare_vocab_size=100"):
        small.validate()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpointing.


@pytest.mark.parametrize("kind", ["synthetic", "prepared"])
def test_stop_save_restore_continue_is_identical(tmp_path, kind):
    if kind == "prepared":
        write(tmp_path, "a", tagged_docs(80, lo=2, hi=70))
        write(tmp_path, "b", tagged_docs(80, lo=2, hi=70, first=5000))
        cfg = prepared_cfg(tmp_path, [("a", 2.0), ("b", 1.0)], seq_len=32, batch_size=4, prefetch=2)
    else:
        cfg = DataConfig(seq_len=32, batch_size=4, prefetch=2, synthetic_docs=300)
    kw = dict(vocab_size=1 << 24 if kind == "prepared" else 128, num_islands=2)
    with make_iterator(cfg, **kw) as it:
        uninterrupted = take(it, 25)
    with make_iterator(cfg, **kw) as it:
        take(it, 10)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        assert state["step"] == 10
        take(it, 3)  # the prefetch thread runs ahead; rewinding must discard what it prepared
        it.set_state(state)
        assert_same(take(it, 4), uninterrupted[10:14])
    with make_iterator(cfg, **kw) as it:
        it.set_state(state)
        assert_same(take(it, 15), uninterrupted[10:])
    # Saved by two processes (one island each), restored by one process loading both islands.
    states = []
    for island in (0, 1):
        with make_iterator(cfg, **kw, islands=[island]) as p:
            take(p, 7)
            states.append(p.get_state())
    with make_iterator(cfg, **kw) as it:
        it.set_state(merge_states(states))
        assert_same(take(it, 5), uninterrupted[7:12])


def test_state_of_another_config_is_refused():
    with make_iterator(DataConfig(seq_len=16, batch_size=2, prefetch=0), vocab_size=32) as it:
        next(it)
        state = it.get_state()
    with make_iterator(DataConfig(seq_len=16, batch_size=2, prefetch=0, seed=3), vocab_size=32) as other:
        with pytest.raises(DataError, match="different data config"):
            other.set_state(state)
    with make_iterator(DataConfig(seq_len=16, batch_size=2, prefetch=0), vocab_size=32, islands=[0]) as it:
        s = dict(state, slots={"1": state["slots"]["1"]})
        with pytest.raises(DataError, match="no position for slots"):
            it.set_state(s)


# ---------------------------------------------------------------------------------------------------------------------
# Errors and helpers.


def test_missing_dataset_and_shard_errors(tmp_path):
    cfg = prepared_cfg(tmp_path, [("a", 1.0)], seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="manifest.json is missing.*prepare-data"):
        make_iterator(cfg, vocab_size=1 << 24)
    with pytest.raises(DataError, match="manifest.json is missing"):
        ensure_prepared(cfg)
    write(tmp_path, "a", tagged_docs(30))
    shard = tmp_path / "a" / "shard-00000.tokens.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its sha256"):
        next(make_iterator(cfg, vocab_size=1 << 24))
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        make_iterator(cfg, vocab_size=1 << 24)
    shard.unlink()
    with pytest.raises(DataError, match="is missing; re-run"):
        make_iterator(cfg, vocab_size=1 << 24)


def test_tokenizer_and_vocab_mismatches(tmp_path):
    write(tmp_path, "a", tagged_docs(20), sha="one")
    write(tmp_path, "b", tagged_docs(20), sha="two")
    with pytest.raises(DataError, match="different tokenizers"):
        make_iterator(prepared_cfg(tmp_path, [("a", 1.0), ("b", 1.0)], seq_len=8, batch_size=1), vocab_size=1 << 24)
    other = tmp_path / "other.json"
    other.write_text("{}")
    cfg = prepared_cfg(tmp_path, [("a", 1.0)], seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="is not the tokenizer the sources were prepared with"):
        make_iterator(DataConfig(**{**cfg.__dict__, "tokenizer": str(other)}), vocab_size=1 << 24)
    with pytest.raises(DataError, match="set model.vocab_size >= 16777216"):
        make_iterator(cfg, vocab_size=4096)
    with pytest.raises(DataError, match="eos_id=3 differs"):
        make_iterator(cfg, vocab_size=1 << 24, eos_id=3)
    assert tokenizer_path(cfg) is None  # write_dataset without a tokenizer.json
    assert tokenizer_path(DataConfig()) is None


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="no non-empty documents"):
        write(tmp_path, "a", [[], np.zeros(0, int)])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpointing the loader through Orbax (Grain's handler).


def _two_island_cfg():
    return DataConfig(seq_len=32, batch_size=3, prefetch=2, synthetic_docs=300)


def test_checkpointer_saves_and_restores_the_loader(tmp_path):
    from intellect_jax.checkpoint import Checkpointer
    from intellect_jax.config import CheckpointConfig

    cfg, kw = _two_island_cfg(), dict(vocab_size=128, num_islands=2)
    with make_iterator(cfg, **kw) as it:
        uninterrupted = take(it, 12)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    try:
        with make_iterator(cfg, **kw) as it:
            take(it, 5)
            ckpt.save(5, {}, {"meta": {"step": 5}}, data=it)
            take(it, 4)  # the loader runs on while the save completes; the saved position stays at step 5
            ckpt.wait()
        assert ckpt.item_names(5) == {"meta", "data"}
        with make_iterator(cfg, **kw) as it:
            ckpt.restore_data(5, it)
            assert it.get_state()["step"] == 5
            assert_same(take(it, 7), uninterrupted[5:])
        # Another process layout of the same run: one process loading only island 1, rows 1-2.
        with make_iterator(cfg, **kw, islands=[1], row_start=1, row_stop=3) as part:
            ckpt.restore_data(5, part)
            assert_same(take(part, 3), [{k: b[k][1:2, 1:3] for k in BATCH_KEYS} for b in uninterrupted[5:8]])
        with make_iterator(dataclasses.replace(cfg, seed=9), **kw) as other:
            with pytest.raises(DataError, match="different data config"):
                ckpt.restore_data(5, other)
    finally:
        ckpt.close()


def test_restore_merges_the_states_of_every_saving_process(tmp_path):
    """A checkpoint written by two processes (one island each) restores onto one process loading both."""
    from intellect_jax.checkpoint import DataCheckpointHandler

    cfg, kw = _two_island_cfg(), dict(vocab_size=128, num_islands=2)
    with make_iterator(cfg, **kw) as it:
        uninterrupted = take(it, 10)
    for island in (0, 1):
        with make_iterator(cfg, **kw, islands=[island]) as p:
            take(p, 6)
            (tmp_path / f"process_{island}-of-2.json").write_text(json.dumps(p.get_state()))
    with make_iterator(cfg, **kw) as it:
        DataCheckpointHandler().restore(tmp_path, item=it)
        assert_same(take(it, 4), uninterrupted[6:])
    (tmp_path / "process_1-of-2.json").unlink()
    with make_iterator(cfg, **kw) as it, pytest.raises(CheckpointError, match="not one per process"):
        DataCheckpointHandler().restore(tmp_path, item=it)


def test_restore_data_refuses_checkpoints_without_a_loader_state(tmp_path):
    from intellect_jax.checkpoint import Checkpointer
    from intellect_jax.config import CheckpointConfig

    old = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    old.save(1, {}, {"meta": {"step": 1}})
    old.save(2, {}, {"meta": {"step": 2}, "data": {"version": 1}})  # how older versions stored the data state
    old.close()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    try:
        with make_iterator(_two_island_cfg(), vocab_size=128, num_islands=2) as it:
            with pytest.raises(CheckpointError, match="has no 'data' item"):
                ckpt.restore_data(1, it)
            with pytest.raises(CheckpointError, match="older intellect-jax"):
                ckpt.restore_data(2, it)
            with pytest.raises(CheckpointError, match="step 3 not found"):
                ckpt.restore_data(3, it)
    finally:
        ckpt.close()
