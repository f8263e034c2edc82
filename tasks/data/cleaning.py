"""Cleaning: repair and normalise text, redact PII, find duplicates and train/test overlap.

Every step is counted (rows it changed, and redactions by kind) so the report can say what
cleaning did. Detection is by regular expressions with checksums where the kind has one (Luhn
for card numbers, mod-97 for IBANs), so a run needs no model and no network.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from typing import Callable

from tunewright.recipe import CleanConfig

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LINE_SEP = re.compile("[\u2028\u2029\r]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_TRAILING = re.compile(r" +\n")
_NEWLINES = re.compile(r"\n{3,}")
_TAG = re.compile(r"<(?:script|style)\b[^>]*>.*?</(?:script|style)>|<!--.*?-->|</?[A-Za-z][^<>]*>", re.S | re.I)
_BLOCK_TAG = re.compile(r"<(?:br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>", re.I)

_PII = {
    "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    "card": re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),
    "ip": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
                     r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w-])"
                        r"|(?<![\w+])\+\d{8,14}(?!\w)"),
}
_ORDER = ("email", "iban", "card", "ip", "phone")  # longer, checksummed kinds claim their digits first
# every digit-based kind needs at least 7 digits close together: texts without such a run skip those patterns
_DIGIT_RUN = re.compile(r"\d(?:[ ().:/-]{0,3}\d){6}")
_WORD = re.compile(r"\w+")


def luhn_ok(digits: str) -> bool:
    total, odd = 0, True
    for ch in reversed(digits):
        d = ord(ch) - 48
        if not odd:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        odd = not odd
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _phone_ok(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 7 <= digits <= 15 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}", match)


_VALID: dict[str, Callable[[str], bool]] = {
    "card": lambda m: luhn_ok(re.sub(r"\D", "", m)) and 13 <= sum(c.isdigit() for c in m) <= 19,
    "iban": iban_ok,
    "phone": _phone_ok,
}


class Cleaner:
    """The recipe's text cleaning, applied turn by turn, with counts of what each step changed."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.kinds = [k for k in _ORDER if k in cfg.redact_pii]
        self.extra = {name.upper(): re.compile(p) for name, p in cfg.pii_patterns.items()}
        self.replace = None
        if cfg.replacements:
            flags = re.I if cfg.replacements_ignore_case else 0
            terms = sorted(cfg.replacements, key=len, reverse=True)
            self.replace = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, terms)) + r")(?!\w)", flags)
            self.lookup = {(k.lower() if cfg.replacements_ignore_case else k): v for k, v in cfg.replacements.items()}
        self.steps: Counter = Counter()       # rows changed per step
        self.redactions: Counter = Counter()  # placeholders inserted per kind

    def _redact(self, text: str, found: Counter) -> str:
        digits = _DIGIT_RUN.search(text) is not None
        for kind in self.kinds:
            if kind == "email" and "@" not in text:
                continue
            if kind != "email" and not digits:
                continue
            pattern, valid = _PII[kind], _VALID.get(kind)

            def sub(m: re.Match, kind=kind, valid=valid) -> str:
                if valid is not None and not valid(m.group(0)):
                    return m.group(0)
                found[kind] += 1
                return f"[{kind.upper()}]"

            text = pattern.sub(sub, text)
        for name, pattern in self.extra.items():
            text, n = pattern.subn(f"[{name}]", text)
            if n:
                found[name.lower()] += n
        return text

    def text(self, text: str, changed: set) -> tuple[str, Counter]:
        """One cleaned text; `changed` collects the steps that altered it."""
        cfg, found = self.cfg, Counter()
        if cfg.fix_unicode and not text.isascii():
            import ftfy

            fixed = ftfy.fix_text(text, normalization="NFC", remove_control_chars=False)  # counted by its own step
            if fixed != text:
                changed.add("unicode")
                text = fixed
        if cfg.strip_control and (_CONTROL.search(text) or _LINE_SEP.search(text)):
            fixed = _CONTROL.sub("", _LINE_SEP.sub("\n", text.replace("\r\n", "\n")))
            if fixed != text:
                changed.add("control_chars")
                text = fixed
        if cfg.strip_html and ("<" in text or "&" in text):
            fixed = html.unescape(_TAG.sub("", _BLOCK_TAG.sub("\n", text)))
            if fixed != text:
                changed.add("html")
                text = fixed
        if cfg.normalize_whitespace:
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
        if self.kinds or self.extra:
            fixed = self._redact(text, found)
            if fixed != text:
                changed.add("pii")
                text = fixed
        return text, found

    def example(self, ex: dict) -> Counter:
        """Clean every text of an example in place; return its redactions by kind."""
        changed: set = set()
        found: Counter = Counter()
        if ex["kind"] == "text":
            ex["text"], f = self.text(ex["text"], changed)
            found += f
        else:
            for key in ("messages", "prompt", "chosen", "rejected", "completion"):
                for m in ex.get(key) or ():
                    m["content"], f = self.text(m["content"], changed)
                    found += f
        for step in changed:
            self.steps[step] += 1
        self.redactions += found
        return found


def pii_left(texts: list[str], cfg: CleanConfig) -> int:
    """PII the detectors still find (after redaction this should be 0)."""
    n = 0
    kinds = [k for k in _ORDER if k in cfg.redact_pii]
    for text in texts:
        email, digits = "@" in text, _DIGIT_RUN.search(text) is not None
        if not (email or digits):
            continue
        stripped = re.sub(r"\[[A-Z_]+\]", " ", text)
        for kind in kinds:
            if (kind == "email" and not email) or (kind != "email" and not digits):
                continue
            valid = _VALID.get(kind)
            n += sum(1 for m in _PII[kind].finditer(stripped) if valid is None or valid(m.group(0)))
    return n


def fold(text: str) -> str:
    """Content as compared for exact duplicates: case, accents and whitespace folded."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(ex: dict) -> str:
    if ex["kind"] == "text":
        parts = [ex["text"]]
    else:
        parts = [f"{k}:{m['role']}:{m['content']}" for k in ("messages", "prompt", "chosen", "rejected", "completion")
                 for m in ex.get(k) or ()]
        if ex["kind"] == "feedback":
            parts.append(f"label:{ex['label']}")
    return hashlib.blake2b(fold("\x1f".join(parts)).encode(), digest_size=16).hexdigest()


def near_text(ex: dict) -> str:
    """What near-duplicate detection compares: every non-system turn (a shared system prompt is not similarity)."""
    if ex["kind"] == "text":
        return ex["text"]
    return "\n".join(m["content"] for k in ("messages", "prompt", "chosen", "rejected", "completion")
                     for m in ex.get(k) or () if m["role"] != "system")


def shingles(text: str, n: int = 3) -> list[str]:
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


class NearDuplicates:
    """MinHash LSH over word 3-gram shingles (rensa); each candidate is confirmed by its estimated Jaccard."""

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1):
        from rensa import RMinHashLSH

        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        bands = _bands(threshold, num_perm)
        self.lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
        self.kept: dict[int, object] = {}

    def check_and_add(self, key: int, text: str) -> tuple[int, float] | None:
        """(key of the kept row it nearly duplicates, similarity), or None after indexing it."""
        from rensa import RMinHash

        sh = shingles(text)
        if not sh:
            return None
        mh = RMinHash(num_perm=self.num_perm, seed=self.seed)
        mh.update(sh)
        best = None
        for other in self.lsh.query(mh):
            sim = mh.jaccard(self.kept[other])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (other, sim)
        if best is None:
            self.lsh.insert(key, mh)
            self.kept[key] = mh
        return best


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


class Overlap:
    """Word n-grams of the training examples, to find test examples made largely of training text."""

    def __init__(self, n: int, threshold: float):
        self.n, self.threshold = n, threshold
        self.index: dict[int, str] = {}

    def grams(self, text: str) -> list[int]:
        words = _WORD.findall(text.casefold())
        if len(words) < self.n:
            return [hash(" ".join(words))] if words else []
        return list({hash(" ".join(words[i:i + self.n])) for i in range(len(words) - self.n + 1)})

    def add(self, rid: str, text: str) -> None:
        for g in self.grams(text):
            self.index.setdefault(g, rid)

    def find(self, text: str) -> tuple[str, float] | None:
        """(the training example sharing most n-grams, share of this text's n-grams seen in training), or None."""
        grams = self.grams(text)
        hits = [self.index[g] for g in grams if g in self.index]
        share = len(hits) / max(len(grams), 1)
        if not hits or share < self.threshold:
            return None
        return Counter(hits).most_common(1)[0][0], share


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
