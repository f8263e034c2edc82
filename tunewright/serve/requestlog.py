"""The request log stage 7 reads: one JSON line per request, written off the request path.

Targets: a `.jsonl` file (appended), a folder (one file per time window, `requests-YYYYMMDDTHHMMSSZ.jsonl`,
named by the window's start in UTC), or `s3://bucket/prefix` (one object per flush under
`prefix/requests-<window start>-<sequence>.jsonl`). A request only puts its record on a queue; a
writer thread writes them. A slow or failing target never fails or slows a request: records wait in
memory (up to `max_pending`, beyond that the oldest are dropped and counted) and are retried; a clean
shutdown writes everything still queued.

Personal data and secrets are redacted by default: the writer thread replaces e-mail addresses, card numbers, IBANs,
IP addresses, SSNs and phone numbers, and credentials (cloud keys, tokens, private keys, passwords), in a record's
texts with typed placeholders (`[EMAIL]`, `[AWS_ACCESS_KEY]`: stage 1's detectors) and notes what it replaced in the
record's `redacted` field, so drift monitoring keeps the text around them. Files are created readable by their owner
only (0600, a folder the log makes 0700).
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tunewright.scoring import pii, secrets

log = logging.getLogger("tunewright.serve")


# the fields that hold what the client sent or was answered; a refused request's `model` is whatever it said
TEXT_FIELDS = ("messages", "prompt", "answer", "error", "model")
# where a long text is cut for redaction: after whitespace that is followed by whitespace or a lower-case letter
# (no detector's match holds such a pair or starts or ends on whitespace, so none spans a cut)
CUT = re.compile(r"(?<=\s)(?=[a-z\s])")
PIECE = 1 << 12
SECRETS_WHOLE = 1 << 16
SECRETS_CUT = re.compile(r"(?<=\n)")  # a long text's secrets are screened between line ends


def window_start(ts: float, seconds: int) -> str:
    return datetime.fromtimestamp(ts - ts % seconds, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class RequestLog:
    """Queue records from request handlers; a background thread writes them to the target."""

    def __init__(self, target: str | Path, *, rotate_seconds: int = 3600, flush_seconds: float = 1.0,
                 max_pending: int = 100_000, redact: bool = True):
        self.target = str(target)
        self.redact = redact  # False: texts are written as sent, personal data included
        self.rotate_seconds = rotate_seconds
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.last_error: str | None = None
        self.redactions: Counter = Counter()  # placeholders written per kind (PII and secrets)
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[dict] = []
        self._sequence = 0
        self._stop = threading.Event()
        self._s3 = None
        if self.target.startswith("s3://"):
            bucket, _, prefix = self.target[5:].partition("/")
            self._bucket, self._prefix = bucket, prefix.strip("/")
        elif not self.target.endswith(".jsonl"):
            Path(self.target).mkdir(mode=0o700, parents=True, exist_ok=True)
        if not redact:
            log.warning("request log %s keeps prompts and answers as sent, personal data included", self.target)
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        """Queue one record (never blocks, never raises)."""
        self._queue.put(record)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer."""
        self._stop.set()
        self._thread.join(timeout)

    # -- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.flush_seconds
        while True:
            stopping = self._stop.is_set()
            deadline = time.monotonic() + (0 if stopping else backoff)
            while True:  # gather what arrived during the wait
                try:
                    self._pending.append(self._scrub(self._queue.get(timeout=max(0.0, deadline - time.monotonic()))))
                except queue.Empty:
                    break
                if stopping or len(self._pending) >= 1000:
                    while True:
                        try:
                            self._pending.append(self._scrub(self._queue.get_nowait()))
                        except queue.Empty:
                            break
                    break
            if self._pending:
                ok = self._flush()
                backoff = self.flush_seconds if ok else min(backoff * 2, 30.0)
                if not ok and stopping:  # a last few tries on shutdown, then give up loudly
                    for _ in range(3):
                        time.sleep(0.5)
                        if self._flush():
                            break
                    if self._pending:
                        log.error("request log %s: %d records could not be written at shutdown: %s",
                                  self.target, len(self._pending), self.last_error)
                    return
            if stopping and self._queue.empty():
                return

    def _scrub(self, rec: dict) -> dict:
        """The record with PII and secrets in its texts replaced by placeholders, counted in `redacted` (a new record:
        the request's own objects are left as they were)."""
        if not self.redact:
            return rec
        found: Counter = Counter()
        rec = {k: _redacted(v, found) if k in TEXT_FIELDS else v for k, v in rec.items()}
        if found:
            rec["redacted"] = dict(found)
            self.redactions.update(found)
        return rec

    def _flush(self) -> bool:
        try:
            if self.target.startswith("s3://"):
                self._write_s3()
            else:
                self._write_files()
        except Exception as exc:  # the log never fails a request: keep the records and try again later
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.failures == 1 or self.failures % 20 == 0:
                log.warning("request log %s: writing failed (%d times so far), %d records kept to retry: %s",
                            self.target, self.failures, len(self._pending), self.last_error)
            if len(self._pending) > self.max_pending:
                extra = len(self._pending) - self.max_pending
                del self._pending[:extra]
                self.dropped += extra
            return False
        return True

    def _write_files(self) -> None:
        groups: dict[Path, list[str]] = {}
        for rec in self._pending:
            groups.setdefault(self._file_of(rec), []).append(_line(rec))
        for path, lines in groups.items():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8") as fh:
                if _cut_short(path):  # a server killed mid-write left half a line: ours start on a line of their own
                    fh.write("\n")
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
            self._done(len(lines), lambda rec, path=path: self._file_of(rec) != path)

    def _file_of(self, rec: dict) -> Path:
        if self.target.endswith(".jsonl"):
            return Path(self.target)
        return Path(self.target) / f"requests-{window_start(rec['_ts'], self.rotate_seconds)}.jsonl"

    def _done(self, n: int, keep) -> None:
        """Forget records once written (a group at a time, so a retry never writes one twice)."""
        self._pending = [rec for rec in self._pending if keep(rec)]
        self.written += n

    def _write_s3(self) -> None:
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3")
        groups: dict[str, list[str]] = {}
        for rec in self._pending:
            groups.setdefault(window_start(rec["_ts"], self.rotate_seconds), []).append(_line(rec))
        for window, lines in groups.items():
            self._sequence += 1
            key = f"{self._prefix}/requests-{window}-{self._sequence:06d}-{uuid.uuid4().hex[:8]}.jsonl".lstrip("/")
            self._s3.upload_fileobj(io.BytesIO("".join(lines).encode("utf-8")), self._bucket, key)
            self._done(len(lines), lambda rec, window=window: window_start(rec["_ts"], self.rotate_seconds) != window)


def _cut_short(path: Path) -> bool:
    """Whether the file's last line has no newline (a write cut short by a kill)."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _redacted(value, found: Counter):
    """`value` with PII and secrets redacted in every text it holds (message contents, their text parts, nested
    lists)."""
    if isinstance(value, str):
        return redact_text(value, found)
    if isinstance(value, list):
        return [_redacted(v, found) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v, found) for k, v in value.items()}
    return value


def redact_text(text: str, found: Counter) -> str:
    """`pii.redact` of a text, a piece of about `PIECE` characters at a time: the regular expressions hold the GIL
    while they scan, and one long prompt must not stall the server's requests for the whole of its scan. Between
    pieces the writer lets go of the GIL for a moment, so that the event loop, which needs it back after each of its
    socket calls, is not kept waiting a piece at a time (20 one-megabyte prompts: /health's slowest answer from
    0.25 s to under 0.1 s on a 2-core EPYC). Secrets (`secrets.redact`) go first, over the whole text up to
    `SECRETS_WHOLE` characters (a private key block may span a cut); a longer text, which its detectors could hold
    the GIL for a second or more, is screened a line-bounded piece at a time like the PII."""
    if len(text) <= SECRETS_WHOLE:
        text = secrets.redact(text, found)
    else:
        text = _in_pieces(text, lambda piece: secrets.redact(piece, found), SECRETS_CUT)
    if len(text) <= PIECE:
        return pii.redact(text, found=found)
    out, start = [], 0
    while start < len(text):
        cut = CUT.search(text, start + PIECE)
        end = cut.end() if cut else len(text)
        out.append(pii.redact(text[start:end], found=found))
        start = end
        time.sleep(0.0002)
    return "".join(out)


def _line(rec: dict) -> str:
    """One record as a JSON line that always encodes: a request's text may hold a lone surrogate (valid as a JSON
    escape, with no UTF-8 form), and one unwritable record must not hold back every record queued behind it."""
    fields = {k: v for k, v in rec.items() if k != "_ts"}
    text = json.dumps(fields, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(fields, ensure_ascii=True, default=str)  # escaped: it reads back as the same text
    return text + "\n"


def record(**fields) -> dict:
    """A request-log record stamped with the current time."""
    now = time.time()
    return {"_ts": now, "time": datetime.fromtimestamp(now, tz=timezone.utc).isoformat(), **fields}


def _in_pieces(text: str, redact, cut: re.Pattern) -> str:
    """`redact` over `text` a piece of about `PIECE` characters at a time, letting go of the GIL between pieces: cut
    where `cut` matches within four pieces' length, else after whitespace, else there (a run that long with neither
    is no key block; a token it splits may be missed, which the log's size cap on prompts makes rare)."""
    out, start = [], 0
    while start < len(text):
        limit = start + 4 * PIECE
        found = cut.search(text, start + PIECE, limit) or re.compile(r"(?<=\s)").search(text, start + PIECE, limit)
        end = found.end() if found else min(limit, len(text))
        out.append(redact(text[start:end]))
        start = end
        time.sleep(0.0002)
    return "".join(out)
