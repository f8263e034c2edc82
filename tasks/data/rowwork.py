"""The per-row work of stage 1, in chunks: read, normalise, clean, key, label, split, hash words, serialise.

Everything here depends on one row at a time, so a large source is cut into chunks that worker
processes handle side by side; a small one runs in the stage's own process. Chunks come back in
order, so the result is the same either way. What needs all rows at once (duplicates, the gate,
contamination) stays in `prepare`.

A chunk hands back light examples (ids, keys, label, split and the row's output record already
serialised as JSON), the gate's columns, and numpy arrays for the duplicate and contamination
checks, so the stage's own process does little per row. A chunk of a local JSON-lines file is
read and parsed by the worker itself; when that source's format is `auto`, the chunk's rows decide
its format, and `prepare` checks that every chunk of the source saw the same one.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from tasks.data import balance, cleaning, formats, gate, sources
from tasks.data.records import KIND_FIELDS
from tunewright.files import save_atomic
from tunewright.recipe import DataConfig

CHUNK = 2048             # rows per chunk of a source read by the stage's process
CHUNK_BYTES = 1 << 20    # bytes per chunk of a JSON-lines file read by the workers
PARALLEL_MIN = 20_000    # fewer rows than this are not worth starting workers for



@dataclass
class Job:
    cfg: DataConfig
    key_before_cleaning: bool = False              # mixing by weight or row cap ranks rows by their raw content
    num_perm: int = 128


@dataclass
class Chunk:
    """One chunk's results. Each example is a light dict: id, source, row, where, kind, key, class, sys0 (the
    content of a leading system turn), _split, _fold, the output record as JSON (`json`, with `cut` where
    optional fields go) and key0 when mixing needs it."""

    examples: list[dict] = field(default_factory=list)
    unparseable: list[dict] = field(default_factory=list)
    rows_read: int = 0
    columns: dict[str, list] | None = None  # the gate's columns, one list per column (gate.COLUMNS of the kind)
    extras: list[tuple] = field(default_factory=list)  # (example index, steps, redactions, notes) where any
    n_words: np.ndarray | None = None       # words in each example's non-system turns
    grams: cleaning.Ragged | None = None    # hashes of each example's contamination n-grams
    digests: np.ndarray | None = None       # MinHash of each example's word 3-grams (near-duplicate removal on)
    bands: np.ndarray | None = None         # their LSH band keys (cleaning.band_keys)
    # a chunk of a source whose format is detected here: the shapes its rows have, {shape: [rows, first wheres]},
    # the fields of its first parsed records, the format it was read as (None: not read, see `pending`)
    seen: dict[str, list] | None = None
    fields_seen: list[list] | None = None
    fmt: str | None = None
    pending: list | None = None             # parsed records of a chunk with no known shape, to be read again
    seconds: float = 0.0                     # time the chunk took where it ran


# a worker's entry: through the module's import, so the chunks it returns unpickle as tasks.data.rowwork.Chunk
_WORKER = "import sys; from tasks.data.rowwork import serve_chunks; serve_chunks(sys.argv[1])"

_JOB: Job | None = None  # this process's job: set by `run`, or read first by a worker


def _unparseable(src: str, rec, reasons: list[str], **extra) -> dict:
    return {"source": src, "row": rec.row, "where": rec.where, "reasons": reasons, **extra}


_JSON = json.JSONEncoder(ensure_ascii=False, default=str)  # as json.dumps(value, ensure_ascii=False, default=str)
_dumps = _JSON.encode


def _shapes(raws: list, out: Chunk) -> str | None:
    """Record the shapes of a chunk's parsed rows; the one known shape, or None when there is not exactly one."""
    seen: dict[str, list] = {}
    fields_seen: list[list] = []
    for raw in raws:
        if raw.error is not None:
            continue
        kind = formats.shape(raw.value) or "unknown"
        entry = seen.get(kind)
        if entry is None:
            seen[kind] = [1, [raw.where]]
        else:
            entry[0] += 1
            if len(entry[1]) < 3:
                entry[1].append(raw.where)
        if len(fields_seen) < 50:
            fields_seen.append(list(raw.value) if isinstance(raw.value, dict) else [])
    out.seen, out.fields_seen = seen, fields_seen
    known = [k for k in seen if k != "unknown"]
    return known[0] if len(known) == 1 else None


def run_chunk(task: tuple) -> Chunk:
    """Read (when the task names a file range), normalise and clean one chunk of a source's records."""
    t0 = time.perf_counter()
    out = Chunk()
    fmt, src, multi, raws = _task_records(task)
    out.rows_read = len(raws)
    if fmt == "auto":
        fmt = _shapes(raws, out)
        if fmt is None and out.seen:
            # no known shape here (the source's other chunks decide), or several (the source is refused)
            if "unknown" in out.seen and len(out.seen) == 1:
                out.pending = raws
            out.seconds = time.perf_counter() - t0
            return out
        out.fmt = fmt = fmt or "chat"  # a chunk of unparseable rows only: its format does not matter
    near_texts = _rows(_JOB, fmt, src, multi, raws, out)
    _word_arrays(_JOB, near_texts, out)
    out.seconds = time.perf_counter() - t0
    return out


def _task_records(task: tuple) -> tuple[str, str, bool, list]:
    """(format, source name, several sources?, records) of a task: read here when it names a file range."""
    if task[0] != "file":
        _, fmt, src, multi, raws = task
        return fmt, src, multi, raws
    _, fmt, src, multi, path, name, columns, (offset, length, lineno) = task
    raws = sources.jsonl_range(Path(path), name, offset, length, lineno)
    if columns:
        for raw in raws:
            if raw.error is None and isinstance(raw.value, dict):
                raw.value = {columns.get(k, k): v for k, v in raw.value.items()}
    return fmt, src, multi, raws


def _rows(job: Job, fmt: str, src: str, multi: bool, raws: list, out: Chunk) -> list[str]:
    """Normalise, clean, key, label and split each record into `out`; the texts near-duplicate detection compares."""
    cfg = job.cfg
    kind = formats.KIND[fmt]
    names = gate.COLUMNS[kind]
    out.columns = {c: [] for c in names}
    appends = [out.columns[c].append for c in names]
    cleaner = cleaning.Cleaner(cfg.clean)
    redact = bool(cfg.clean.redact_pii)
    near_texts = []
    src_json = _dumps(src)
    same: dict = {}  # one object for each repeated value (system prompts, labels): smaller to hand back and hold
    for raw in raws:
        ex = _example(raw, fmt, src, multi, cfg, out)
        if ex is None:
            continue
        key0 = cleaning.exact_key(ex) if job.key_before_cleaning else None
        changed, found = cleaner.clean(ex)
        ex["class"] = balance.label_of(ex, cfg.balance.label_field)
        ex["pii_left"] = cleaning.pii_left(formats.texts(ex), cfg.clean) if redact and cleaner.suspect else 0
        ex["key"] = cleaning.exact_key(ex)
        feats = gate.features(ex)
        for c, append in zip(names, appends):
            append(feats[c])
        near_texts.append(cleaning.near_text(ex))
        if changed or found or ex["notes"]:
            out.extras.append((len(out.examples), tuple(changed), dict(found) if found else None, ex["notes"]))
        out.examples.append(_light(ex, kind, key0, cfg, src_json, same))
    return near_texts


def _example(raw, fmt: str, src: str, multi: bool, cfg: DataConfig, out: Chunk) -> dict | None:
    """A record as an internal example with its id and origin; None when it is unparseable or below the recipe's
    score margin (noted in `out`)."""
    if raw.error is not None:
        out.unparseable.append(_unparseable(src, raw, [f"{raw.where}: {raw.error}"], unparseable=True, raw=raw.text))
        return None
    try:
        ex = formats.normalise(raw.value, fmt, system_prompt=cfg.system_prompt, tool_turns=cfg.clean.tool_turns)
    except formats.RowError as exc:
        out.unparseable.append(_unparseable(src, raw, [f"{raw.where}: {exc}"], record=raw.value))
        return None
    rid = raw.value.get("id")
    rid = str(rid) if rid not in (None, "") else f"{src}-{raw.row}"
    ex.update(id=f"{src}:{rid}" if multi else rid, source=src, row=raw.row, where=raw.where)
    why = cleaning.below_score_margin(ex, cfg.clean)
    if why is not None:  # the recipe drops the pair: quarantined with the reason, not counted as a bad row
        out.unparseable.append(_unparseable(src, raw, [f"{raw.where}: {why}"], id=ex["id"], record=raw.value,
                                            filtered="min_score_margin"))
        return None
    return ex


def _light(ex: dict, kind: str, key0: str | None, cfg: DataConfig, src_json: str, same: dict) -> dict:
    """The light example a chunk hands back (see Chunk), with its output record serialised."""
    # the output record without its optional fields (prepare inserts fold and contamination at `cut`)
    rec = {"id": ex["id"]}
    for f in KIND_FIELDS[kind]:
        rec[f] = ex[f]
    if ex.get("tools"):
        rec["tools"] = ex["tools"]
    cls, key = ex["class"], ex["key"]
    if cls is not None and kind != "feedback":
        rec["label"] = cls
    head = _dumps(rec)
    first = None if kind == "text" else (ex["messages"] if "messages" in ex else ex["prompt"])
    sys0 = first[0]["content"] if first and first[0]["role"] == "system" else None
    light = {"id": ex["id"], "source": ex["source"], "row": ex["row"], "where": ex["where"], "kind": kind, "key": key,
             "class": same.setdefault(cls, cls), "sys0": same.setdefault(sys0, sys0),
             "_split": balance.split_of(key, cls, cfg.split),
             "json": f'{head[:-1]}, "source": {src_json}, "where": {_dumps(ex["where"])}}}', "cut": len(head) - 1}
    if cfg.balance.kfolds:
        light["_fold"] = balance.fold_of(key, cls, cfg.balance.kfolds, cfg.split.seed)
    if key0 is not None:
        light["key0"] = key0
    return light


def _word_arrays(job: Job, near_texts: list[str], out: Chunk) -> None:
    """The word counts, contamination n-grams and (near-duplicate removal on) MinHash digests of the chunk."""
    clean = job.cfg.clean
    words = cleaning.word_hashes(near_texts)
    out.n_words = words.lengths()
    out.grams = cleaning.ngram_hashes(words, clean.contamination_ngram)
    if clean.near_dedupe:
        out.digests = cleaning.minhash_matrix(cleaning.ngram_hashes(words, 3), job.num_perm)
        out.bands = cleaning.band_keys(out.digests, clean.near_dedupe_threshold)


class Workers:
    """Worker processes (fresh `python -c` interpreters running `serve_chunks`) that handle chunks of rows side by side.

    They are fresh interpreters rather than forks: forking the stage's process would copy the
    threads of Prefect, MLflow and rensa's thread pool, and a child can deadlock on a lock one of
    them held. Chunks and results pass through files in a private temporary folder; a worker reads
    the number of its next chunk on stdin and writes it on stdout when the result is ready. Each
    worker has two chunks in hand, and the next goes to whichever finishes first, so a worker
    slowed by other work on the machine holds up no one.
    """

    AHEAD = 2  # chunks a worker holds at a time

    def __init__(self, n: int):
        self.n = n
        self.procs: list = []
        self.finished = False
        self.tmp = None
        self.spent = None    # result files read, for a thread to delete (deleting a large file takes a while)
        self.remover = None
        self.sel = None      # the workers' stdout, to wait on
        self.held: dict[int, int] = {}   # worker -> chunks it holds
        self.partial: list[bytes] = []   # partial lines read from each worker
        self.done: set[int] = set()      # chunks whose results are written
        self.next = 0                    # the next chunk to hand out
        self.n_tasks = 0

    def map(self, job: Job, tasks: list) -> Iterator[Chunk]:
        """Each task's result, in order."""
        folder = self._write_inputs(job, tasks)
        self._start(folder, len(tasks))
        for _ in range(self.AHEAD):
            for k in range(len(self.procs)):
                self._give(k)
        for i in range(len(tasks)):
            self._wait_for(i, folder)
            result = Path(folder, f"result-{i}.pkl")
            value = _result(result)
            self.spent.put(result)
            yield value
        self.sel.close()
        self.finished = True

    def _write_inputs(self, job: Job, tasks: list) -> str:
        """A private folder holding the job and every task, and the thread that deletes results once read."""
        import queue
        import tempfile
        import threading

        self.tmp = tempfile.TemporaryDirectory(prefix="tunewright-rows-")
        folder = self.tmp.name
        self.spent = queue.SimpleQueue()
        self.remover = threading.Thread(target=_remove, args=(self.spent,), daemon=True)
        self.remover.start()
        _dump(job, Path(folder, "job.pkl"))
        for i, t in enumerate(tasks):
            _dump(t, Path(folder, f"task-{i}.pkl"))
        return folder

    def _start(self, folder: str, n_tasks: int) -> None:
        """Start a worker per chunk, up to `n`, each reading its chunk numbers on stdin."""
        import selectors
        import subprocess

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.sel = selectors.DefaultSelector()
        self.partial = [b""] * self.n
        self.n_tasks = n_tasks
        for k in range(min(self.n, n_tasks)):
            self.procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, folder], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, env=env, bufsize=0))
            self.held[k] = 0
            self.sel.register(self.procs[k].stdout, selectors.EVENT_READ, k)

    def _give(self, k: int) -> None:
        """Hand worker k the next chunk, if any is left."""
        if self.next < self.n_tasks:
            try:
                self.procs[k].stdin.write(f"{self.next}\n".encode())
                self.procs[k].stdin.flush()
            except BrokenPipeError:  # it stopped: seen as the end of its output
                return
            self.next += 1
            self.held[k] += 1
            if self.next == self.n_tasks:  # nothing more to hand out: workers exit when their chunks are done
                for p in self.procs:
                    p.stdin.close()

    def _wait_for(self, i: int, folder: str) -> None:
        """Read the workers' announcements until chunk i is done; a worker that finishes one gets the next."""
        while i not in self.done:
            for sk, _ in self.sel.select():
                k = sk.data
                data = os.read(sk.fd, 4096)
                if not data:
                    self.sel.unregister(sk.fileobj)
                    if self.held[k]:
                        self._stopped(k, i, folder)
                    continue
                *lines, self.partial[k] = (self.partial[k] + data).split(b"\n")
                for line in lines:
                    self.done.add(int(line))
                    self.held[k] -= 1
                    self._give(k)

    def _stopped(self, k: int, i: int, folder: str) -> None:
        """Worker k ended holding chunks: the error of a chunk that failed, or else that it stopped."""
        for j in sorted(self.done):  # a chunk that failed stops its worker: say why
            if j >= i:
                _result(Path(folder, f"result-{j}.pkl"))
        raise RuntimeError(f"a stage 1 worker process stopped before finishing its chunks "
                           f"(exit code {self.procs[k].wait()}; its error is above)")

    def close(self) -> None:
        """Wait for the workers to exit, or kill them when the work stopped half way; remove the files."""
        if self.remover is not None:
            self.spent.put(None)
            self.remover.join()
            self.remover = None
        for p in self.procs:
            if not self.finished:
                p.kill()
            try:
                p.wait(timeout=30)
            except Exception:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout):
                if f:
                    try:
                        f.close()
                    except OSError:
                        pass
        if self.tmp is not None:
            self.tmp.cleanup()


def _dump(value, path: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _result(path: Path) -> Chunk:
    """A chunk's result as its worker wrote it; a chunk that failed raises its worker's traceback."""
    # one read, then unpickling from memory: reading from the file in pieces hands the interpreter
    # lock to the thread importing the gate's library at every piece
    kind, value = pickle.loads(path.read_bytes())
    if kind == "error":
        raise RuntimeError(f"a stage 1 worker failed:\n{value}")
    return value


def _remove(spent) -> None:
    while (path := spent.get()) is not None:
        path.unlink(missing_ok=True)


def serve_chunks(folder: str) -> None:
    """A worker: the job from `folder`, then the number of each chunk to do on stdin; each result to `folder`,
    announced on stdout."""
    import traceback

    import ftfy  # noqa: F401  (imported once up front rather than inside the first chunk)

    global _JOB
    import gc

    gc.disable()  # each chunk's objects are freed by reference counting; nothing here makes cycles
    with open(os.path.join(folder, "job.pkl"), "rb") as fh:
        _JOB = pickle.load(fh)
    for line in sys.stdin:
        i = int(line)
        try:
            with open(os.path.join(folder, f"task-{i}.pkl"), "rb") as fh:
                task = pickle.load(fh)
            reply = ("ok", run_chunk(task))
        except BaseException:
            reply = ("error", traceback.format_exc())
        save_atomic(Path(folder, f"result-{i}.pkl"), lambda tmp: _dump(reply, tmp))
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
        if reply[0] == "error":
            return


def workers_for(rows: int, n: int | None = None) -> Workers | None:
    """Worker processes when there are enough rows to repay their start, else None."""
    n = n or min(os.cpu_count() or 1, 8)
    return Workers(n) if rows >= PARALLEL_MIN and n >= 2 else None


def run(job: Job, tasks: list[tuple], workers: Workers | None = None, *,
        while_waiting: Callable[[], None] | None = None, log=None) -> Iterator[Chunk]:
    """Every chunk's result, in order: in `workers` when given, else in this process.

    `while_waiting` runs in a thread of this process while workers clean (stage 1 imports
    great-expectations there, which would otherwise cost seconds after the rows are done).
    """
    global _JOB
    if workers is None or len(tasks) < 2:
        _JOB = job
        yield from map(run_chunk, tasks)
        return
    thread = None
    if while_waiting is not None:
        import threading

        thread = threading.Thread(target=while_waiting, daemon=True)
        thread.start()
    done = 0
    try:
        for chunk in workers.map(job, tasks):
            before, done = done, done + chunk.rows_read
            if log is not None and done // 100_000 != before // 100_000:
                log.info("data: %d rows read, normalised and cleaned", done)
            yield chunk
    finally:
        workers.close()
    if thread is not None:
        thread.join()


def run_here(job: Job, task: tuple) -> Chunk:
    """One task's result, in this process."""
    global _JOB
    _JOB = job
    return run_chunk(task)


def chunks(fmt: str, src: str, multi: bool, raws: list) -> Iterable[tuple]:
    """Tasks for a source read by this process: its records, CHUNK at a time."""
    for i in range(0, len(raws), CHUNK):
        yield "raws", fmt, src, multi, raws[i:i + CHUNK]


def file_chunks(fmt: str, src: str, multi: bool, path: Path, name: str, columns: dict | None,
                ranges: list[tuple[int, int, int]]) -> Iterable[tuple]:
    """Tasks for a JSON-lines file the workers read themselves (its records described with `name`): one per range
    of `sources.scan_jsonl`."""
    for r in ranges:
        yield "file", fmt, src, multi, str(path), name, columns or None, r
