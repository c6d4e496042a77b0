"""The on-disk layout every index directory shares: ``meta.json`` and a passage store.

An index directory (BM25, dense or Lucene) holds

- ``meta.json``: ``{"method": "bm25"|"dense"|"lucene", "num_passages": int, "corpus": str,
  "created": ISO-8601 UTC time, ...method-specific fields}``; write it with
  :func:`write_meta`, read it with :func:`read_meta`.
- the passage store (BM25 and dense): the passages in corpus order as uncompressed Arrow IPC
  with string columns ``id`` and ``contents`` (the corpus line's ``contents`` byte for
  byte; ``"title"\\ntext`` for ``{id, title, text}`` corpora), either one file
  ``docstore.arrow`` or the numbered parts ``docstore/part-NNNNN.arrow`` of a sharded build,
  read in order. Row ``i`` is the passage that the index calls document ``i``. Ids and
  offsets are memory-mapped on open (read-ahead off) and each passage's text is read with
  pread, so wiki-18 (21M passages, ~14 GB) costs page cache rather than process memory
  (RSS), and a look-up is a few microseconds. Stores written before ``contents``
  was kept verbatim (columns ``id``, ``title``, ``text``) are still read.

Use::

    n = write_docstore(iter_passages("corpus.jsonl"), out_dir)   # -> number of passages
    store = DocStore.open(out_dir)
    store.passages([4, 17], scores=[12.5, 9.1])                   # -> [Passage, Passage]

:func:`staged_directory` builds into a temporary sibling directory and renames it into place
only when the build succeeded, so an interrupted build never leaves a half-written index.
"""
from __future__ import annotations

import bisect
import contextlib
import datetime
import json
import mmap
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from searchr1_jax.retrieval.types import Passage

DOCSTORE_FILE = "docstore.arrow"
DOCSTORE_PARTS_DIR = "docstore"
META_FILE = "meta.json"
METHODS = ("bm25", "dense", "lucene")
_SCHEMA = pa.schema([("id", pa.string()), ("contents", pa.string())])
_OLD_SCHEMA_NAMES = ["id", "title", "text"]
_ROWS_PER_BATCH = 65536


def write_passages(passages: Iterable[Passage], path: str | os.PathLike) -> int:
    """Write `passages` (in order) as one passage-store file at `path`; returns how many."""
    count = 0
    columns: tuple[list[str], list[str]] = ([], [])
    with ipc.new_file(os.fspath(path), _SCHEMA) as writer:
        for passage in passages:
            columns[0].append(passage.id)
            columns[1].append(passage.contents)
            count += 1
            if len(columns[0]) == _ROWS_PER_BATCH:
                writer.write_batch(pa.record_batch([pa.array(c, pa.string()) for c in columns], schema=_SCHEMA))
                columns = ([], [])
        if columns[0] or count == 0:
            writer.write_batch(pa.record_batch([pa.array(c, pa.string()) for c in columns], schema=_SCHEMA))
    return count


def write_docstore(passages: Iterable[Passage], out_dir: str | os.PathLike) -> int:
    """Write `passages` (in order) to ``out_dir/docstore.arrow``; returns how many were written."""
    os.makedirs(out_dir, exist_ok=True)
    return write_passages(passages, os.path.join(out_dir, DOCSTORE_FILE))


def part_path(out_dir: str | os.PathLike, number: int) -> str:
    """Where part `number` of a sharded passage store lives inside index directory `out_dir`."""
    return os.path.join(os.fspath(out_dir), DOCSTORE_PARTS_DIR, f"part-{number:05d}.arrow")


def _map_random(path: str) -> mmap.mmap:
    """`path` memory-mapped read-only, with read-ahead off: look-ups are random, and the
    kernel's default read-ahead (~128 KiB a fault) would page in the whole store within a
    few thousand look-ups, inflating the server's RSS with pages it never reads."""
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def _store_files(index_dir: str) -> list[str]:
    single = os.path.join(index_dir, DOCSTORE_FILE)
    if os.path.isfile(single):
        return [single]
    parts_dir = os.path.join(index_dir, DOCSTORE_PARTS_DIR)
    parts = sorted(n for n in os.listdir(parts_dir) if n.startswith("part-") and n.endswith(".arrow")) if os.path.isdir(parts_dir) else []
    if not parts:
        raise FileNotFoundError(
            f"passage store not found: neither {single} nor {parts_dir}/part-*.arrow "
            "(build the index with searchr1_jax.retrieval.build_index)"
        )
    return [os.path.join(parts_dir, n) for n in parts]


class _Contents:
    """The `contents` column of one record batch, read with pread(2) instead of the mapping.

    Faulting in mapped pages also maps their neighbours already in the page cache (fault-
    around, large folios), so a few thousand random look-ups through a mapping put the
    whole store into the server's RSS. The offsets stay mapped (4 bytes a row); each
    passage's bytes are read from the file at their position. Falls back to Arrow's own
    access if the buffer does not lie inside the mapping (never the case for our files).
    """

    def __init__(self, column: pa.StringArray, handle, base: int, size: int):
        self.column = column
        buffers = column.buffers()
        self.offsets = np.frombuffer(buffers[1], np.int32, count=len(column) + 1, offset=4 * column.offset) if len(column) else None
        data = buffers[2]
        self.position = data.address - base if data is not None and base <= data.address < base + size else None
        self.handle = handle

    def __getitem__(self, row: int) -> str:
        if self.position is None or self.offsets is None:
            return self.column[row].as_py()
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return os.pread(self.handle.fileno(), end - start, self.position + start).decode("utf-8")


class DocStore:
    """Read-only random access to the passages of an index directory: memory-mapped
    metadata and ids, passage text read on demand (see `_Contents`)."""

    def __init__(self, path: str, columns: list[tuple]):
        self.path = path
        self._columns = columns  # per batch: (ids, _Contents) or, old stores, (ids, titles, texts)
        self._starts = [0]
        for batch in columns:
            self._starts.append(self._starts[-1] + len(batch[0]))

    @classmethod
    def open(cls, index_dir: str | os.PathLike) -> "DocStore":
        columns: list[tuple] = []
        files = _store_files(os.fspath(index_dir))
        for path in files:
            try:
                mapped = _map_random(path)
                reader = ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))
            except (pa.ArrowInvalid, ValueError) as err:
                raise ValueError(f"{path}: not a valid passage store ({err})") from None
            if reader.schema.names not in (_SCHEMA.names, _OLD_SCHEMA_NAMES):
                raise ValueError(f"{path}: expected columns {_SCHEMA.names}, found {reader.schema.names}")
            handle = open(path, "rb")
            base = np.frombuffer(mapped, np.uint8).ctypes.data
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if batch.num_columns == 2:
                    columns.append((batch.column(0), _Contents(batch.column(1), handle, base, len(mapped))))
                else:
                    columns.append((batch.column(0), batch.column(1), batch.column(2)))
        return cls(files[0] if len(files) == 1 else os.path.dirname(files[0]), columns)

    def __len__(self) -> int:
        return self._starts[-1]

    @staticmethod
    def _row(columns: tuple, row: int, score: float) -> Passage:
        if len(columns) == 2:
            return Passage.from_contents(columns[0][row].as_py(), columns[1][row], float(score))
        ids, titles, texts = columns
        return Passage(id=ids[row].as_py(), title=titles[row].as_py(), text=texts[row].as_py(), score=float(score))

    def passage(self, index: int, score: float = 0.0) -> Passage:
        """Passage number `index` (0-based corpus order) carrying `score`."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: passage {index} out of range [0, {len(self)})")
        chunk = bisect.bisect_right(self._starts, index) - 1
        return self._row(self._columns[chunk], index - self._starts[chunk], score)

    def passages(self, indices: Sequence[int], scores: Sequence[float] | None = None) -> list[Passage]:
        """Passages for `indices`, each carrying the matching entry of `scores` (0.0 if None)."""
        if scores is None:
            return [self.passage(int(i)) for i in indices]
        return [self.passage(int(i), s) for i, s in zip(indices, scores, strict=True)]

    def __iter__(self) -> Iterator[Passage]:
        for columns in self._columns:
            if len(columns) == 2:
                for pid, contents in zip(columns[0].to_pylist(), columns[1].column.to_pylist()):
                    yield Passage.from_contents(pid, contents)
            else:
                for pid, title, text in zip(*(c.to_pylist() for c in columns)):
                    yield Passage(id=pid, title=title, text=text)


def write_meta(out_dir: str | os.PathLike, method: str, num_passages: int, corpus: str | os.PathLike, **fields) -> dict:
    """Write ``out_dir/meta.json`` with the common fields plus `fields`; returns the dict."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    meta = {
        "method": method,
        "num_passages": int(num_passages),
        "corpus": os.path.abspath(os.fspath(corpus)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    with open(os.path.join(out_dir, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
        handle.write("\n")
    return meta


def read_meta(index_dir: str | os.PathLike) -> dict:
    """Read and check ``index_dir/meta.json``."""
    path = os.path.join(os.fspath(index_dir), META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {META_FILE} in {os.fspath(index_dir)}: not an index directory (build one with searchr1_jax.retrieval.build_index)")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if meta.get("method") not in METHODS:
        raise ValueError(f"{path}: field 'method' must be one of {METHODS}, got {meta.get('method')!r}")
    if not isinstance(meta.get("num_passages"), int):
        raise ValueError(f"{path}: field 'num_passages' must be an integer")
    return meta


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of `out_dir`; on success it replaces `out_dir`.

    On an exception the staging directory is deleted and `out_dir` is left as it was. An
    existing non-empty `out_dir` is an error unless `overwrite`; then the old directory is
    swapped out only after the new one is complete.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty (pass overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.building-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        retired = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.replace(out_dir, os.path.join(retired, "index"))
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def check_build_settings(staging: str, settings: dict, path_name: str = "build.json") -> dict:
    """Record `settings` in a new staging dir, or check that an interrupted build used the same.

    Returns what the staging dir holds (the recorded settings, which may carry more keys than
    `settings`, e.g. choices made on the first run that a resumed run must reuse).
    """
    path = os.path.join(staging, path_name)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
        diffs = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if diffs:
            detail = "; ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in diffs.items())
            raise ValueError(f"{staging} holds an interrupted build with different settings ({detail}); delete it to start over")
        return previous
    os.makedirs(staging, exist_ok=True)
    write_json_atomically(path, settings)
    return dict(settings)


def write_json_atomically(path: str, value) -> None:
    """Write `value` as JSON to `path` so that `path` only ever holds a complete file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def is_nonempty(path: str) -> bool:
    return os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))


def publish(staging: str, out: str, overwrite: bool) -> None:
    """Rename a finished staging directory to `out`, replacing a non-empty `out` only if `overwrite`."""
    if not is_nonempty(out):
        os.replace(staging, out)  # rename(2) also replaces an empty directory
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    # Directories cannot be swapped in one rename: retire the old index first; a crash between
    # the two renames leaves it complete under the retired name.
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.replace(out, os.path.join(retired, "index"))
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
