"""Cleaning: repair and normalise text, redact secrets and PII, find duplicates and train/test overlap.

Every step is counted (rows it changed, and redactions by kind) so the report can say what
cleaning did. Detection is by regular expressions with checksums where the kind has one (Luhn
for card numbers, mod-97 for IBANs), so a run needs no model and no network.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import itertools
import unicodedata
from collections import Counter
from typing import Callable

import numpy as np

from tunewright.chat import turn_text
from tunewright.recipe import CleanConfig
from tunewright.scoring import secrets
from tunewright.scoring.pii import ORDER, find_pii, has_digit_run, redact

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LINE_SEP = re.compile("[\u2028\u2029\r]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]{2,}|[\t\u00a0\u3000]")  # runs of spaces, and tabs or odd spaces
_CONTROL_OR_SEP = re.compile(_CONTROL.pattern[:-1] + "\u2028\u2029\r]")
# whether whitespace normalisation has anything to do (most texts: no)
_WS_WORK = re.compile(r"[\t\u00a0\u3000]| {2}| \n|\n{3}")
_TRAILING = re.compile(r" +\n")
_NEWLINES = re.compile(r"\n{3,}")
_TAG = re.compile(r"<(?:script|style)\b[^>]*>.*?</(?:script|style)>|<!--.*?-->|</?[A-Za-z][^<>]*>", re.S | re.I)
_BLOCK_TAG = re.compile(r"<(?:br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>", re.I)

_WORD = re.compile(r"\w+")
# ASCII text: word characters (what \w matches there) lower-cased, every other byte a space
_ASCII_WORDS = bytes(c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 or c == 95 else 32
                     for c in range(256))
# ASCII text as `fold` compares it: lower-cased, and every character str.split() splits on made a space
_ASCII_FOLD = bytes(32 if 9 <= c <= 13 or 28 <= c <= 31 else c + 32 if 65 <= c <= 90 else c for c in range(256))


class _Steps(list):
    """The steps that changed a text, in the order they did (`_text` adds to it as it does to a set)."""

    add = list.append


class Cleaner:
    """The recipe's text cleaning, applied turn by turn, with counts of what each step changed."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.kinds = [k for k in ORDER if k in cfg.redact_pii]
        self.extra = {name.upper(): re.compile(p) for name, p in cfg.pii_patterns.items()}
        self.secret_patterns = {name: re.compile(p) for name, p in cfg.secret_patterns.items()}
        self.secrets = cfg.redact_secrets or bool(self.secret_patterns)
        self.replace = None
        if cfg.replacements:
            flags = re.I if cfg.replacements_ignore_case else 0
            terms = sorted(cfg.replacements, key=len, reverse=True)
            self.replace = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, terms)) + r")(?!\w)", flags)
            self.lookup = {(k.lower() if cfg.replacements_ignore_case else k): v for k, v in cfg.replacements.items()}
        self.steps: Counter = Counter()       # rows changed per step
        self.redactions: Counter = Counter()  # placeholders inserted per kind
        # whether the last cleaned example may still hold PII the detectors find: False when every text had
        # no '@' and no digit run and redaction left it as it was (then `pii_left` would find nothing)
        self.suspect = True
        self._last_system: tuple | None = None  # (text, cleaned, steps, redactions, suspect) of the last system turn

    def _redact(self, text: str, found: Counter) -> str:
        if "@" in text or has_digit_run(text):
            self.suspect = True
            text = redact(text, self.kinds, found)
        for name, pattern in self.extra.items():
            text, n = pattern.subn(f"[{name}]", text)
            if n:
                found[name.lower()] += n
        return text

    def text(self, text: str, changed: set) -> tuple[str, Counter]:
        """One cleaned text; `changed` collects the steps that altered it."""
        found: Counter = Counter()
        return self._text(text, changed, found), found

    def _text(self, text: str, changed: set, found: Counter) -> str:
        """`text`, with the redactions it made counted in `found`."""
        cfg = self.cfg
        if cfg.fix_unicode and not text.isascii():
            import ftfy

            fixed = ftfy.fix_text(text, normalization="NFC", remove_control_chars=False)  # counted by its own step
            if fixed != text:
                changed.add("unicode")
                text = fixed
        # every character these steps remove is unprintable: most texts skip them on one fast check
        printable = text.isprintable()
        if cfg.strip_control and not printable and _CONTROL_OR_SEP.search(text):
            fixed = _CONTROL.sub("", _LINE_SEP.sub("\n", text.replace("\r\n", "\n")))
            if fixed != text:
                changed.add("control_chars")
                text = fixed
        if cfg.strip_html and ("<" in text or "&" in text):
            fixed = html.unescape(_TAG.sub("", _BLOCK_TAG.sub("\n", text)))
            if fixed != text:
                changed.add("html")
                text = fixed
        if cfg.normalize_whitespace and ("  " in text or text[:1].isspace() or text[-1:].isspace() or (
                not printable and _WS_WORK.search(text))):
            fixed = _NEWLINES.sub("\n\n", _TRAILING.sub("\n", _SPACES.sub(" ", text))).strip()
            if fixed != text:
                changed.add("whitespace")
                text = fixed
        if self.replace is not None:
            key = (lambda m: m.group(0).lower()) if cfg.replacements_ignore_case else (lambda m: m.group(0))
            fixed = self.replace.sub(lambda m: self.lookup[key(m)], text)
            if fixed != text:
                changed.add("replacements")
                text = fixed
        return self._redactions(text, changed, found)

    def _redactions(self, text: str, changed: set, found: Counter) -> str:
        """`text` with secrets, then PII, replaced by typed placeholders (counted in `found`)."""
        if self.secrets:  # before PII: `user:pass@host` is a password, not an e-mail address
            fixed = secrets.redact(text, found, self.secret_patterns, self.cfg.redact_secrets)
            if fixed != text:
                changed.add("secrets")
                text = fixed
        if self.kinds or self.extra:
            fixed = self._redact(text, found)
            if fixed != text:
                changed.add("pii")
                text = fixed
                self.suspect = True
        return text

    def clean(self, ex: dict) -> tuple[set, Counter]:
        """Clean every text of an example in place; (the steps that changed it, its redactions by kind)."""
        changed: set = set()
        found: Counter = Counter()
        self.suspect = not (self.kinds or self.extra)
        if ex["kind"] == "text":
            ex["text"] = self._text(ex["text"], changed, found)
        else:
            for key in ("messages", "prompt", "chosen", "rejected", "completion"):
                for m in ex.get(key) or ():
                    if m["role"] == "system":
                        m["content"] = self._system_text(m["content"], changed, found)
                    else:
                        m["content"] = self._text(m["content"], changed, found)
                    for call in m.get("tool_calls") or ():
                        fn = call["function"]
                        fn["arguments"] = self._arguments(fn["arguments"], changed, found)
        return changed, found

    def _arguments(self, value, changed: set, found: Counter):
        """A tool call's arguments with PII and secrets redacted in every string they hold (keys and other
        values as they are: the call must still match its tool's schema)."""
        if isinstance(value, dict):
            return {k: self._arguments(v, changed, found) for k, v in value.items()}
        if isinstance(value, list):
            return [self._arguments(v, changed, found) for v in value]
        return self._redactions(value, changed, found) if isinstance(value, str) else value

    def _system_text(self, text: str, changed: set, found: Counter) -> str:
        """`_text` of a system turn: most rows share one, so the last is remembered with what cleaning it did."""
        last = self._last_system
        if last is None or last[0] != text:
            steps, got, before = _Steps(), Counter(), self.suspect
            self.suspect = False
            out = self._text(text, steps, got)
            last = self._last_system = (text, out, tuple(steps), got, self.suspect)
            self.suspect = before
        _, out, steps, got, suspect = last
        for step in steps:
            changed.add(step)
        if got:
            found.update(got)
        if suspect:
            self.suspect = True
        return out

    def example(self, ex: dict) -> Counter:
        """`clean`, counted in this cleaner's totals; returns the example's redactions by kind."""
        changed, found = self.clean(ex)
        for step in changed:
            self.steps[step] += 1
        self.redactions += found
        return found


def pii_left(texts: list[str], cfg: CleanConfig) -> int:
    """PII the detectors still find (after redaction this should be 0)."""
    kinds = [k for k in ORDER if k in cfg.redact_pii]
    return sum(len(find_pii(text, kinds)) for text in texts)


def fold(text: str) -> str:
    """Content as compared for exact duplicates: case, accents and whitespace folded."""
    if text.isascii():  # NFKC leaves ASCII as it is, and casefold lower-cases it
        return " ".join(text.lower().split())
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(ex: dict) -> str:
    if ex["kind"] == "text":
        parts = [ex["text"]]
    else:
        parts = [f"{k}:{m['role']}:{m['content']}" for k in ("messages", "prompt", "chosen", "rejected", "completion")
                 for m in ex.get(k) or ()]
        parts += [json.dumps(m["tool_calls"], sort_keys=True) for m in ex.get("messages") or () if "tool_calls" in m]
        if ex["kind"] == "feedback":
            parts.append(f"label:{ex['label']}")
    text = "\x1f".join(parts)
    if text.isascii():  # fold(text).encode(), without building the words as str
        raw = text.encode("ascii").translate(_ASCII_FOLD)
        if b"  " in raw or raw[:1] == b" " or raw[-1:] == b" ":
            raw = b" ".join(raw.split())
        return hashlib.blake2b(raw, digest_size=16).hexdigest()
    return hashlib.blake2b(fold(text).encode(), digest_size=16).hexdigest()


def near_text(ex: dict) -> str:
    """What near-duplicate detection compares: every non-system turn (a shared system prompt is not similarity),
    a turn that calls tools as its calls."""
    if ex["kind"] == "text":
        return ex["text"]
    return "\n".join(turn_text(m) if "tool_calls" in m else m["content"]
                     for k in ("messages", "prompt", "chosen", "rejected", "completion")
                     for m in ex.get(k) or () if m["role"] != "system")


# Word hashes and n-grams of words, as numpy arrays: near-duplicate and contamination checks of a
# million rows touch tens of millions of n-grams, which Python strings and sets cannot do at speed.
_MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                  0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9,
                  0x2545F4914F6CDD1D, 0x9FB21C651E98DF25, 0x5851F42D4C957F2D, 0x14057B7EF767814F,
                  0xDA942042E4DD58B5, 0x27BB2EE687B0B0FD, 0x9E6C63D0676A9A99, 0xE7037ED1A0B428DB],
                 dtype=np.uint64) | np.uint64(1)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of combined hashes."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


class Ragged:
    """Rows of unsigned 64-bit values of different lengths: one flat array and row offsets."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, rows: list[list[int]]) -> "Ragged":
        lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.uint64, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: list["Ragged"]) -> "Ragged":
        """The rows of all parts, in order; the list is emptied as they are copied (the peak holds one copy)."""
        if not parts:
            return cls(np.zeros(0, np.uint64), np.zeros(1, np.int64))
        flat = np.empty(sum(len(p.flat) for p in parts), dtype=np.uint64)
        offsets = np.zeros(sum(len(p) for p in parts) + 1, dtype=np.int64)
        at, row = 0, 0
        parts.reverse()
        while parts:
            p = parts.pop()
            flat[at:at + len(p.flat)] = p.flat
            offsets[row + 1:row + len(p) + 1] = p.offsets[1:] + at
            at += len(p.flat)
            row += len(p)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def take(self, idx: np.ndarray) -> "Ragged":
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.lengths()[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if len(idx) and np.all(idx[1:] > idx[:-1]):  # rows in order, each once: a mask over the values will do
            rows = np.zeros(len(self), dtype=bool)
            rows[idx] = True
            return Ragged(self.flat[np.repeat(rows, self.lengths())], offsets)
        # position of every value of the chosen rows in the flat array
        pos = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lens) + np.repeat(self.offsets[idx], lens)
        return Ragged(self.flat[pos], offsets)


_WORD_HASH: dict = {}  # word -> its rensa hash, kept by the process across chunks (words repeat a lot)
_WORD_HASH_MAX = 1_000_000


def words_of(text: str) -> list:
    """The words of a text, casefolded (`\\w+`); ASCII text is split without the regular expression.

    ASCII words come back as bytes, others as str; `word_hashes` hashes both as the same text.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORDS).split()
    return _WORD.findall(text.casefold())


def word_hashes(texts: list[str]) -> Ragged:
    """The words of each text (casefolded), hashed to 64 bits by rensa (stable across processes and runs)."""
    from rensa import RMinHash

    words: list = []
    lens = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        w = words_of(t)
        words += w
        lens[i] = len(w)
    cache = _WORD_HASH
    new = set(words).difference(cache)
    if new:
        if len(cache) + len(new) > _WORD_HASH_MAX:
            cache.clear()
            new = set(words)
        new = list(new)
        hashes = RMinHash.hash_token_sets([[w.decode("ascii") if isinstance(w, bytes) else w for w in new]])[0]
        cache.update(zip(new, hashes))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    return Ragged(flat, offsets)


def ngram_hashes(words: Ragged, n: int) -> Ragged:
    """Hashes of each row's word n-grams, in order; a row shorter than n words is one gram of all its words."""
    flat, offsets = words.flat, words.offsets
    lens = words.lengths()
    total = len(flat)
    counts = np.where(lens >= n, lens - n + 1, np.minimum(lens, 1))
    new_off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_off[1:])
    if total == 0:
        return Ragged(np.zeros(0, np.uint64), new_off)
    # every position's n-gram over the flat array (some run across rows); keep those that do not
    padded = np.concatenate([flat, np.zeros(n, dtype=np.uint64)])
    h = np.full(total, np.uint64(n), dtype=np.uint64)
    for k in range(n):
        h += padded[k:k + total] * _MULT[k % len(_MULT)]
    row_of = np.repeat(np.arange(len(lens)), lens)
    pos = np.arange(total, dtype=np.int64)
    keep = pos + n <= offsets[1:][row_of]
    short = np.flatnonzero((lens > 0) & (lens < n))
    if len(short):  # rows shorter than n: one gram of their words, at the row's first position
        starts = offsets[:-1][short]
        hs = np.full(len(short), np.uint64(n), dtype=np.uint64)
        for k in range(n - 1):
            ok = k < lens[short]
            hs += np.where(ok, flat[np.minimum(starts + k, total - 1)], np.uint64(0)) * _MULT[k % len(_MULT)]
        h[starts] = hs
        keep[starts] = True
    return Ragged(_mix(h[keep]), new_off)


def minhash_matrix(shingles: Ragged, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """rensa MinHash digests of each row's shingle hashes, as a (rows, num_perm) uint32 matrix."""
    from rensa import RMinHash

    if len(shingles) == 0:
        return np.zeros((0, num_perm), dtype=np.uint32)
    m = RMinHash.digest_matrix_from_flat_token_hashes(shingles.flat, shingles.offsets.astype(np.uint64),
                                                     num_perm, seed)
    return np.array(m.to_rows(), dtype=np.uint32).reshape(len(shingles), num_perm)


def band_keys(digests: np.ndarray, threshold: float) -> np.ndarray:
    """Each row's LSH band keys for `near_duplicates`: a (rows, bands) matrix, a hash of each band's digest values."""
    n, num_perm = digests.shape
    bands = _bands(threshold, num_perm)
    r = num_perm // bands
    keys = np.empty((n, bands), dtype=np.uint64)
    mult = _MULT[:r] if r <= len(_MULT) else np.resize(_MULT, r) | np.uint64(1)
    for j in range(bands):
        block = digests[:, j * r:(j + 1) * r].astype(np.uint64)
        keys[:, j] = _mix((block * mult).sum(axis=1, dtype=np.uint64) ^ np.uint64(j))
    return keys


def near_duplicates(digests: np.ndarray, active: np.ndarray, threshold: float,
                    keys: np.ndarray | None = None) -> dict[int, tuple[int, float]]:
    """Rows (in order) that nearly duplicate an earlier kept row: {row: (kept row, estimated Jaccard)}.

    LSH with bands over the MinHash digests (`keys`: their `band_keys`, computed here when not
    given): rows that share no band with any other row are unique and need no further work; the
    rest are taken in order, each compared with the kept rows it shares a band with and confirmed
    by its estimated Jaccard (the share of equal digest values).
    """
    import pandas as pd

    n, num_perm = digests.shape
    rows = np.flatnonzero(active)
    if len(rows) < 2:
        return {}
    keys = band_keys(digests[rows], threshold) if keys is None else keys[rows]
    bands = keys.shape[1]
    # a band key no other row has can never lead to a candidate: each row looks only at its shared bands
    shared_band = np.empty(keys.shape, dtype=bool)
    for j in range(bands):
        shared_band[:, j] = pd.Series(keys[:, j]).duplicated(keep=False).to_numpy()
    shared = np.flatnonzero(shared_band.any(axis=1))
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    found: dict[int, tuple[int, float]] = {}
    for i, row_keys, row_shared in zip(rows[shared].tolist(), keys[shared].tolist(), shared_band[shared].tolist()):
        mine = [(buckets[j], k) for j, (k, on) in enumerate(zip(row_keys, row_shared)) if on]
        others: set[int] = set()
        for bucket, k in mine:
            got = bucket.get(k)
            if got:
                others.update(got)
        best = None
        if others:
            cand = np.fromiter(others, dtype=np.int64, count=len(others))
            sims = (digests[cand] == digests[i]).sum(axis=1) / num_perm
            top = int(np.argmax(sims))
            # ties go to the earliest kept row, so the result does not depend on set order
            top = int(cand[sims == sims[top]].min()), float(sims[top])
            if top[1] >= threshold:
                best = top
        if best is None:
            for bucket, k in mine:
                bucket.setdefault(k, []).append(i)
        else:
            found[i] = best
    return found


def _bands(threshold: float, num_perm: int) -> int:
    """The band count whose LSH S-curve has its midpoint just below the threshold (favours recall)."""
    best, best_err = 1, 9.0
    for b in range(1, num_perm + 1):
        if num_perm % b:
            continue
        r = num_perm // b
        mid = (1 / b) ** (1 / r)
        err = abs(mid - (threshold - 0.1))
        if err < best_err:
            best, best_err = b, err
    return best


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (np.unique, by one sort: it is far slower on tens of millions of values)."""
    s = np.sort(values, kind="stable")
    keep = np.empty(len(s), dtype=bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _in_filter(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Positions of `values` that may be among `members`: a superset, from a bit table indexed by the low bits
    of each (the n-gram hashes are mixed); about 1.5% of the others pass."""
    bits = min(29, max(13, int(np.ceil(np.log2(len(members) * 64)))))
    mask = np.uint64((1 << bits) - 1)
    table = np.zeros(1 << (bits - 3), dtype=np.uint8)
    low = (members & mask).view(np.int64)
    np.bitwise_or.at(table, low >> 3, (1 << (low & 7)).astype(np.uint8))
    out = []
    step = 1 << 20
    for start in range(0, len(values), step):
        low = (values[start:start + step] & mask).view(np.int64)
        out.append(np.flatnonzero(table[low >> 3] & (1 << (low & 7)).astype(np.uint8)) + start)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.intp)


def overlap(train: Ragged, test: Ragged, threshold: float) -> dict[int, tuple[int, float]]:
    """Test rows made largely of training n-grams: {test row: (training row sharing most, share of its n-grams)}.

    Each distinct n-gram is credited to the first training row that has it. Only the test rows'
    n-grams are sorted; the training n-grams are screened by a bit table of the test ones and only
    those that pass are looked up exactly.
    """
    if len(train.flat) == 0 or len(test.flat) == 0:
        return {}
    # each test row's distinct n-grams, as (row, index of the n-gram among the sorted distinct test n-grams)
    order = np.argsort(test.flat)
    ordered = test.flat[order]
    new = np.empty(len(ordered), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    grams = ordered[new]
    code = np.empty(len(order), dtype=np.int64)
    code[order] = np.cumsum(new) - 1
    rows = np.repeat(np.arange(len(test), dtype=np.int64), test.lengths())
    pairs = _distinct(rows * len(grams) + code)
    r, c = pairs // len(grams), pairs % len(grams)
    # the first training row holding each of those n-grams (-1: none)
    pos = _in_filter(train.flat, grams)
    at = np.minimum(np.searchsorted(grams, train.flat[pos]), len(grams) - 1)
    hit = grams[at] == train.flat[pos]
    pos, at = pos[hit], at[hit]
    first_row = np.full(len(grams), -1, dtype=np.int64)
    if len(pos):
        order = np.argsort(at, kind="stable")  # positions ascend: the first of each n-gram is the earliest row
        at_sorted = at[order]
        first = np.empty(len(at_sorted), dtype=bool)
        first[:1] = True
        np.not_equal(at_sorted[1:], at_sorted[:-1], out=first[1:])
        first_row[at_sorted[first]] = np.searchsorted(train.offsets, pos[order[first]], side="right") - 1
    owner = first_row[c]
    hit = owner >= 0
    n_grams = np.bincount(r, minlength=len(test))
    n_hits = np.bincount(r, weights=hit, minlength=len(test))
    share = np.divide(n_hits, n_grams, out=np.zeros(len(test)), where=n_grams > 0)
    found = {}
    for i in np.flatnonzero((share >= threshold) & (n_hits > 0)):
        lo, hi = np.searchsorted(r, [i, i + 1])  # r is sorted: row i's grams are one run
        owners, counts = np.unique(owner[lo:hi][hit[lo:hi]], return_counts=True)
        found[int(i)] = int(owners[np.argmax(counts)]), float(share[i])
    return found


def token_counter(tokenizer) -> Callable[[list[dict]], list[int]]:
    """Token counts of examples as the chat template renders them, without rendering each one.

    The template's cost per turn and per conversation is measured once; the turn contents are
    tokenised in one batch by the fast tokenizer.
    """
    def render(msgs: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False))

    if getattr(tokenizer, "chat_template", None):
        empty2 = render([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
        empty4 = render([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * 2)
        per_turn = (empty4 - empty2) / 2
        fixed = empty2 - 2 * per_turn
    else:
        per_turn, fixed = 0.0, 0.0

    def count(examples: list[dict]) -> list[int]:
        flat, owner = [], []
        for i, ex in enumerate(examples):
            for t in ([ex["text"]] if ex["kind"] == "text" else [m["content"] for k in
                                                                 ("messages", "prompt", "chosen", "completion")
                                                                 for m in ex.get(k) or ()]):
                flat.append(t)
                owner.append(i)
        lengths = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        totals = [0.0] * len(examples)
        n_turns = [0] * len(examples)
        for i, ids in zip(owner, lengths):
            totals[i] += len(ids)
            n_turns[i] += 1
        return [int(round(t + (fixed + per_turn * n if ex["kind"] != "text" else 0)))
                for t, n, ex in zip(totals, n_turns, examples)]

    return count


def below_score_margin(ex: dict, cfg: CleanConfig) -> str | None:
    """Why a preference pair falls below `min_score_margin` (chosen score minus rejected score), or None: it does not,
    there is no minimum, or the pair has no scores (kept, and counted as `no_scores`)."""
    if cfg.min_score_margin is None or ex["kind"] != "preference" or ex.get("score_chosen") is None:
        return None
    margin = ex["score_chosen"] - ex["score_rejected"]
    if margin >= cfg.min_score_margin:
        return None
    return (f"score margin {margin:g} (score_chosen {ex['score_chosen']:g} - score_rejected {ex['score_rejected']:g}) "
            f"is below data.clean.min_score_margin {cfg.min_score_margin:g}")
