"""``intellect-jax prepare-data``: text / JSONL / Parquet -> token shards + manifest.json.

Writes the format described in :mod:`intellect_jax.shards` (read back by its ``ShardSource``); the
tokenizer.json used (copied or trained) is kept beside the shards and shipped later with HF exports.

Re-running with the same inputs, tokenizer and options finds the manifest's ``input_fingerprint`` unchanged and
the shards intact, and does nothing. Tokenization runs in the tokenizers library's thread pool (``--workers``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from intellect_jax import tokenizer as toklib
from intellect_jax.shards import FORMAT, FORMAT_VERSION, MANIFEST, DataError, read_manifest, sha256_file

log = logging.getLogger(__name__)

RECIPES = ("python-stdlib",)
DEFAULT_SHARD_TOKENS = 1 << 25
_ENCODE_BATCH_BYTES = 4 << 20


# --------------------------------------------------------------------------------------------------------------------
# Inputs.


def find_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expands paths and globs (``**`` recursive) into a sorted, de-duplicated list of files."""
    if not patterns:
        raise DataError("no --input given; pass one or more files or globs (e.g. --input 'data/*.jsonl')")
    files: set[Path] = set()
    for pat in patterns:
        expanded = os.path.expanduser(pat)
        matches = glob.glob(expanded, recursive=True) if glob.has_magic(expanded) else [expanded]
        found = [Path(m) for m in matches if Path(m).is_file()]
        if Path(expanded).is_dir():
            found = [p for p in Path(expanded).rglob("*") if p.is_file()]
        if not found:
            raise DataError(f"--input {pat!r} matches no files; check the path or quote the glob")
        files.update(p.resolve() for p in found)
    return sorted(files)


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_documents(path: Path, fmt: str, text_field: str = "text") -> Iterator[str]:
    """The documents of one input file: a text file is one document, JSONL one per line, Parquet one per row."""
    fmt = detect_format(path, fmt)
    if fmt == "text":
        with _open_text(path) as f:
            yield f.read()
    elif fmt == "jsonl":
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n} is not valid JSON ({e}); fix the line or drop the file") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"{path}:{n} has no field {text_field!r} (keys: {keys}); pass --text-field")
                if rec[text_field] is not None:
                    yield str(rec[text_field])
    elif fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow, which is not installed; `pip install pyarrow` or "
                            "convert the data to JSONL") from None
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {pf.schema_arrow.names}); pass "
                            "--text-field")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield str(text)
    else:
        raise DataError(f"unknown input format {fmt!r}; use text, jsonl, parquet or auto")


def python_stdlib_files() -> list[Path]:
    """The demo corpus: the Python standard library's .py files, without tests, site-packages and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "idlelib", "test", "tests"}
    files = [p for p in root.rglob("*.py")
             if not any(part in skip or part.startswith("test") for part in p.relative_to(root).parts[:-1])]
    if not files:
        raise DataError(f"no .py files under the Python stdlib at {root}; the python-stdlib recipe needs them")
    return sorted(files)


# --------------------------------------------------------------------------------------------------------------------
# Writing shards.


class ShardWriter:
    """Appends documents (token arrays) and writes shards of about ``shard_tokens`` tokens each."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._docs: list[np.ndarray] = []
        self._tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self._docs.append(np.asarray(tokens, dtype=self.dtype))
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        i = len(self.shards)
        tokens = np.concatenate(self._docs) if self._tokens else np.zeros(0, self.dtype)
        offsets = np.zeros(len(self._docs) + 1, np.uint64)
        np.cumsum([len(d) for d in self._docs], out=offsets[1:])
        entry = {"documents": len(self._docs), "tokens": int(self._tokens)}
        for key, suffix, arr in (("tokens", "tokens.bin", tokens), ("offsets", "offsets.bin", offsets)):
            name = f"shard-{i:05d}.{suffix}"
            data = arr.tobytes()
            _atomic_write(self.out / name, data)
            entry[f"{key}_file"] = name
            entry[f"{key}_sha256"] = hashlib.sha256(data).hexdigest()
        self.shards.append(entry)
        self._docs, self._tokens = [], 0


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_dataset(out: str | Path, docs: Iterable[Sequence[int] | np.ndarray], *, eos_id: int, vocab_size: int,
                  tokenizer_sha256: str = "", eos_token: str = "", sources: Sequence[dict[str, Any]] = (),
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes already-tokenized documents as shards + manifest.json into ``out``; returns the manifest.

    Empty documents are skipped. Old shard files in ``out`` that the new manifest does not list are removed.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST).unlink()  # an interrupted rewrite must not look complete
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    writer = ShardWriter(out, dtype, shard_tokens)
    n_docs = n_tokens = skipped = 0
    for doc in docs:
        arr = np.asarray(doc)
        if arr.size == 0:
            skipped += 1
            continue
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise DataError(f"document {n_docs} has token ids outside [0, {vocab_size}); the tokenizer and "
                            "vocab_size disagree")
        writer.add(arr)
        n_docs += 1
        n_tokens += int(arr.size)
    writer.flush()
    if n_docs == 0:
        raise DataError(f"no non-empty documents to write into {out}; check the inputs (and --text-field)")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "eos_id": int(eos_id),
                "eos_token": eos_token, "vocab_size": int(vocab_size), "tokenizer_sha256": tokenizer_sha256,
                "tokenizer_file": "tokenizer.json" if (out / "tokenizer.json").is_file() else "",
                "documents": n_docs, "tokens": n_tokens, "skipped_empty": skipped, "sources": list(sources),
                "shards": writer.shards, **(extra or {})}
    keep = {e[k] for e in writer.shards for k in ("tokens_file", "offsets_file")}
    for old in out.glob("shard-*.bin"):
        if old.name not in keep:
            old.unlink()
    _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# Tokenize + write.


def _fingerprint(files: Sequence[Path], options: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
    key = json.dumps({"sources": [[s["path"], s["sha256"]] for s in sources], "options": options,
                      "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest(), sources


def _is_current(out: Path, fingerprint: str) -> bool:
    try:
        m = read_manifest(out)
    except DataError:
        return False
    if m.raw.get("input_fingerprint") != fingerprint:
        return False
    for s in m.raw["shards"]:
        for key in ("tokens", "offsets"):
            f = out / s[f"{key}_file"]
            if not f.is_file() or sha256_file(f) != s[f"{key}_sha256"]:
                return False
    tok = out / (m.raw.get("tokenizer_file") or "tokenizer.json")
    return tok.is_file() and toklib.sha256(tok) == m.tokenizer_sha256


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One preparer per output directory (e.g. several processes of one host calling ensure_prepared)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(inputs: Sequence[str | Path], out: str | Path, *, fmt: str = "auto", text_field: str = "text",
            tokenizer: str | Path | None = None, train_vocab_size: int = 0, eos_token: str = "", workers: int = 0,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenizes ``inputs`` (paths or globs) into ``out``; returns the manifest. Idempotent.

    Give either ``tokenizer`` (a tokenizer.json, copied into ``out``) or ``train_vocab_size`` (train a byte-level
    BPE of that size on the inputs, saved as ``out/tokenizer.json``).
    """
    if (tokenizer is None) == (not train_vocab_size):
        raise DataError("give exactly one of --tokenizer tokenizer.json or --train-tokenizer --vocab-size N")
    if shard_tokens <= 0:
        raise DataError(f"--shard-tokens={shard_tokens} must be positive")
    if workers > 0:  # the tokenizers thread pool reads this when it first starts
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    out = Path(out).expanduser()
    files = find_inputs([str(p) for p in inputs])
    tok_given = ""
    if tokenizer is not None:
        toklib.load(tokenizer)  # fail early on a missing or bad file
        tok_given = toklib.sha256(Path(tokenizer).expanduser())
    options = {"format": fmt, "text_field": text_field, "tokenizer": tok_given or f"bpe-{train_vocab_size}",
               "eos_token": eos_token, "shard_tokens": shard_tokens}
    with _locked(out):
        fingerprint, sources = _fingerprint(files, options)
        if _is_current(out, fingerprint):
            m = read_manifest(out).raw
            log.info("%s is already prepared from these inputs (%d documents, %d tokens); nothing to do", out,
                     m["documents"], m["tokens"])
            return m
        t0 = time.time()
        tok_path = out / "tokenizer.json"

        def texts(desc: str) -> Iterator[tuple[int, str]]:
            bar = _progress(len(files), desc, progress)
            for i, f in enumerate(files):
                for text in iter_documents(f, fmt, text_field):
                    yield i, text
                bar.update(1)
            bar.close()

        if train_vocab_size:
            log.info("training a byte-level BPE tokenizer (vocab %d) on %d files", train_vocab_size, len(files))
            tok = toklib.train_bpe((t for _, t in texts("train tokenizer")), train_vocab_size,
                                   eos_token or toklib.DEFAULT_EOS)
            _atomic_write(tok_path, tok.to_str(pretty=True).encode())
        else:
            if Path(tokenizer).expanduser().resolve() != tok_path.resolve():
                shutil.copyfile(Path(tokenizer).expanduser(), tok_path)
            tok = toklib.load(tok_path)
        eos_name, eos = toklib.eos_id(tok, eos_token or (toklib.DEFAULT_EOS if train_vocab_size else ""))
        vocab = tok.get_vocab_size(with_added_tokens=True)
        docs_per_file = [0] * len(files)

        def encoded() -> Iterator[list[int]]:
            batch: list[str] = []
            owners: list[int] = []
            size = 0
            for i, text in texts("tokenize"):
                batch.append(text)
                owners.append(i)
                size += len(text)
                if size >= _ENCODE_BATCH_BYTES:
                    yield from _encode(tok, batch, owners, docs_per_file)
                    batch, owners, size = [], [], 0
            yield from _encode(tok, batch, owners, docs_per_file)

        manifest = write_dataset(
            out, encoded(), eos_id=eos, vocab_size=vocab, tokenizer_sha256=toklib.sha256(tok_path),
            eos_token=eos_name, sources=sources, shard_tokens=shard_tokens,
            extra={"input_fingerprint": fingerprint, "options": options, **(extra or {})})
        for s, n in zip(manifest["sources"], docs_per_file):
            s["documents"] = n
        _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        log.info("prepared %s: %d documents, %d tokens (%s), %d shards in %.1f s", out, manifest["documents"],
                 manifest["tokens"], manifest["dtype"], len(manifest["shards"]), time.time() - t0)
        return manifest


def _encode(tok: Any, batch: list[str], owners: list[int], docs_per_file: list[int]) -> Iterator[np.ndarray]:
    if not batch:
        return
    for i, enc in zip(owners, tok.encode_batch(batch, add_special_tokens=False)):
        docs_per_file[i] += bool(enc.ids)  # empty documents are skipped by write_dataset
        yield np.asarray(enc.ids, dtype=np.int64)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, file=sys.stderr, leave=False)


def prepare_recipe(recipe: str, out: str | Path, *, vocab_size: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Prepares a built-in corpus: "python-stdlib" (the demo corpus) with a byte-level BPE of ``vocab_size``."""
    if recipe != "python-stdlib":
        raise DataError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    return prepare([str(p) for p in python_stdlib_files()], out, fmt="text", train_vocab_size=vocab_size,
                   progress=progress, extra={"recipe": recipe})


# --------------------------------------------------------------------------------------------------------------------
# CLI.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="PATH_OR_GLOB",
                        help="input file, directory or glob (repeatable); quote globs")
    parser.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "parquet"),
                        help="input format; auto: by extension (.jsonl/.json, .parquet, else one text document "
                             "per file; .gz allowed for text and jsonl)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument("--tokenizer", default=None, metavar="TOKENIZER_JSON",
                        help="Hugging Face tokenizer.json to tokenize with (copied into --out)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a byte-level BPE of --vocab-size on the inputs instead")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained BPE")
    parser.add_argument("--eos-token", default="", help="the token that ends a document (default: found by name)")
    parser.add_argument("--recipe", default="", choices=("",) + RECIPES,
                        help="prepare a built-in corpus instead of --input (python-stdlib: the demo corpus)")
    parser.add_argument("--out", required=True, help="output directory (shards, manifest.json, tokenizer.json)")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer threads (0: all cores)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.recipe:
            if args.input or args.tokenizer:
                raise DataError("--recipe prepares a built-in corpus; do not combine it with --input/--tokenizer")
            m = prepare_recipe(args.recipe, args.out, vocab_size=args.vocab_size, progress=not args.no_progress)
        else:
            if args.tokenizer and args.train_tokenizer:
                raise DataError("give either --tokenizer or --train-tokenizer, not both")
            if not args.tokenizer and not args.train_tokenizer:
                raise DataError("no tokenizer: pass --tokenizer tokenizer.json or --train-tokenizer --vocab-size N")
            m = prepare(args.input, args.out, fmt=args.format, text_field=args.text_field, tokenizer=args.tokenizer,
                        train_vocab_size=args.vocab_size if args.train_tokenizer else 0, eos_token=args.eos_token,
                        workers=args.workers, shard_tokens=args.shard_tokens, progress=not args.no_progress)
    except (DataError, toklib.TokenizerError) as e:
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {m['documents']} documents, {m['tokens']} tokens, vocab {m['vocab_size']}, "
          f"eos {m['eos_token']!r}={m['eos_id']}, {len(m['shards'])} shard(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intellect-jax prepare-data", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
