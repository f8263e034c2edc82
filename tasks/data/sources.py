"""Readers: every source a recipe can name, as records with the place each came from.

A source is a local file (JSONL, JSON, CSV/TSV, Parquet; the text kinds also compressed as
.gz, .bz2, .xz or .zst), a folder written by `datasets.Dataset.save_to_disk`, a folder of such
files, or an `s3://bucket/prefix` (fetched through boto3 into a cache keyed by the objects'
ETags). A row that cannot be parsed (not JSON, not UTF-8, a broken CSV row) becomes a record
with an error instead of a value, so it is quarantined with its file and line; a source that
cannot be read at all (missing, unreadable, a compressed file cut short) raises `SourceError`.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tunewright.files import BLOCK, hash_file_into

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
# compressed files of the text kinds are read as they decompress (Parquet compresses its own columns)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
READABLE = f"{', '.join(sorted(SUFFIXES))}; all but .parquet also compressed: {', '.join(sorted(COMPRESSIONS))}"
# CSV cells in these columns may hold JSON (lists of turns, answers)
JSON_COLUMNS = {"messages", "conversations", "chosen", "rejected", "prompt", "completion"}


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing, unknown kind, broken file); names it."""


@dataclass
class Raw:
    """One record as read: where it came from, and the value or why it could not be parsed."""

    row: int                 # 1-based position within its source
    where: str               # e.g. "tickets.jsonl line 12", "data.csv row 4 (line 9)"
    value: Any = None
    error: str | None = None
    text: str | None = None  # the raw text of an unparseable row, kept for the quarantine


def kind_of(path: Path) -> tuple[str | None, str | None]:
    """(kind, compression) that a file's name says, e.g. ("jsonl", "gzip") for `x.jsonl.gz`; kind None when the name
    is not of a readable file."""
    suffix = path.suffix.lower()
    compression = COMPRESSIONS.get(suffix)
    if compression is not None:
        suffix = Path(path.stem).suffix.lower()
    kind = SUFFIXES.get(suffix)
    return (None if kind == "parquet" and compression else kind), compression


class _Zstd(io.RawIOBase):
    """A zstd file's bytes as they decompress, frame after frame; EOFError when it ends inside a frame (where the
    stream reader of `zstandard` just stops) and OSError when it is not zstd."""

    def __init__(self, path: Path):
        import zstandard

        self._fh, self._error = path.open("rb"), zstandard.ZstdError
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._d, self._out, self._at = self._new(), b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._at == len(self._out):
            data = self._fh.read(BLOCK)
            if not data:
                if not self._d.eof:
                    raise EOFError("the zstd data ends inside a frame")
                return 0
            parts = []
            try:
                while data:  # a frame may end inside the block: the next one starts in what is left
                    if self._d.eof:
                        self._d = self._new()
                    parts.append(self._d.decompress(data))
                    data = self._d.unused_data if self._d.eof else b""
            except self._error as exc:
                raise OSError(str(exc)) from None
            self._out, self._at = b"".join(parts), 0
        n = min(len(b), len(self._out) - self._at)
        b[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open(path: Path, compression: str | None) -> BinaryIO:
    """A file's bytes as stored, or as they decompress (a file of no bytes holds none, compressed or not)."""
    if compression is None or path.stat().st_size == 0:
        return path.open("rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bzip2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    return io.BufferedReader(_Zstd(path), BLOCK)


# what reading a file's bytes raises: refused by the system, cut short, not the compression its name says
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def unreadable(name: str, exc: BaseException, after: str | None = None) -> SourceError:
    """The SourceError for one of READ_ERRORS reading `name`; `after`: the last line or record read before it."""
    at = f", after {after}" if after else ""
    if isinstance(exc, EOFError):
        return SourceError(f"{name}: the compressed data ends early{at} (a truncated or unfinished download?)")
    compression = kind_of(Path(name))[1]
    if (isinstance(exc, OSError) and exc.strerror) or not compression:  # the system refused: permission, I/O error
        return SourceError(f"{name}: cannot read it ({exc.strerror or exc}){at}")
    # gzip's BadGzipFile, bz2's OSError, zlib, lzma and zstd errors
    return SourceError(f"{name}: cannot decompress it as {compression} ({exc}){at}")


def _line_blocks(fh: BinaryIO, size: int) -> Iterator[bytes]:
    """A binary stream in blocks of about `size` bytes of whole lines (the last may lack its newline)."""
    while block := fh.read(size):
        if not block.endswith(b"\n"):
            block += fh.readline()
        yield block


def _stray_byte(text: str) -> tuple[int, int] | None:
    """(the byte, its column) of the first byte that is not UTF-8 in text decoded with errors="surrogateescape"; None
    when there is none."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ord(text[exc.start]) - 0xDC00, exc.start + 1
    return None


def _shown(text: str) -> str:
    """Text decoded with errors="surrogateescape" as the quarantine keeps it: stray bytes as U+FFFD, at most 2000
    characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").removesuffix("\r")[:2000]


def jsonl_lines(block: bytes, name: str, lineno: int) -> list[Raw]:
    """The records of whole lines of a JSON-lines file, the first of them line `lineno`.

    Blank lines are skipped; a line that is not UTF-8 or not JSON becomes a record with an error. A
    byte order mark before line 1 and the carriage returns of CRLF line ends are read as if absent.
    """
    if lineno == 1 and block.startswith(codecs.BOM_UTF8):
        block = block[len(codecs.BOM_UTF8):]
    bad = []
    try:
        lines = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # rare: the lines that are not UTF-8 become errors, the others are read
        lines = block.decode("utf-8", "surrogateescape").split("\n")
        for i, line in enumerate(lines):
            if found := _stray_byte(line):
                bad.append(Raw(lineno + i, f"{name} line {lineno + i}", text=_shown(line),
                               error="not UTF-8 text (byte 0x%02X at column %d)" % found))
                lines[i] = ""
    out = []
    loads = json.loads
    for n, line in enumerate(lines, start=lineno):
        if not line.strip():
            continue
        try:
            out.append(Raw(n, f"{name} line {n}", loads(line)))
        except json.JSONDecodeError:
            out.append(_bad_line(line, n, name))
    return sorted(out + bad, key=lambda r: r.row) if bad else out


def _bad_line(line: str, lineno: int, name: str) -> Raw:
    """The record of a line that is not JSON, with the parser's reason for the line without its CR."""
    line = line.removesuffix("\r")
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        return Raw(lineno, f"{name} line {lineno}", error=f"not JSON ({exc.msg} at column {exc.colno})",
                   text=line[:2000])
    raise AssertionError("a line that failed to parse parsed")


def _jsonl(path: Path, name: str, compression: str | None) -> Iterator[Raw]:
    with _open(path, compression) as fh:
        lineno = 1
        for block in _line_blocks(fh, BLOCK):
            yield from jsonl_lines(block, name, lineno)
            lineno += block.count(b"\n")


def scan_jsonl(path: Path, chunk_bytes: int = BLOCK) -> tuple[str, list[tuple[int, int, int]], int]:
    """A JSON-lines file's digest (as `digest_local`), its byte ranges of whole lines (about `chunk_bytes` each)
    and its number of lines.

    Each range is (offset, length, number of its first line), for `jsonl_range` to read in a worker process.
    """
    h = hashlib.sha256(path.name.encode() + b"\0")
    ranges, offset, lineno = [], 0, 1
    with path.open("rb") as fh:
        for block in _line_blocks(fh, chunk_bytes):
            h.update(block)
            ranges.append((offset, len(block), lineno))
            offset += len(block)
            lineno += block.count(b"\n")
    return h.hexdigest(), ranges, lineno - 1


def jsonl_range(path: Path, name: str, offset: int, length: int, lineno: int) -> list[Raw]:
    """The records of one range of `scan_jsonl`, described with the file's `name`."""
    with path.open("rb") as fh:
        fh.seek(offset)
        return jsonl_lines(fh.read(length), name, lineno)


def unpack(path: Path, name: str, folder: Path) -> Path:
    """A decompressed copy of the compressed JSON-lines file `path` in `folder`, for the row work to read by byte
    ranges (the caller removes it); a file that does not decompress raises SourceError naming the line reached."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="unpacked-", suffix=".jsonl", dir=folder)
    lines = 0
    try:
        with os.fdopen(fd, "wb") as out, _open(path, kind_of(path)[1]) as fh:
            while block := fh.read(1 << 16):  # small reads: a cut short file names a line close to the cut
                out.write(block)
                lines += block.count(b"\n")
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, READ_ERRORS):
            raise unreadable(name, exc, f"line {lines}" if lines else None) from None
        raise
    return Path(tmp)


def _json(path: Path, name: str, compression: str | None) -> Iterator[Raw]:
    with _open(path, compression) as fh:
        data = fh.read()
    stray = False
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:  # the records holding bytes that are not UTF-8 become errors
        text, stray = data.decode("utf-8-sig", "surrogateescape"), True
    if not text.strip():  # an empty file holds no records (the gate says so), rather than broken JSON
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    key = None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) != 1:
            raise SourceError(f"{name}: a JSON object must hold exactly one list of records; "
                              f"found {len(lists)} ({', '.join(lists) or 'none'})")
        key, data = lists[0], data[lists[0]]
    if not isinstance(data, list):
        raise SourceError(f"{name}: expected a JSON array of records (or an object holding one), got {type(data).__name__}")
    prefix = f"{name} {key}" if key else name
    for i, item in enumerate(data, start=1):
        if stray:
            as_text = json.dumps(item, ensure_ascii=False)
            if found := _stray_byte(as_text):
                yield Raw(i, f"{prefix} item {i}", error="not UTF-8 text (byte 0x%02X)" % found[0],
                          text=_shown(as_text))
                continue
        yield Raw(i, f"{prefix} item {i}", item)


def _cell(column: str, value: str | None) -> Any:
    if value is None or value == "":
        return None
    if column in JSON_COLUMNS and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _noting_stray_bytes(lines: Iterator[str], stray: dict[int, str]) -> Iterator[str]:
    """The lines, noting in `stray` each line number holding a byte that is not UTF-8 and where it is."""
    for n, line in enumerate(lines, start=1):
        if found := _stray_byte(line):
            stray[n] = "line %d: byte 0x%02X at column %d" % (n, *found)
        yield line


def _stray_up_to(stray: dict[int, str], last: int) -> str | None:
    """The first stray byte noted on lines up to `last` (those notes are dropped), or None."""
    found = sorted(n for n in stray if n <= last)
    for n in found[1:]:
        del stray[n]
    return stray.pop(found[0]) if found else None


def _csv(path: Path, name: str, delimiter: str, compression: str | None) -> Iterator[Raw]:
    csv.field_size_limit(sys.maxsize)
    stray: dict[int, str] = {}
    with io.TextIOWrapper(_open(path, compression), encoding="utf-8-sig", errors="surrogateescape",
                          newline="") as fh:
        reader = csv.reader(_noting_stray_bytes(fh, stray), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise SourceError(f"{name}: cannot read the header: {exc}") from None
        if stray:
            raise SourceError(f"{name}: the header is not UTF-8 text ({_stray_up_to(stray, reader.line_num)})")
        header = [h.strip() for h in header]
        row, start = 0, reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row += 1
                yield Raw(row, f"{name} row {row} (line {start})", error=f"broken CSV row: {exc}")
                start = reader.line_num + 1
                if stray:  # the broken row's lines: their notes are not the next row's
                    _stray_up_to(stray, reader.line_num)
                continue
            if not any(c.strip() for c in cells):
                start = reader.line_num + 1
                continue
            row += 1
            where = f"{name} row {row} (line {start})"
            start = reader.line_num + 1
            if stray and (why := _stray_up_to(stray, reader.line_num)):
                yield Raw(row, where, error=f"not UTF-8 text ({why})", text=_shown(delimiter.join(cells)))
                continue
            if len(cells) != len(header):
                yield Raw(row, where, error=f"{len(cells)} fields where the header has {len(header)}",
                          text=delimiter.join(cells)[:2000])
                continue
            yield Raw(row, where, {h: _cell(h, c) for h, c in zip(header, cells)})


def _plain(value: Any) -> Any:
    """Arrow/NumPy values as plain Python (lists of structs become lists of dicts)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parquet(path: Path, name: str) -> Iterator[Raw]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise SourceError(f"{name}: not a readable Parquet file: {exc}") from None
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield Raw(i, f"{name} row {i}", _plain(rec))


def _hf_folder(path: Path, name: str) -> Iterator[Raw]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise SourceError(f"{name}: not a readable `datasets` folder: {exc}") from None
    parts = ds.items() if isinstance(ds, DatasetDict) else [(None, ds)]
    row = 0
    for split, part in parts:
        assert isinstance(part, Dataset)
        for i, rec in enumerate(part, start=1):
            row += 1
            yield Raw(row, f"{name} {split + ' ' if split else ''}row {i}", _plain(rec))


def is_hf_folder(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json").is_file()


def _file(path: Path, name: str) -> Iterator[Raw]:
    kind, compression = kind_of(path)
    if kind == "jsonl":
        return _jsonl(path, name, compression)
    if kind == "json":
        return _json(path, name, compression)
    if kind in ("csv", "tsv"):
        return _csv(path, name, "\t" if kind == "tsv" else ",", compression)
    if kind == "parquet":
        return _parquet(path, name)
    suffix = "".join(path.suffixes[-2:]) if compression else path.suffix
    raise SourceError(f"{name}: unknown file kind '{suffix}' (readable: {READABLE})")


def _guarded(records: Iterator[Raw], name: str) -> Iterator[Raw]:
    """The records of one file; an error reading its bytes raises SourceError naming it and the last record read."""
    after = None
    try:
        for raw in records:
            after = raw.where
            yield raw
    except READ_ERRORS as exc:
        raise unreadable(name, exc, after and after.removeprefix(f"{name} ")) from None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and kind_of(p)[0]
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def local_records(path: Path) -> Iterator[Raw]:
    """Records of a local file or folder, numbered across the whole source."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file():
        yield from _guarded(_file(path, path.name), path.name)
        return
    if is_hf_folder(path):
        yield from _hf_folder(path, path.name)
        return
    files = _files(path)
    if not files:
        raise SourceError(f"{path}: a folder holding no readable files ({READABLE}) and not a `datasets` folder")
    row = 0
    for f in files:
        name = str(f.relative_to(path.parent))
        for raw in _guarded(_file(f, name), name):
            row += 1
            raw.row = row
            yield raw


def digest_local(path: Path) -> str:
    """SHA-256 of a source's bytes (every file, with its relative name, in a stable order)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        hash_file_into(h, f)
    return h.hexdigest()


def localise(uri: str, cache: Path, log) -> Path:
    """A local path for a source: itself, or the cached copy of an S3 prefix."""
    if not uri.startswith("s3://"):
        return Path(uri).expanduser()
    from tunewright.storage import fetch_s3

    try:
        return fetch_s3(uri, cache, log, what="data source")
    except FileNotFoundError as exc:
        raise SourceError(str(exc)) from None
    except Exception as exc:  # botocore errors: no bucket, no credentials, endpoint down
        raise SourceError(f"{uri}: cannot read from S3: {exc}") from None
