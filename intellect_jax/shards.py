"""The prepared-data format: ``manifest.json`` plus raw token shards, and the reader of one prepared dataset.

Written by :mod:`intellect_jax.prepare_data`, read by :mod:`intellect_jax.data`; both import this module and neither
imports the other at module level. Layout of a prepared directory::

    manifest.json                 format, dtype, eos_id, vocab_size, tokenizer sha256, documents, tokens,
                                  sources (path, sha256, bytes, documents), shards (files, counts, sha256)
    tokenizer.json                the tokenizer used
    shard-00000.tokens.bin        raw uint16 (vocab <= 65536) or uint32 token ids, documents back to back, no EOS
    shard-00000.offsets.bin       raw uint64 document start offsets into the tokens file, plus the end

:class:`ShardSource` is a Grain random-access data source (``len`` and ``[k]`` -> document ``k``'s tokens).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "intellect-jax-tokens"
FORMAT_VERSION = 1


class DataError(RuntimeError):
    """A data problem (missing or corrupt shard, empty dataset, tokenizer mismatch); the message says the fix."""


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

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, k: int) -> np.ndarray:
        return self.doc(k)

    def doc(self, k: int) -> np.ndarray:
        """Tokens of document ``k`` (without EOS), int32."""
        i = int(np.searchsorted(self._first_doc, k, side="right")) - 1
        tokens, offsets = self._shard(i)
        j = k - int(self._first_doc[i])
        return np.asarray(tokens[offsets[j]:offsets[j + 1]], dtype=np.int32)
