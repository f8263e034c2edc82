"""Stage 1's intake: each source of the recipe read (or scanned for the row work), its format told, and the mix.

A JSON-lines file is only scanned here (its digest and ranges of lines): the row work reads and
parses it in chunks and tells its format from what the chunks saw; a compressed one is first
decompressed to a copy in the state folder, which the caller removes (`release`). Any other
source is read here, record by record. Mixing then caps each source's rows and weighs sources
against each other, by content hash, so the choice is stable as rows are appended.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from tasks.data import balance, formats, rowwork, sources
from tunewright.recipe import DataConfig, SourceConfig


def _take(examples: list[dict], n: int, salt: str) -> tuple[list[dict], list[dict]]:
    """The n examples with the lowest content hash (deterministic, stable as rows are appended), in order."""
    if n >= len(examples):
        return examples, []
    ranked = sorted(range(len(examples)), key=lambda i: balance.unit(salt, examples[i]["key0"]))
    keep = set(ranked[:n])
    return ([ex for i, ex in enumerate(examples) if i in keep], [ex for i, ex in enumerate(examples) if i not in keep])


class Source:
    """One source of the recipe as stage 1 holds it: its records (or the ranges the row work reads), format and
    examples."""

    def __init__(self, cfg: SourceConfig, name: str):
        self.cfg, self.name = cfg, name
        self.format = "?"
        self.rows_read = 0
        self.examples: list[dict] = []
        self.unparseable: list[dict] = []
        self.sampled_out = 0
        self.raws: list | None = None  # records read here; None for a JSON-lines file the row work reads
        self.path: Path | None = None  # the JSON-lines file the row work reads (a decompressed copy: also `scratch`)
        self.file_name = ""             # the name its records are described with
        self.scratch: Path | None = None
        self.ranges: list[tuple[int, int, int]] = []
        self.error: formats.FormatError | None = None  # its format cannot be told, raised in source order


def read_sources(cfg: DataConfig, state: Path, log) -> tuple[list[Source], list[str]]:
    """Each source of the recipe, read or scanned; (the sources, the digest of each one's bytes). The caller
    `release`s the sources when done."""
    srcs, digests = [], []
    names = Counter()
    try:
        for s in cfg.all_sources():
            name = s.label()
            names[name] += 1
            if names[name] > 1:
                name = f"{name}#{names[name]}"
            srcs.append(Source(s, name))
            try:
                digests.append(_read(srcs[-1], cfg, state, log))
            except sources.READ_ERRORS as exc:  # the source's bytes as a whole: its records name themselves
                raise sources.unreadable(getattr(exc, "filename", None) or name, exc) from None
    except BaseException:
        release(srcs)
        raise
    return srcs, digests


def _read(src: Source, cfg: DataConfig, state: Path, log) -> str:
    """Read one source here, or scan it for the row work to read; the digest of its bytes as stored."""
    s = src.cfg
    local = sources.localise(s.path, state / "data-cache" / "s3", log)
    kind, compression = sources.kind_of(local) if local.is_file() else (None, None)
    if cfg.max_examples is None and kind == "jsonl":  # the row work reads and parses it, a range of lines per chunk
        src.file_name = local.name
        src.path = local
        if compression:  # ranges of bytes need the bytes as they decompress: a copy, removed by `release`
            src.path = src.scratch = sources.unpack(local, local.name, state / "data-cache" / "unpacked")
        digest, src.ranges, src.rows_read = sources.scan_jsonl(src.path, rowwork.CHUNK_BYTES)
        return sources.digest_local(local) if compression else digest
    digest = sources.digest_local(local)
    raws = []
    for raw in sources.local_records(local):
        if cfg.max_examples is not None and len(raws) >= cfg.max_examples:
            break
        if raw.error is None and s.columns and isinstance(raw.value, dict):
            raw.value = {s.columns.get(k, k): v for k, v in raw.value.items()}
        raws.append(raw)
    src.rows_read = len(raws)
    src.raws = raws
    return digest


def release(srcs: list[Source]) -> None:
    """Remove the decompressed copies `read_sources` made."""
    for src in srcs:
        if src.scratch is not None:
            src.scratch.unlink(missing_ok=True)
            src.scratch = None


def detect(src: Source) -> None:
    parsed = [(r.where, r.value) for r in src.raws if r.error is None]
    try:
        src.format = src.cfg.format if src.cfg.format != "auto" else (
            formats.detect(parsed, src.name) if parsed else "chat")
    except formats.FormatError as exc:
        src.error = exc


def detect_from_chunks(src: Source, results: list[rowwork.Chunk]) -> None:
    """The format of a source the row work read, from the shapes its chunks saw (as `formats.detect` tells it)."""
    if src.cfg.format != "auto":
        src.format = src.cfg.format
        return
    seen: dict[str, list] = {}
    fields: list[list] = []
    for chunk in results:
        for shape, (n, wheres) in (chunk.seen or {}).items():
            entry = seen.setdefault(shape, [0, []])
            entry[0] += n
            entry[1].extend(wheres[:3 - len(entry[1])])
        fields.extend(chunk.fields_seen[:50 - len(fields)] if chunk.fields_seen else ())
    try:
        src.format = formats.decide(seen, fields, src.name) if seen else "chat"
    except formats.FormatError as exc:
        src.error = exc


def mix(srcs: list[Source]) -> None:
    """Row caps, then weights: weighted sources contribute in proportion, as large as the smallest allows."""
    for src in srcs:
        if src.cfg.max_rows is not None:
            src.examples, out = _take(src.examples, src.cfg.max_rows, f"cap:{src.name}")
            src.sampled_out += len(out)
    weighted = [s for s in srcs if s.cfg.weight is not None]
    if len(weighted) < 2:
        return
    total_w = sum(s.cfg.weight for s in weighted)
    size = min(len(s.examples) / (s.cfg.weight / total_w) for s in weighted if s.cfg.weight)
    for s in weighted:
        n = math.floor(size * s.cfg.weight / total_w + 1e-9)
        s.examples, out = _take(s.examples, n, f"weight:{s.name}")
        s.sampled_out += len(out)


def check_formats(srcs: list[Source], expect_kind) -> tuple[str, str]:
    """The kind of data and the summary's name for its format(s); the first source's format error, a mix of
    kinds, or a kind this run does not train on raise FormatError."""
    for s in srcs:
        if s.error is not None:
            raise s.error
    kinds = {formats.KIND[s.format] for s in srcs if s.rows_read}
    if len(kinds) > 1:
        raise formats.FormatError("sources hold different kinds of data (" + ", ".join(
            f"{s.name}: {s.format}" for s in srcs) + "); one recipe trains on one kind")
    kind = kinds.pop() if kinds else "sft"
    fmts = sorted({s.format for s in srcs})
    summary_format = fmts[0] if len(fmts) == 1 else "+".join(fmts)
    if not _kind_ok(kind, expect_kind):
        raise formats.FormatError(_kind_message(summary_format, kind, expect_kind))
    return kind, summary_format


def detect_formats(srcs: list[Source], expect_kind) -> list[int]:
    """Detect the format of each source read here; the positions of the sources the row work reads."""
    for src in srcs:
        if src.raws is not None:
            detect(src)
        elif src.cfg.format != "auto":
            src.format = src.cfg.format
    # a JSON-lines file the row work reads tells its format and row count when that is done; until then only
    # a format error no such source precedes can be raised
    undecided = [i for i, s in enumerate(srcs) if s.raws is None]
    if not undecided:
        check_formats(srcs, expect_kind)
    else:
        for s in srcs[:undecided[0]]:
            if s.error is not None:
                raise s.error
    return undecided


def _kind_ok(kind: str, expect: str | tuple[str, ...] | None) -> bool:
    return not expect or kind in ((expect,) if isinstance(expect, str) else expect)


def _kind_message(fmt: str, kind: str, expect: str | tuple[str, ...]) -> str:
    what = {"sft": "conversations (chat, ShareGPT, alpaca, prompt/completion, labelled text)",
            "preference": "preference pairs", "feedback": "unpaired feedback (KTO)", "text": "raw text"}
    wanted = " or ".join(what[k] for k in ((expect,) if isinstance(expect, str) else expect))
    return (f"the data is {what[kind]} (format {fmt}), but this run trains on {wanted} (train.objective picks "
            f"which); `tunewright data check` prepares and gates any format")


def check_kind(summary: dict, expect_kind) -> None:
    if not _kind_ok(summary["kind"], expect_kind):
        raise formats.FormatError(_kind_message(summary["format"], summary["kind"], expect_kind))
