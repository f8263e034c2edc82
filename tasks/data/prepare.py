"""Stage 1 as a plain function: read, normalise, clean, de-duplicate, gate, split, balance, write.

`tunewright data check` and the Prefect task both call `prepare`, so a check on the command
line is the same code as stage 1 of a run. Every row is accounted for:
rows in = rows kept + rows quarantined + duplicates removed (exact and near), per source and in
total. The result is content-addressed by the source bytes and the recipe's data section, and
a later call with the same digest reuses it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.data import balance, cleaning, gate, intake, records, rowwork
from tunewright.files import write_atomic
from tunewright.recipe import DataConfig

VERSION = "stage1-v6"  # part of the digest: a change to what stage 1 does invalidates old results
SPLITS = ("train", "val", "test")


class DataGateError(RuntimeError):
    """The dataset failed its data gate; nothing downstream ran. `summary` holds the whole account."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


def digest_for(cfg: DataConfig, source_digests: list[str], tokenizer: str | None) -> str:
    blob = json.dumps({"v": VERSION, "data": cfg.model_dump(mode="json", exclude={"path", "sources", "workers"}),
                       "sources": [s.model_dump(mode="json", exclude={"path"}) for s in cfg.all_sources()],
                       "bytes": source_digests, "tokenizer": tokenizer if cfg.clean.max_tokens or cfg.clean.min_tokens
                       else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare(cfg: DataConfig, state: Path, *, tokenizer: str | None = None, out: Path | None = None,
            expect_kind: str | tuple[str, ...] | None = None, log=None, use_cache: bool = True) -> dict:
    """Run stage 1; return its summary (paths, counts, gate). Raises DataGateError when the gate fails,
    sources.SourceError when a source cannot be read, formats.FormatError for a mixed or unknown format."""
    # millions of small dicts and no reference cycles among them: the cyclic collector would only
    # rescan them over and over
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run(cfg, state, tokenizer=tokenizer, out=out, expect_kind=expect_kind, log=log, use_cache=use_cache)
    finally:
        if collecting:
            gc.enable()


def _run(cfg: DataConfig, state: Path, *, tokenizer: str | None, out: Path | None, expect_kind, log,
         use_cache: bool) -> dict:
    """Read the sources; reuse the result of the same digest, or prepare it with worker processes for large data."""
    import logging

    log = log or logging.getLogger("tunewright.data")
    t0 = time.perf_counter()
    srcs, digests = intake.read_sources(cfg, state, log)
    workers = None
    try:
        t_read = time.perf_counter()
        tok_name = cfg.clean.tokenizer or tokenizer
        digest = digest_for(cfg, digests, tok_name)
        out = out or state / "data" / digest[:16]
        cached = out / "summary.json"
        if use_cache and cached.is_file():
            summary = json.loads(cached.read_text())
            if summary.get("passed") and all(Path(summary["paths"][k]).is_file() for k in SPLITS):
                log.info("data: reusing the prepared dataset %s (same source bytes and data section)", digest[:16])
                summary["cached"] = True
                intake.check_kind(summary, expect_kind)
                return summary
        # worker processes for large data start now, so their start-up overlaps format detection
        workers = rowwork.workers_for(sum(s.rows_read for s in srcs), cfg.workers)
        return _prepare(cfg, state, srcs, digest, out, tok_name, expect_kind, log, t0, t_read, workers)
    finally:
        if workers is not None:
            workers.close()
        intake.release(srcs)  # after the workers: they read the decompressed copies


@dataclass
class _Work:
    """The rows of every source after the row work, and stage 1's account of them as each step leaves it.

    The gate's columns and the arrays the duplicate and contamination checks read are the largest
    things held: each is dropped (set to None) once no later step needs it.
    """

    kind: str
    format: str                                # the summary's name for the sources' format(s)
    columns: dict[str, list] | None            # the gate's columns, one list per column (gate.COLUMNS of the kind)
    extras: list[tuple]                        # (row, cleaning steps, redactions, notes) of the rows that have any
    n_rows: int                                # rows the row work normalised, before mixing
    n_words: np.ndarray | None                 # words in each row's non-system turns
    grams: cleaning.Ragged | None              # hashes of each row's contamination n-grams
    digests: np.ndarray | None                 # MinHash of each row (near-duplicate removal on)
    bands: np.ndarray | None                   # their LSH band keys
    examples: list[dict] = field(default_factory=list)
    at: dict[int, dict] | None = None          # the example at each surviving row position, when mixing left rows out
    cleaner: cleaning.Cleaner | None = None    # the counts of what cleaning changed
    repairs: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    checked: list[dict] = field(default_factory=list)              # expectation results
    reasons: dict[int, list[str]] = field(default_factory=dict)    # example index -> why the row-level gate rejects it
    quarantine: list[dict] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)
    contaminated: int = 0
    per_source: dict[str, dict] = field(default_factory=dict)      # the row accounting of each source
    totals: dict[str, int] = field(default_factory=dict)
    gate_reasons: list[str] = field(default_factory=list)
    passed: bool = False


def _prepare(cfg: DataConfig, state: Path, srcs: list[intake.Source], digest: str, out: Path,
             tok_name: str | None, expect_kind, log, t0: float, t_read: float, workers) -> dict:
    """Every step of stage 1 after reading, in order, each a helper below; the summary."""
    marks = {"start": t0, "read": t_read}
    undecided = intake.detect_formats(srcs, expect_kind)

    # the per-row work (read, normalise, clean, key, label, split, word hashes), in worker processes for large data
    mixing = any(s.cfg.max_rows is not None or s.cfg.weight is not None for s in srcs)
    job = rowwork.Job(cfg, key_before_cleaning=mixing)
    results = _row_work(job, srcs, undecided, workers, log)
    kind, summary_format = intake.check_formats(srcs, expect_kind)
    work = _gather(results, srcs, kind, summary_format, mixing)
    for src in srcs:
        log.info("read %d rows from %s: format %s, %d unreadable", src.rows_read, src.name, src.format,
                 len(src.unparseable))
    intake.mix(srcs)
    _keep_mixed(work, srcs, mixing)
    has_tokens = bool(cfg.clean.max_tokens or cfg.clean.min_tokens)
    if has_tokens:
        _count_tokens(work, tok_name, state)
    _count_cleaning(cfg, work)
    _count_scores(cfg, work, srcs, log)
    marks["clean"] = time.perf_counter()

    _dedupe(cfg, work)
    marks["dedup"] = time.perf_counter()

    has_labels = bool(cfg.balance.label_field) or any(ex.get("class") is not None for ex in work.examples)
    _row_gate(cfg, work, srcs, has_labels, has_tokens)
    marks["row_gate"] = time.perf_counter()

    _split(cfg, work)
    marks["splits"] = time.perf_counter()
    work.checked = work.checked + (gate.check_dataset(work.kept, cfg, has_labels) if work.kept or work.examples
                                   else [])

    _account(cfg, srcs, work)
    paths, splits, classes = _write(cfg, state, out, work, has_labels, log)
    summary = _summary(cfg, work, digest, splits, classes, paths, marks)
    gate.html_report(Path(paths["report"]), summary)
    write_atomic(paths["summary"], json.dumps(summary, indent=1, default=str))
    if not work.passed:
        raise DataGateError(gate.describe_failure(summary, paths["quarantine"]), summary)
    return summary


def _row_work(job: rowwork.Job, srcs: list[intake.Source], undecided: list[int], workers,
              log) -> list[tuple[intake.Source, rowwork.Chunk]]:
    """Every chunk's result with its source, in order; each source the row work read gets its format."""
    multi = len(srcs) > 1
    owner, tasks = [], []
    for src in srcs:
        if src.error is not None:
            continue
        if src.raws is None:
            todo = rowwork.file_chunks(src.cfg.format, src.name, multi, src.path, src.file_name, src.cfg.columns,
                                        src.ranges)
        else:
            todo = rowwork.chunks(src.format, src.name, multi, src.raws)
            src.raws = []
        for t in todo:
            owner.append(src)
            tasks.append(t)
    results = list(zip(owner, rowwork.run(job, tasks, workers, log=log, while_waiting=gate.preload)))
    for src in (srcs[i] for i in undecided):
        _settle(job, src, results, multi)
    return results


def _settle(job: rowwork.Job, src: intake.Source, results: list[tuple[intake.Source, rowwork.Chunk]],
            multi: bool) -> None:
    """The row count and format of a source the row work read; its chunks of rows of no known shape are read again."""
    mine = [(i, c) for i, (s, c) in enumerate(results) if s is src]
    src.rows_read = sum(c.rows_read for _, c in mine)
    intake.detect_from_chunks(src, [c for _, c in mine])
    if src.error is not None:
        return
    for i, chunk in mine:
        if chunk.pending is not None:  # rows of no known shape, read again as the source's format
            results[i] = (src, rowwork.run_here(job, ("raws", src.format, src.name, multi, chunk.pending)))
        elif chunk.examples and chunk.fmt not in (None, src.format):
            raise AssertionError(f"{src.name}: a chunk was read as {chunk.fmt}, the source is {src.format}")


def _gather(results: list[tuple[intake.Source, rowwork.Chunk]], srcs: list[intake.Source], kind: str,
            summary_format: str, mixing: bool) -> _Work:
    """Every chunk's results side by side, its examples with their sources. The list is emptied, so each chunk is
    freed before its arrays are joined (the peak holds one copy)."""
    columns: dict[str, list] = {c: [] for c in gate.COLUMNS[kind]}
    extras, n_words, grams, digests, bands = [], [], [], [], []
    n_rows = 0
    for src, chunk in results:
        if mixing:
            for j, ex in enumerate(chunk.examples):
                ex["_i"] = n_rows + j
        for j, steps, found, notes in chunk.extras:
            extras.append((n_rows + j, steps, found, notes))
        n_rows += len(chunk.examples)
        src.examples.extend(chunk.examples)
        src.unparseable.extend(chunk.unparseable)
        if chunk.examples:
            for c, values in chunk.columns.items():
                columns[c].extend(values)
            n_words.append(chunk.n_words)
            grams.append(chunk.grams)
            if chunk.digests is not None:
                digests.append(chunk.digests)
                bands.append(chunk.bands)
    results.clear()
    return _Work(kind=kind, format=summary_format, columns=columns, extras=extras, n_rows=n_rows,
                 n_words=np.concatenate(n_words) if n_words else np.zeros(0, dtype=np.int64),
                 grams=cleaning.Ragged.concat(grams), digests=_stack(digests) if digests else None,
                 bands=_stack(bands) if bands else None)


def _keep_mixed(work: _Work, srcs: list[intake.Source], mixing: bool) -> None:
    """The examples the sources contribute after mixing; when mixing left rows out, only their columns and arrays."""
    work.examples = [ex for s in srcs for ex in s.examples]
    if not mixing:
        return
    rows_idx = np.fromiter((ex.pop("_i") for ex in work.examples), dtype=np.int64, count=len(work.examples))
    if len(rows_idx) < work.n_rows:
        work.at = dict(zip(rows_idx.tolist(), work.examples))
        work.columns = {c: [values[i] for i in rows_idx] for c, values in work.columns.items()}
        work.n_words, work.grams = work.n_words[rows_idx], work.grams.take(rows_idx)
        if work.digests is not None:
            work.digests, work.bands = work.digests[rows_idx], work.bands[rows_idx]


def _count_tokens(work: _Work, tok_name: str | None, state: Path) -> None:
    """Each example's length in tokens of the recipe's tokenizer, for the gate's length checks."""
    from tunewright.tokenizer import load_tokenizer

    counter = cleaning.token_counter(load_tokenizer(tok_name or "smollm2-135m-instruct", state))
    tokens = work.columns["tokens"]
    examples = work.examples
    for i in range(0, len(examples), 4096):
        chunk = examples[i:i + 4096]
        for j, (ex, n) in enumerate(zip(chunk, counter([records.full(dict(ex)) for ex in chunk]))):
            ex["tokens"] = tokens[i + j] = n


def _count_cleaning(cfg: DataConfig, work: _Work) -> None:
    """What cleaning changed and redacted in the examples mixing kept, and their repairs, each with where it was."""
    cleaner = cleaning.Cleaner(cfg.clean)
    for i, steps, found, notes in work.extras:
        if work.at is not None:
            ex = work.at.get(i)
            if ex is None:  # left out by mixing
                continue
        else:
            ex = work.examples[i]
        for step in steps:
            cleaner.steps[step] += 1
        if found:
            cleaner.redactions.update(found)
        for note in notes:
            work.repairs.append({"where": ex["where"], "id": ex["id"], "note": note})
    work.cleaner = cleaner


def _count_scores(cfg: DataConfig, work: _Work, srcs: list[intake.Source], log) -> None:
    """With `min_score_margin`: the pairs it quarantined and the pairs kept unchecked for want of scores, as cleaning
    counts (`below_score_margin`, `no_scores`)."""
    if cfg.clean.min_score_margin is None:
        return
    if work.kind != "preference":
        log.warning("data.clean.min_score_margin applies to preference pairs; this data is %s (ignored)", work.kind)
        return
    below = sum(1 for s in srcs for q in s.unparseable if q.get("filtered") == "min_score_margin")
    unscored = sum(1 for m in work.columns["score_margin"] if m is None)
    work.cleaner.steps.update({k: n for k, n in (("below_score_margin", below), ("no_scores", unscored)) if n})


def _dedupe(cfg: DataConfig, work: _Work) -> None:
    """Mark duplicates: exact on folded content, then near with MinHash LSH among the rows left."""
    first: dict[str, dict] = {}
    examples = work.examples
    for ex in examples:
        key = ex["key"]
        if cfg.clean.dedupe and key in first:
            ex["dup"] = "exact"
            ex["dedup_key"] = key
            work.duplicates.append({"where": ex["where"], "id": ex["id"], "source": ex["source"], "kind": "exact",
                                    "duplicate_of": first[key]["id"], "similarity": 1.0})
            continue
        first.setdefault(key, ex)
        ex["dedup_key"] = key
    if work.digests is not None and examples:
        active = (work.n_words > 0) & np.fromiter((not ex.get("dup") for ex in examples), dtype=bool,
                                                  count=len(examples))
        near = cleaning.near_duplicates(work.digests, active, cfg.clean.near_dedupe_threshold, work.bands)
        for i, (orig, sim) in sorted(near.items()):
            ex, orig = examples[i], examples[orig]
            ex["dup"] = "near"
            ex["dedup_key"] = orig["dedup_key"]
            work.duplicates.append({"where": ex["where"], "id": ex["id"], "source": ex["source"], "kind": "near",
                                    "duplicate_of": orig["id"], "similarity": round(sim, 3)})
    work.digests = work.bands = work.n_words = None  # the largest arrays: gone before the gate's frame is built
    work.columns["dedup_key"] = [ex["dedup_key"] for ex in examples]


def _row_gate(cfg: DataConfig, work: _Work, srcs: list[intake.Source], has_labels: bool, has_tokens: bool) -> None:
    """The row-level gate: the rows it rejects go to the quarantine (after those no source could parse)."""
    if work.examples:
        work.checked, work.reasons = gate.check_rows(work.columns, work.kind, cfg, has_labels, has_tokens)
    work.columns = None
    work.quarantine = [q for s in srcs for q in s.unparseable]
    for i, ex in enumerate(work.examples):
        if ex.get("dup"):
            continue
        if i in work.reasons:
            work.quarantine.append(records.quarantined(ex, work.reasons[i]))
            continue
        work.kept.append(ex)


def _split(cfg: DataConfig, work: _Work) -> None:
    """Splits and folds of the kept examples, and the train/test overlap check."""
    kept = work.kept
    for ex in kept:  # the row work computed both (from the key and the label)
        ex["split"] = ex["_split"]
        if cfg.balance.kfolds:
            ex["fold"] = ex["_fold"]
    kept_idx = np.array([i for i, ex in enumerate(work.examples) if not ex.get("dup") and i not in work.reasons],
                        dtype=np.int64)
    train_pos = [j for j, ex in enumerate(kept) if ex["split"] == "train"]
    held_pos = [j for j, ex in enumerate(kept) if ex["split"] != "train"]
    seen = cleaning.overlap(work.grams.take(kept_idx[np.array(train_pos, dtype=np.int64)]),
                            work.grams.take(kept_idx[np.array(held_pos, dtype=np.int64)]),
                            cfg.clean.contamination_threshold)
    work.grams = None
    dropped = set()
    for h, (t, share) in seen.items():
        ex, source_ex = kept[held_pos[h]], kept[train_pos[t]]
        work.contaminated += 1
        ex["contaminated"] = source_ex["id"]
        if cfg.clean.contamination == "remove":
            q = records.quarantined(ex, [f"contamination: {share:.0%} of this {ex['split']} example's "
                                         f"{cfg.clean.contamination_ngram}-word sequences occur in training "
                                         f"(most in {source_ex['id']})"])
            q["contamination"] = True
            work.quarantine.append(q)
            dropped.add(held_pos[h])
    work.kept = [ex for j, ex in enumerate(kept) if j not in dropped]


def _account(cfg: DataConfig, srcs: list[intake.Source], work: _Work) -> None:
    """Rows in = rows kept + quarantined + duplicates removed, per source and in total; then the gate's verdict."""
    for s in srcs:
        work.per_source[s.name] = {
            "path": s.cfg.path, "format": s.format, "rows_read": s.rows_read, "rows_sampled_out": s.sampled_out,
            "rows_in": len(s.examples) + len(s.unparseable),
            "rows_kept": sum(1 for ex in work.kept if ex["source"] == s.name),
            "rows_quarantined": sum(1 for q in work.quarantine if q["source"] == s.name),
            "duplicates_removed": sum(1 for d in work.duplicates if d["source"] == s.name and d["kind"] == "exact"),
            "near_duplicates_removed": sum(1 for d in work.duplicates
                                           if d["source"] == s.name and d["kind"] == "near"),
        }
    totals = work.totals = {k: sum(v[k] for v in work.per_source.values()) for k in
                            ("rows_read", "rows_sampled_out", "rows_in", "rows_kept", "rows_quarantined",
                             "duplicates_removed", "near_duplicates_removed")}
    for name, v in list(work.per_source.items()) + [("total", totals)]:
        assert v["rows_in"] == v["rows_kept"] + v["rows_quarantined"] + v["duplicates_removed"] + \
            v["near_duplicates_removed"], f"row accounting does not reconcile for {name}: {v}"

    for s in srcs:  # a source with no records (an empty file) leaves the gate nothing to judge it on
        if not s.rows_read:
            work.gate_reasons.append(f"no rows in source {s.name} ({s.cfg.path} holds no records)")
    # rows held out of evaluation as seen in training, or dropped by a recipe filter, are not bad rows: they do not
    # count against the tolerance
    rejected = sum(1 for q in work.quarantine if not q.get("contamination") and not q.get("filtered"))
    frac = rejected / max(totals["rows_in"], 1)
    if frac > cfg.gate.max_rejected_fraction:
        work.gate_reasons.append(f"{rejected} of {totals['rows_in']} rows rejected ({frac:.1%}); "
                                 f"data.gate.max_rejected_fraction allows {cfg.gate.max_rejected_fraction:.1%}")
    table_failed = [c for c in work.checked if not c["success"] and not c["row_level"]]
    work.passed = not work.gate_reasons and not table_failed


def _write(cfg: DataConfig, state: Path, out: Path, work: _Work, has_labels: bool,
           log) -> tuple[dict[str, str], dict[str, list[dict]], dict | None]:
    """Write the splits (when the gate passed), the rows undersampling left out, the quarantine and the duplicates;
    (the paths of every output, the examples of each split, the class report)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / f"{name}.jsonl") for name in SPLITS}
    paths.update(quarantine=str(out / "quarantine.jsonl"), duplicates=str(out / "duplicates.jsonl"),
                 report=str(out / "data_gate.html"), summary=str(out / "summary.json"))
    splits = {name: [ex for ex in work.kept if ex["split"] == name] for name in SPLITS}
    classes, left_out = None, []
    if work.passed:
        classes, left_out = _balance(cfg, state, splits, work.kept, has_labels, log)
        for name, recs in splits.items():
            records.write_examples(Path(paths[name]), recs)
    if left_out:
        paths["undersampled"] = str(out / "undersampled.jsonl")
        records.write_examples(Path(paths["undersampled"]), left_out)
    work.quarantine.sort(key=lambda q: (q["source"], q["row"]))
    records.write_jsonl(Path(paths["quarantine"]), work.quarantine)
    records.write_jsonl(Path(paths["duplicates"]), work.duplicates)
    return paths, splits, classes


def _balance(cfg: DataConfig, state: Path, splits: dict[str, list[dict]], kept: list[dict], has_labels: bool,
             log) -> tuple[dict | None, list[dict]]:
    """Resample and augment the training split in `splits`; (the class report, the rows undersampling left out)."""
    if cfg.balance.augment_to:  # augmentation rewrites turns: the training rows need theirs
        for ex in splits["train"]:
            records.full(ex)
    train, left_out, resampled = balance.resample(splits["train"], cfg.balance, cfg.split.seed)
    added, augmented = balance.augment(train, cfg.balance, cfg.split.seed, state, log)
    splits["train"] = train + added
    if not has_labels:
        return None, left_out
    dist = balance.distribution([ex.get("class") for ex in kept])
    return {"label_field": cfg.balance.label_field, "distribution": dist,
            "train_distribution": balance.distribution([ex.get("class") for ex in splits["train"]]),
            "weights": balance.class_weights(dist), "resampling": resampled, "augmentation": augmented}, left_out


def _summary(cfg: DataConfig, work: _Work, digest: str, splits: dict[str, list[dict]], classes: dict | None,
             paths: dict[str, str], marks: dict[str, float]) -> dict:
    """The whole account of stage 1 (summary.json), from which the report and the MLflow metrics are made."""
    elapsed = time.perf_counter() - marks["start"]
    return {
        "format": work.format, "kind": work.kind, "digest": digest[:16], "digest_full": digest, "passed": work.passed,
        "cached": False, **work.totals, "sources": work.per_source,
        "redactions": dict(work.cleaner.redactions), "cleaning": dict(work.cleaner.steps),
        "contaminated": work.contaminated, "contamination_action": cfg.clean.contamination,
        "splits": {k: len(v) for k, v in splits.items()}, "folds": cfg.balance.kfolds or None,
        "classes": classes, "expectations": work.checked, "gate_reasons": work.gate_reasons,
        "gate": cfg.gate.model_dump(mode="json"),
        "quarantine": [{k: v for k, v in q.items() if k in ("source", "row", "where", "id", "reasons", "unparseable",
                                                             "contamination", "filtered")}
                       for q in work.quarantine],
        "duplicates_sample": work.duplicates[:100], "repairs": work.repairs[:1000], "n_repairs": len(work.repairs),
        "system_prompt": (_common_system_prompt(splits["train"]) if work.kind in ("sft", "preference", "feedback")
                          else None),
        "paths": paths, "seconds": {
            "total": round(elapsed, 2), "read": round(marks["read"] - marks["start"], 2),
            "clean": round(marks["clean"] - marks["read"], 2), "dedup": round(marks["dedup"] - marks["clean"], 2),
            "row_gate": round(marks["row_gate"] - marks["dedup"], 2),
            "splits": round(marks["splits"] - marks["row_gate"], 2),
            "write": round(elapsed - (marks["splits"] - marks["start"]), 2)},
    }


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate of the parts, each freed once copied (the list is emptied): the peak holds one copy."""
    out = np.empty((sum(len(p) for p in parts),) + parts[0].shape[1:], dtype=parts[0].dtype)
    at = 0
    parts.reverse()
    while parts:
        p = parts.pop()
        out[at:at + len(p)] = p
        at += len(p)
    return out


def _common_system_prompt(records: list[dict]) -> str | None:
    """The system turn most training records start with; serving puts it before user prompts."""
    found = Counter()
    for r in records:
        if "sys0" in r:  # the row work noted it (copies made here keep their source's system turn)
            if r["sys0"] is not None:
                found[r["sys0"]] += 1
            continue
        t = r["messages"] if "messages" in r else r["prompt"]
        if t and t[0]["role"] == "system":
            found[t[0]["content"]] += 1
    return found.most_common(1)[0][0] if found else None


