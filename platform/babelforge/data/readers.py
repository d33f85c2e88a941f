"""Finding, planning and reading ingest inputs: jsonl, parquet and plain text, local or remote.

Three steps, all free of Ray so each can run in a worker:

1. :func:`resolve_source` expands a source (bundled corpus, file, directory or glob; a local path or
   any pyarrow URI such as ``s3://``/``gs://``/``file://``, or an fsspec URI) into :class:`InputFile`\\ s.
2. :func:`plan_file` cuts a file into shards of at most ``rows_per_shard`` lines/rows. For line-based
   files it scans the bytes once and records where each shard starts, so a shard is read with one
   seek (compressed files are decompressed up to the shard's start instead).
3. :func:`read_shard` yields a shard's records in batches as :class:`RawRecord`\\ s. Nothing is
   dropped here: a line that is not UTF-8 or not JSON becomes a record carrying its error, and the
   raw bytes (decoded with backslash escapes) are kept for the quarantine.

    >>> files = resolve_source(SourceConfig(bundled="ntrex", languages=["de"]), source_index=0)
    >>> files[0].display, files[0].lang, files[0].format
    ('ntrex.deu.txt', 'de', 'text')
    >>> [spec] = plan_shards(files, rows_per_shard=10_000)
    >>> spec.name, spec.num_rows
    ('00-ntrex.deu.txt-00000', 1997)
    >>> next(read_shard(spec, "text", batch_rows=2))[0].location.endswith("ntrex.deu.txt:1")
    True

Locations: line-based records are ``<file>:<line>`` (1-based, like compilers), parquet rows are
``<file>[<row>]`` (0-based, like Python).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from babelforge.data.config import SourceConfig
from babelforge.data.shards import resolve_filesystem
from babelforge.errors import ConfigError
from babelforge.resources import NTREX_FILES, TATOEBA_CODES, ntrex_file, tatoeba_files

__all__ = ["InputFile", "ShardSpec", "RawRecord", "open_filesystem", "resolve_source", "plan_file",
           "plan_shards", "read_shard", "json_default"]

log = logging.getLogger(__name__)

FileFormat = Literal["jsonl", "parquet", "text"]

_EXTENSIONS: dict[str, FileFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                                      ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
_READ_BLOCK = 8 << 20
_PARQUET_BATCH = 4096


@dataclass(frozen=True)
class InputFile:
    """One input file of a source."""

    uri: str                 # local path or URI, as the filesystem layer takes it
    display: str             # stable name used in ids and ``meta.file`` (relative to the source root)
    format: FileFormat
    lang: str | None         # language of every record (source `lang`, or from a bundled file name)
    source_index: int
    size: int


@dataclass(frozen=True)
class ShardSpec:
    """A contiguous run of lines/rows of one file; the unit that is processed, committed and resumed."""

    name: str
    index: int               # position in the run's plan; orders records for "keep the first" rules
    file: InputFile
    first_row: int           # 0-based index of the shard's first line/row in the file
    num_rows: int
    byte_start: int = 0      # line-based files: byte range (of the decompressed stream) holding the rows
    byte_end: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardSpec":
        return cls(**{**data, "file": InputFile(**data["file"])})


@dataclass
class RawRecord:
    """A record as read: its parsed fields, or the reason it could not be parsed."""

    location: str                       # "<file>:<line>" or "<file>[<row>]"
    position: dict[str, int]            # {"line": n} or {"row": i}, copied into meta
    raw: str                            # the record as read, for the quarantine
    fields: dict[str, Any] | None       # None when the record is malformed
    error: tuple[str, str] | None = None   # (reason code, detail) when malformed


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path, a pyarrow URI, or any URI fsspec knows (``memory://``, ``hf://``)."""
    try:
        return resolve_filesystem(uri)
    except pa.ArrowInvalid:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _compression(path: str) -> str | None:
    return _COMPRESSIONS.get(posixpath.splitext(path)[1].lower())


def _infer_format(path: str) -> FileFormat | None:
    stem = path[: -len(posixpath.splitext(path)[1])] if _compression(path) else path
    return _EXTENSIONS.get(posixpath.splitext(stem)[1].lower())


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Regex for a glob: ``*``/``?`` stay within a directory, ``**/`` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1:end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _list_files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Files under ``root``, sorted, without hidden ones (``.name``, ``_name``: markers, temporaries)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File
                   and not any(part.startswith((".", "_")) for part in i.path[len(root):].split("/"))),
                  key=lambda i: i.path)


def _bundled_files(source: SourceConfig, source_index: int) -> list[InputFile]:
    if source.bundled == "ntrex":
        pairs = [(ntrex_file(lang), lang) for lang in source.languages or NTREX_FILES]
    else:
        pairs = [(path, file_lang) for lang in source.languages or TATOEBA_CODES
                 for path, file_lang in zip(tatoeba_files(lang), (lang, "en"))]
    return [InputFile(str(path), path.name, "text", lang, source_index, path.stat().st_size) for path, lang in pairs]


def _matching_files(fs: pafs.FileSystem, path: str, key: str, shown: str) -> tuple[str, list[pafs.FileInfo]]:
    """(root the display names are relative to, files) of a file, directory or glob."""
    if any(c in path for c in "*?["):
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        root = "/".join(parts[:fixed]) or "/"
        pattern = _glob_regex("/".join(parts[fixed:]))
        infos = [i for i in _list_files(fs, root) if pattern.match(i.path[len(root):].lstrip("/"))]
        if not infos:
            raise ConfigError(f"{key}.path: {shown!r} matches no files")
        return root, infos
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{key}.path: {shown!r} does not exist")
    if info.type != pafs.FileType.Directory:
        return posixpath.dirname(path), [info]
    infos = _list_files(fs, path)
    if not infos:
        raise ConfigError(f"{key}.path: directory {shown!r} holds no files")
    return path, infos


def resolve_source(source: SourceConfig, source_index: int) -> list[InputFile]:
    """The files of ``source`` in a stable order; raises :class:`ConfigError` naming the key if none."""
    if source.bundled is not None:
        return _bundled_files(source, source_index)
    assert source.path is not None
    key = f"sources[{source_index}]"
    fs, path = open_filesystem(source.path)
    root, infos = _matching_files(fs, path, key, source.path)
    prefix = source.path.split("://", 1)[0] + "://" if "://" in source.path else ""
    files, unknown = [], []
    for info in infos:
        fmt = source.format if source.format != "auto" else _infer_format(info.path)
        if fmt is None:
            unknown.append(info.path)
            continue
        display = posixpath.relpath(info.path, root) if root not in ("", "/") else info.path.lstrip("/")
        files.append(InputFile(prefix + info.path, display, fmt, source.lang, source_index, info.size))
    if unknown and len(infos) == 1:
        raise ConfigError(f"{key}.format: cannot infer the format of {unknown[0]!r} from its extension; "
                          "set format: jsonl|parquet|text")
    if unknown:
        log.warning("%s: skipping %d file(s) with no known extension (set `format` to read them): %s",
                    key, len(unknown), ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    if not files:
        raise ConfigError(f"{key}.format: no file under {source.path!r} has a known extension; set `format`")
    return files


def _line_chunks(stream: Any, rows_per_shard: int) -> list[tuple[int, int, int, int]]:
    """(first_row, num_rows, byte_start, byte_end) of each run of ``rows_per_shard`` lines."""
    starts, newlines, offset, last_byte = [0], 0, 0, 10
    while block := stream.read(_READ_BLOCK):
        positions = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
        # the newline ending line number L (0-based) closes a shard when (L + 1) % rows_per_shard == 0
        first = rows_per_shard - 1 - newlines % rows_per_shard
        starts.extend(offset + int(p) + 1 for p in positions[first::rows_per_shard])
        newlines += len(positions)
        offset += len(block)
        last_byte = block[-1]
    total = newlines + (last_byte != 10)
    ends = [*starts[1:], offset]
    chunks = [(k * rows_per_shard, min(rows_per_shard, total - k * rows_per_shard), start, end)
              for k, (start, end) in enumerate(zip(starts, ends)) if k * rows_per_shard < total]
    return chunks or [(0, 0, 0, 0)]


def plan_file(file: InputFile, rows_per_shard: int) -> list[tuple[int, int, int, int]]:
    """Shards of ``file`` as (first_row, num_rows, byte_start, byte_end); an empty file has one empty shard."""
    fs, path = open_filesystem(file.uri)
    if file.format == "parquet":
        with fs.open_input_file(path) as f:
            total = pq.ParquetFile(f).metadata.num_rows
        return [(first, min(rows_per_shard, total - first), 0, 0)
                for first in range(0, total, rows_per_shard)] or [(0, 0, 0, 0)]
    compression = _compression(path)
    with fs.open_input_stream(path, compression=compression) as stream:
        return _line_chunks(stream, rows_per_shard)


def _shard_name(file: InputFile, chunk: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", file.display.replace("/", "-")).lstrip("._-")[:80]
    return f"{file.source_index:02d}-{slug}-{chunk:05d}"


def plan_shards(files: list[InputFile], rows_per_shard: int,
                chunks: list[list[tuple[int, int, int, int]]] | None = None) -> list[ShardSpec]:
    """Shard specs for ``files`` (``chunks``: precomputed :func:`plan_file` results, e.g. from Ray tasks)."""
    chunks = chunks if chunks is not None else [plan_file(f, rows_per_shard) for f in files]
    specs: list[ShardSpec] = []
    seen: set[str] = set()
    for file, file_chunks in zip(files, chunks):
        for k, (first, count, start, end) in enumerate(file_chunks):
            name = _shard_name(file, k)
            if name in seen:  # two display paths with the same slug: disambiguate by position
                name = f"{name}-{len(specs)}"
            seen.add(name)
            specs.append(ShardSpec(name, len(specs), file, first, count, start, end))
    return specs


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback: bytes as text with escapes, anything else (dates, decimals) as ``str``."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)


def _iter_lines(spec: ShardSpec) -> Iterator[bytes]:
    fs, path = open_filesystem(spec.file.uri)
    compression = _compression(path)
    if compression:
        stream = fs.open_input_stream(path, compression=compression)
        to_skip = spec.byte_start
        while to_skip > 0:
            skipped = len(stream.read(min(_READ_BLOCK, to_skip)))
            if not skipped:
                break
            to_skip -= skipped
    else:
        stream = fs.open_input_file(path)
        stream.seek(spec.byte_start)
    with stream:
        remaining, tail, emitted = spec.byte_end - spec.byte_start, b"", 0
        while remaining > 0 and emitted < spec.num_rows:
            block = stream.read(min(_READ_BLOCK, remaining))
            if not block:
                break
            remaining -= len(block)
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines[: spec.num_rows - emitted]:
                yield line[:-1] if line.endswith(b"\r") else line
            emitted += min(len(lines), spec.num_rows - emitted)
        if tail and emitted < spec.num_rows:
            yield tail[:-1] if tail.endswith(b"\r") else tail


def _line_record(spec: ShardSpec, line_no: int, line: bytes, text_field: str) -> RawRecord:
    location, position = f"{spec.file.uri}:{line_no}", {"line": line_no}
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raw = line.decode("utf-8", errors="backslashreplace")
        return RawRecord(location, position, raw, None,
                         ("invalid_utf8", f"line is not valid UTF-8 (byte {err.start}: {err.reason})"))
    if spec.file.format == "text":
        return RawRecord(location, position, decoded, {text_field: decoded})
    if not decoded.strip():
        return RawRecord(location, position, decoded, None, ("invalid_json", "line is blank"))
    try:
        value = json.loads(decoded)
    except json.JSONDecodeError as err:
        return RawRecord(location, position, decoded, None,
                         ("invalid_json", f"line is not valid JSON: {err.msg} at column {err.colno}"))
    if not isinstance(value, dict):
        return RawRecord(location, position, decoded, None,
                         ("not_an_object", f"line is a JSON {type(value).__name__}, expected an object"))
    return RawRecord(location, position, decoded, value)


def _parquet_rows(spec: ShardSpec) -> Iterator[tuple[int, dict[str, Any]]]:
    fs, path = open_filesystem(spec.file.uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        group_start, last = 0, spec.first_row + spec.num_rows
        for group in range(parquet.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            lo, hi = max(spec.first_row, group_start), min(last, group_start + group_rows)
            if lo < hi:
                table = parquet.read_row_group(group).slice(lo - group_start, hi - lo)
                for batch in table.to_batches(max_chunksize=_PARQUET_BATCH):
                    yield from enumerate(batch.to_pylist(), start=lo)
                    lo += batch.num_rows
            group_start += group_rows
            if group_start >= last:
                break


def read_shard(spec: ShardSpec, text_field: str, batch_rows: int) -> Iterator[list[RawRecord]]:
    """The records of one shard, ``batch_rows`` at a time, in file order (exactly ``spec.num_rows``)."""
    batch: list[RawRecord] = []
    if spec.file.format == "parquet":
        for row_index, row in _parquet_rows(spec):
            raw = json.dumps(row, ensure_ascii=False, default=json_default)
            batch.append(RawRecord(f"{spec.file.uri}[{row_index}]", {"row": row_index}, raw, row))
            if len(batch) == batch_rows:
                yield batch
                batch = []
    else:
        for line_no, line in enumerate(_iter_lines(spec), start=spec.first_row + 1):
            batch.append(_line_record(spec, line_no, line, text_field))
            if len(batch) == batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch
