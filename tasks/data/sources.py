"""Readers: every source a recipe can name, as records with the place each came from.

A source is a local file (JSONL, JSON, CSV/TSV, Parquet), a folder written by
`datasets.Dataset.save_to_disk`, a folder of such files, or an `s3://bucket/prefix` (fetched
through boto3 into a cache keyed by the objects' ETags). A row that cannot be parsed becomes a
record with an error instead of a value, so it is quarantined with its file and line; a source
that cannot be read at all raises `SourceError`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunewright.files import hash_file_into

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
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


def _jsonl(path: Path, name: str) -> Iterator[Raw]:
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield Raw(lineno, f"{name} line {lineno}", json.loads(line))
                except json.JSONDecodeError as exc:
                    yield Raw(lineno, f"{name} line {lineno}", error=f"not JSON ({exc.msg} at column {exc.colno})",
                              text=line.rstrip("\n")[:2000])
        except UnicodeDecodeError as exc:
            raise SourceError(f"{name}: not UTF-8 text after line {lineno}: {exc}") from None


def _bad_line(line: str, lineno: int, name: str) -> Raw:
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        return Raw(lineno, f"{name} line {lineno}", error=f"not JSON ({exc.msg} at column {exc.colno})",
                   text=line.rstrip("\n")[:2000])
    raise AssertionError("a line that failed to parse parsed")


def scan_jsonl(path: Path, chunk_bytes: int = 1 << 20) -> tuple[str, list[tuple[int, int, int]], int] | None:
    """A JSON-lines file's digest (as `digest_local`), its byte ranges of whole lines (about `chunk_bytes` each)
    and its number of lines.

    Each range is (offset, length, number of its first line), for `jsonl_range` to read in a worker
    process. None when the file holds a carriage return or text that is not UTF-8: `_jsonl` reads
    such a file, since its lines and errors are those of Python's text mode.
    """
    h = hashlib.sha256(path.name.encode() + b"\0")
    ranges, offset, lineno = [], 0, 1
    with path.open("rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                break
            if not block.endswith(b"\n"):
                block += fh.readline()
            if b"\r" in block:
                return None
            if not block.isascii():
                try:
                    block.decode("utf-8")
                except UnicodeDecodeError:
                    return None
            h.update(block)
            ranges.append((offset, len(block), lineno))
            offset += len(block)
            lineno += block.count(b"\n")
    return h.hexdigest(), ranges, lineno - 1


def jsonl_range(path: Path, name: str, offset: int, length: int, lineno: int) -> list[Raw]:
    """The records of one range of `scan_jsonl`, numbered and described as `_jsonl` does."""
    with path.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read(length).decode("utf-8").split("\n")
    last = lines.pop()  # what follows the range's last newline: empty, or the file's unterminated last line
    out = []
    loads = json.loads
    for n, line in enumerate(lines, start=lineno):
        if not line.strip():
            continue
        try:  # without its newline the line parses the same; a failure is described with it, as `_jsonl` does
            out.append(Raw(n, f"{name} line {n}", loads(line)))
        except json.JSONDecodeError:
            out.append(_bad_line(line + "\n", n, name))
    if last.strip():
        lineno += len(lines)
        try:
            out.append(Raw(lineno, f"{name} line {lineno}", loads(last)))
        except json.JSONDecodeError:
            out.append(_bad_line(last, lineno, name))
    return out


def _json(path: Path, name: str) -> Iterator[Raw]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{name}: not UTF-8 text: {exc}") from None
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


def _csv(path: Path, name: str, delimiter: str) -> Iterator[Raw]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise SourceError(f"{name}: cannot read the header: {exc}") from None
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
                continue
            except UnicodeDecodeError as exc:
                raise SourceError(f"{name}: not UTF-8 text near line {reader.line_num}: {exc}") from None
            if not any(c.strip() for c in cells):
                start = reader.line_num + 1
                continue
            row += 1
            where = f"{name} row {row} (line {start})"
            start = reader.line_num + 1
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
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "jsonl":
        return _jsonl(path, name)
    if kind == "json":
        return _json(path, name)
    if kind in ("csv", "tsv"):
        return _csv(path, name, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return _parquet(path, name)
    raise SourceError(f"{name}: unknown file kind '{path.suffix}' (readable: {', '.join(sorted(SUFFIXES))})")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def local_records(path: Path) -> Iterator[Raw]:
    """Records of a local file or folder, numbered across the whole source."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file():
        yield from _file(path, path.name)
        return
    if is_hf_folder(path):
        yield from _hf_folder(path, path.name)
        return
    files = _files(path)
    if not files:
        raise SourceError(f"{path}: folder holds no readable files ({', '.join(sorted(SUFFIXES))} or a `datasets` folder)")
    row = 0
    for f in files:
        for raw in _file(f, str(f.relative_to(path.parent))):
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
