"""PII detectors shared by stage 1 (redaction, the data gate), stage 5 (PII leaking into answers) and the server's
request log (redaction).

Regular expressions, with checksums where the kind has one (Luhn for card numbers, mod-97 for
IBANs), so detection needs no model and no network.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

PII = {
    "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    "card": re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),
    "ip": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
                     r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"),
    # US social security numbers as written, NNN-NN-NNNN, without the numbers never issued
    "ssn": re.compile(r"(?<![\w-])(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w-])"
                        r"|(?<![\w+])\+\d{8,14}(?!\w)"),
}
ORDER = ("email", "iban", "card", "ip", "ssn", "phone")  # longer, checksummed kinds claim their digits first
# every digit-based kind needs at least 7 digits close together: texts without such a run skip those patterns
DIGIT_RUN = re.compile(r"\d(?:[ ().:/-]{0,3}\d){6}")
ASCII_DIGITS = b"0123456789"


def has_digit_run(text: str) -> bool:
    """`DIGIT_RUN` found in the text; ASCII text with fewer than 7 digits (most) skips the search."""
    if text.isascii():
        raw = text.encode("ascii")
        if len(raw) - len(raw.translate(None, ASCII_DIGITS)) < 7:
            return False
    return DIGIT_RUN.search(text) is not None


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


def phone_ok(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 7 <= digits <= 15 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}", match)


VALID: dict[str, Callable[[str], bool]] = {
    "card": lambda m: luhn_ok(re.sub(r"\D", "", m)) and 13 <= sum(c.isdigit() for c in m) <= 19,
    "iban": iban_ok,
    "phone": phone_ok,
}


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = ORDER) -> list[tuple[str, str]]:
    """(kind, matched text) for each piece of PII the detectors find in a text; redaction tags are ignored."""
    email, digits = "@" in text, has_digit_run(text)
    if not (email or digits):
        return []
    stripped = re.sub(r"\[[A-Z_]+\]", " ", text)
    found = []
    for kind in (k for k in ORDER if k in kinds):
        if (kind == "email" and not email) or (kind != "email" and not digits):
            continue
        valid = VALID.get(kind)
        found += [(kind, m.group(0)) for m in PII[kind].finditer(stripped) if valid is None or valid(m.group(0))]
    return found


def redact(text: str, kinds: tuple[str, ...] | list[str] = ORDER, found: Counter | None = None) -> str:
    """The text with each piece of PII of `kinds` (taken in that order) replaced by its typed placeholder, such as
    `[EMAIL]`; the placeholders inserted are counted by kind in `found`. Texts with no '@' and no digit run (most)
    come back untouched without a pattern being tried."""
    email, digits = "@" in text, has_digit_run(text)
    if not (email or digits):
        return text
    for kind in kinds:
        if not (email if kind == "email" else digits):
            continue
        valid = VALID.get(kind)

        def sub(m: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            if found is not None:
                found[kind] += 1
            return f"[{kind.upper()}]"

        text = PII[kind].sub(sub, text)
    return text
