"""Tests for intellect_jax.prepare_data / tokenizer: formats, round trip, idempotence, recipe, CLI, errors."""

import argparse
import gzip
import json
import logging
import sys

import numpy as np
import pytest

from intellect_jax import prepare_data as pd
from intellect_jax import tokenizer as toklib
from intellect_jax.config import DataConfig, SourceConfig
from intellect_jax.data import DataError, ShardSource, ensure_prepared, make_iterator, read_manifest, tokenizer_path

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # number {i}\n" * (1 + i % 3) for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i, t in enumerate(TEXTS[:10]):
        (d / f"f{i:02d}.py").write_text(t)
    with open(d / "a.jsonl", "w") as f:
        for t in TEXTS[10:25]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
        f.write("\n")  # blank lines are skipped
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        for t in TEXTS[25:40]:
            f.write(json.dumps({"text": t}) + "\n")
    (d / "empty.txt").write_text("")
    return d


def decoded_docs(out):
    src = ShardSource(out)
    tok = toklib.load(out / "tokenizer.json")
    return [tok.decode(src.doc(k).tolist()) for k in range(src.num_docs)]


def test_round_trip_text_and_jsonl_with_trained_bpe(corpus, tmp_path):
    out = tmp_path / "out"
    m = pd.prepare([str(corpus / "*.py"), str(corpus / "*.jsonl*"), str(corpus / "empty.txt")], out,
                   train_vocab_size=300, shard_tokens=400, progress=False)
    # Inputs are read in sorted path order: a.jsonl, b.jsonl.gz, empty.txt (skipped), f00.py ... f09.py.
    assert decoded_docs(out) == TEXTS[10:25] + TEXTS[25:40] + TEXTS[:10]
    assert m["documents"] == 40 and m["skipped_empty"] == 1 and len(m["shards"]) > 1
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300 and m["eos_token"] == "<|endoftext|>"
    assert m["tokenizer_sha256"] == toklib.sha256(out / "tokenizer.json")
    assert [s["documents"] for s in m["sources"]] == [15, 15, 0] + [1] * 10
    assert m["tokens"] == sum(s["tokens"] for s in m["shards"])
    tok = toklib.load(out / "tokenizer.json")
    assert tok.token_to_id("<|endoftext|>") == m["eos_id"] == 0


def test_rerun_is_idempotent_and_input_changes_rewrite(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    pd.prepare([str(corpus / "*.py")], out, train_vocab_size=300, progress=False)
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    with caplog.at_level(logging.INFO, logger="intellect_jax.prepare_data"):
        pd.prepare([str(corpus / "*.py")], out, train_vocab_size=300, progress=False)
    assert "already prepared" in caplog.text
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == files
    # A fresh preparation elsewhere is byte-identical (deterministic tokenizer training and sharding).
    pd.prepare([str(corpus / "*.py")], tmp_path / "again", train_vocab_size=300, progress=False)
    for name in ("tokenizer.json", "shard-00000.tokens.bin", "shard-00000.offsets.bin"):
        assert (tmp_path / "again" / name).read_bytes() == files[name][1]
    (corpus / "f00.py").write_text("changed = True\n")
    pd.prepare([str(corpus / "*.py")], out, train_vocab_size=300, progress=False)
    assert decoded_docs(out)[0] == "changed = True\n"


def test_given_tokenizer_is_copied_and_recorded(corpus, tmp_path):
    first = tmp_path / "first"
    pd.prepare([str(corpus / "*.py")], first, train_vocab_size=280, progress=False)
    out = tmp_path / "out"
    m = pd.prepare([str(corpus / "a.jsonl")], out, tokenizer=first / "tokenizer.json", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert m["tokenizer_sha256"] == read_manifest(first).tokenizer_sha256
    assert decoded_docs(out) == TEXTS[10:25]
    # Both datasets share a tokenizer, so they mix; data.tokenizer may name it explicitly.
    cfg = DataConfig(kind="prepared", seq_len=16, batch_size=1, tokenizer=str(first / "tokenizer.json"),
                     sources=(SourceConfig(name="a", path=str(first)), SourceConfig(name="b", path=str(out))))
    with make_iterator(cfg, vocab_size=280) as it:
        assert next(it)["inputs"].shape == (1, 1, 16)
    assert tokenizer_path(cfg) == first / "tokenizer.json"


def test_input_errors(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="matches no files"):
        pd.prepare([str(corpus / "*.nothing")], out, train_vocab_size=300)
    with pytest.raises(DataError, match="has no field 'body'"):
        pd.prepare([str(corpus / "a.jsonl")], out, train_vocab_size=300, text_field="body", progress=False)
    (corpus / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        pd.prepare([str(corpus / "bad.jsonl")], out, train_vocab_size=300, progress=False)
    with pytest.raises(DataError, match="exactly one of --tokenizer"):
        pd.prepare([str(corpus / "a.jsonl")], out)
    with pytest.raises(toklib.TokenizerError, match="does not exist"):
        pd.prepare([str(corpus / "a.jsonl")], out, tokenizer=tmp_path / "missing.json")
    with pytest.raises(DataError, match="no non-empty documents"):
        pd.prepare([str(corpus / "empty.txt")], out, train_vocab_size=300, progress=False)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs pyarrow"):
        pd.prepare([str(tmp_path / "x.parquet")], tmp_path / "out", train_vocab_size=300, progress=False)


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TEXTS[:12]}), tmp_path / "x.parquet")
    pd.prepare([str(tmp_path / "x.parquet")], tmp_path / "out", train_vocab_size=300, text_field="content",
               progress=False)
    assert decoded_docs(tmp_path / "out") == TEXTS[:12]


def test_cli_run(corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    pd.add_arguments(parser)
    args = parser.parse_args(["--input", str(corpus / "*.py"), "--train-tokenizer", "--vocab-size", "300",
                              "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1"])
    assert pd.run(args) == 0
    assert "10 documents" in capsys.readouterr().out
    assert pd.run(parser.parse_args(["--input", str(corpus / "*.py"), "--out", str(tmp_path / "o")])) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_ensure_prepared_runs_the_recipe_once(tmp_path, monkeypatch, caplog):
    few = pd.python_stdlib_files()[:25]
    assert all("site-packages" not in str(p) for p in few)
    monkeypatch.setattr(pd, "python_stdlib_files", lambda: few)
    cfg = DataConfig(kind="prepared", seq_len=64, batch_size=2, sources=(
        SourceConfig(name="py", path=str(tmp_path / "py"), auto_prepare="python-stdlib",
                     auto_prepare_vocab_size=512),))
    with caplog.at_level(logging.INFO):
        ensure_prepared(cfg)
    assert "preparing the 'python-stdlib' recipe" in caplog.text
    m = read_manifest(tmp_path / "py")
    assert m.raw["recipe"] == "python-stdlib" and m.vocab_size == 512 and m.raw["documents"] == 25
    assert tokenizer_path(cfg) == tmp_path / "py" / "tokenizer.json"
    caplog.clear()
    ensure_prepared(cfg)
    assert "preparing" not in caplog.text
    with make_iterator(cfg, vocab_size=512) as it:
        b = next(it)
    text = toklib.load(tokenizer_path(cfg)).decode(b["inputs"][0, 0].tolist())
    assert len(text) > 64  # BPE merges: more than one character per token on Python source
    bigger = DataConfig(**{**cfg.__dict__, "sources": (SourceConfig(
        name="py", path=str(tmp_path / "py"), auto_prepare="python-stdlib", auto_prepare_vocab_size=1024),)})
    with pytest.raises(DataError, match="prepared with a vocabulary of 512"):
        ensure_prepared(bigger)


@pytest.mark.slow
def test_python_stdlib_recipe_is_deterministic(tmp_path):
    a = pd.prepare_recipe("python-stdlib", tmp_path / "a", vocab_size=4096, progress=False)
    b = pd.prepare_recipe("python-stdlib", tmp_path / "b", vocab_size=4096, progress=False)
    assert a["documents"] > 300 and a["tokens"] > 1_000_000 and a["vocab_size"] == 4096
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]
    assert [s["tokens_sha256"] for s in a["shards"]] == [s["tokens_sha256"] for s in b["shards"]]
    assert np.array_equal(ShardSource(tmp_path / "a").doc(0), ShardSource(tmp_path / "b").doc(0))
