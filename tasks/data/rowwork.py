"""The per-row work of stage 1, in chunks: normalise, clean, key, label, count tokens, hash words.

Everything here depends on one row at a time, so a large source is cut into chunks that worker
processes handle side by side; a small one runs in the stage's own process. Chunks come back in order, so the result is the same
either way. What needs all rows at once (duplicates, the gate, splits, contamination) stays in
`prepare`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from tasks.data import balance, cleaning, formats, gate
from tunewright.recipe import DataConfig

CHUNK = 2048
PARALLEL_MIN = 20_000  # fewer rows than this are not worth starting workers for


@dataclass
class Job:
    cfg: DataConfig
    key_before_cleaning: bool = False              # mixing by weight or row cap ranks rows by their raw content
    num_perm: int = 128


@dataclass
class Chunk:
    examples: list[dict] = field(default_factory=list)
    unparseable: list[dict] = field(default_factory=list)
    words: cleaning.Ragged | None = None   # word hashes of each example's non-system turns
    digests: np.ndarray | None = None       # MinHash of each example's word 3-grams (near-duplicate removal on)
    seconds: float = 0.0                     # time the chunk took where it ran


# a worker's entry: through the module's import, so the chunks it returns unpickle as tasks.data.rowwork.Chunk
_WORKER = "import sys; from tasks.data.rowwork import _serve; _serve(*sys.argv[1:3])"

_JOB: Job | None = None  # this process's job: set by `run`, or read first from stdin by a worker


def _unparseable(src: str, rec, reasons: list[str], **extra) -> dict:
    return {"source": src, "row": rec.row, "where": rec.where, "reasons": reasons, **extra}


def run_chunk(task: tuple[str, str, bool, list]) -> Chunk:
    """Normalise and clean one chunk of a source's raw records."""
    import time

    t0 = time.perf_counter()
    fmt, src, multi, raws = task
    job = _JOB
    cfg = job.cfg
    cleaner = cleaning.Cleaner(cfg.clean)
    out = Chunk()
    for raw in raws:
        if raw.error is not None:
            out.unparseable.append(_unparseable(src, raw, [f"{raw.where}: {raw.error}"], unparseable=True,
                                                raw=raw.text))
            continue
        try:
            ex = formats.normalise(raw.value, fmt, system_prompt=cfg.system_prompt, tool_turns=cfg.clean.tool_turns)
        except formats.RowError as exc:
            out.unparseable.append(_unparseable(src, raw, [f"{raw.where}: {exc}"], record=raw.value))
            continue
        rid = raw.value.get("id")
        rid = str(rid) if rid not in (None, "") else f"{src}-{raw.row}"
        ex.update(id=f"{src}:{rid}" if multi else rid, source=src, row=raw.row, where=raw.where)
        if job.key_before_cleaning:
            ex["key0"] = cleaning.exact_key(ex)
        changed, found = cleaner.clean(ex)
        ex["steps"], ex["found"] = tuple(changed), (dict(found) if found else None)  # plain types pickle fast
        ex["class"] = balance.label_of(ex, cfg.balance.label_field)
        ex["pii_left"] = cleaning.pii_left(formats.texts(ex), cfg.clean) if cfg.clean.redact_pii else 0
        ex["key"] = cleaning.exact_key(ex)
        out.examples.append(ex)
    for ex in out.examples:
        ex["features"] = gate.features(ex)
    out.words = cleaning.word_hashes([cleaning.near_text(ex) for ex in out.examples])
    if cfg.clean.near_dedupe:
        out.digests = cleaning.minhash_matrix(cleaning.ngram_hashes(out.words, 3), job.num_perm)
    out.seconds = time.perf_counter() - t0
    return out


class Workers:
    """Worker processes (fresh `python -c` interpreters running `_serve`) that clean chunks of rows side by side.

    They are fresh interpreters rather than forks: forking the stage's process would copy the
    threads of Prefect, MLflow and rensa's thread pool, and a child can deadlock on a lock one of
    them held. Chunks and results pass through files in a private temporary folder, so a worker
    never waits on this process (which may be busy importing the gate's library meanwhile); a
    line on the worker's stdout says a result is ready.
    """

    def __init__(self, n: int):
        self.n = n
        self.procs: list = []
        self.finished = False
        self.tmp = None

    def map(self, job: Job, tasks: list) -> Iterator[Chunk]:
        """Each task's result, in order (task i goes to worker i mod n)."""
        import pickle
        import subprocess
        import sys
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="tunewright-rows-")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for k in range(self.n):
            inbox = Path(self.tmp.name, f"tasks-{k}.pkl")
            with inbox.open("wb") as fh:
                pickle.dump(job, fh, protocol=pickle.HIGHEST_PROTOCOL)
                for i in range(k, len(tasks), self.n):
                    pickle.dump((i, tasks[i]), fh, protocol=pickle.HIGHEST_PROTOCOL)
            self.procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(inbox), self.tmp.name],
                                               stdout=subprocess.PIPE, env=env, text=True))
        for i in range(len(tasks)):
            proc = self.procs[i % self.n]
            line = proc.stdout.readline().strip()
            result = Path(self.tmp.name, f"result-{i}.pkl")
            if line != str(i) or not result.is_file():
                raise RuntimeError(f"a stage 1 worker process stopped before finishing chunk {i} "
                                   f"(exit code {proc.wait()}; its error is above)")
            with result.open("rb") as fh:
                kind, value = pickle.load(fh)
            result.unlink()
            if kind == "error":
                raise RuntimeError(f"a stage 1 worker failed:\n{value}")
            yield value
        self.finished = True

    def close(self) -> None:
        """Wait for the workers to exit, or kill them when the work stopped half way; remove the files."""
        for p in self.procs:
            if not self.finished:
                p.kill()
            try:
                p.wait(timeout=30)
            except Exception:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def _serve(inbox: str, outdir: str) -> None:
    """A worker: the job, then (index, chunk) pairs from `inbox`; each result to `outdir`, announced on stdout."""
    import pickle
    import traceback

    import ftfy  # noqa: F401  (imported once up front rather than inside the first chunk)

    global _JOB
    import gc

    gc.disable()  # each chunk's objects are freed by reference counting; nothing here makes cycles
    with open(inbox, "rb") as fh:
        _JOB = pickle.load(fh)
        while True:
            try:
                i, task = pickle.load(fh)
            except EOFError:
                return
            try:
                reply = ("ok", run_chunk(task))
            except BaseException:
                reply = ("error", traceback.format_exc())
            tmp = Path(outdir, f"result-{i}.pkl.tmp")
            with tmp.open("wb") as out:
                pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, Path(outdir, f"result-{i}.pkl"))
            print(i, flush=True)
            if reply[0] == "error":
                return


def workers_for(rows: int, n: int | None = None) -> Workers | None:
    """Worker processes when there are enough rows to repay their start (about half a second), else None."""
    n = n or min(os.cpu_count() or 1, 8)
    return Workers(n) if rows >= PARALLEL_MIN and n >= 2 else None


def run(job: Job, tasks: list[tuple[str, str, bool, list]], workers: Workers | None = None, *,
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
    total = sum(len(t[3]) for t in tasks)
    done = 0
    try:
        for chunk in workers.map(job, tasks):
            before, done = done, done + len(chunk.examples) + len(chunk.unparseable)
            if log is not None and done // 100_000 != before // 100_000:
                log.info("data: %d of %d rows normalised and cleaned", done, total)
            yield chunk
    finally:
        workers.close()
    if thread is not None:
        thread.join()


def chunks(fmt: str, src: str, multi: bool, raws: list) -> Iterable[tuple[str, str, bool, list]]:
    for i in range(0, len(raws), CHUNK):
        yield fmt, src, multi, raws[i:i + CHUNK]

