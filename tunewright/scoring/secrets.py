"""Secret detectors shared by stage 1 (redaction) and the server's request log: credentials in a text replaced by
typed placeholders such as `[AWS_ACCESS_KEY]`, counted by kind like PII. Training on secrets is how models leak them.

What is found:
- detect-secrets' known-format plugins (cloud keys, GitHub/GitLab/Slack/Stripe/OpenAI/... tokens, JWTs, passwords in
  URLs, Azure/IBM/Cloudant credentials) and its keyword plugin (a quoted value assigned to a secret-sounding key, as
  in `"password": "hunter2"`). Their regular expressions are run here with spans, so only the secret is replaced
  (`postgres://app:[PASSWORD]@db`), and found values pass its false-positive filters (templates such as `${X}`,
  `$VAR`, UUIDs, sequences like `ABCDEF...`, values without a letter, `x = get_secret()`). Nothing is verified
  against a service: no network.
- Of ours, where the plugins find a part only: a private key block whole, BEGIN to END (the plugin flags the BEGIN
  line; a block cut short loses its BEGIN line and the key lines that follow); an unquoted AWS secret access key
  after `aws_secret_access_key=` or the like, and any 40-character key-shaped token in a text that holds an AWS
  access key id (the pair); an unquoted value assigned to a secret-sounding key (`password=hunter2`,
  `Password=Pa55;` in a connection string, `API_KEY: a1b2c3`), when it is not a plain word: after a
  password-like key any value of 4 characters or more except null-likes, after another key only values holding a
  digit or a symbol (a key word in prose, `Password: Required`, is not a secret).
- detect-secrets' high-entropy plugins (Base64 and hex strings) are off: on prose, hashes, UUIDs and base64 data
  they flag far more than secrets, and a value of any entropy assigned to a secret-sounding key is caught above.
  Its public-IP plugin is off too: IP addresses are PII (`[IP]`).

detect-secrets runs some 40 regular expressions a line, far too slow for every row of a million-row dataset, and
it is imported only when needed. `suspect` screens a text first in a few C-level passes: a run of 20 or more
token characters (every known-format token has one), a private key header, a URL with user info, or a
secret-sounding key word in the word before a `:` or `=`. Texts it passes over (nearly all) come back untouched;
in one it flags, only the lines it flags are scanned.
"""

from __future__ import annotations

import re
from collections import Counter

# a private key block: BEGIN to the matching END, or (cut short) its header and the key lines that follow
PRIVATE_KEY = re.compile(
    r"-{3,5} ?BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?) ?-{3,5}(?:.*?-{3,5} ?END \1 ?-{3,5}"
    r"|(?:(?:\r?\n[ \t]*)+(?:[A-Za-z0-9+/=]{8,}|(?:Proc-Type|DEK-Info|Comment|Version|Hash): [^\n]*))*)"
    r"|PuTTY-User-Key-File-\d+: .*?(?:Private-MAC: [0-9a-fA-F]+|\Z)", re.S)
# an unquoted AWS secret access key after a key that names it
AWS_SECRET = re.compile(r"(?i:aws)[\w .-]{0,24}?(?i:secret|key)[\w.-]{0,20}?['\"\]]{0,2}[ \t]*(?:=>?|:)[ \t]*['\"]?"
                        r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")
# a 40-character key-shaped token (upper case, lower case and a digit: not a hex digest), beside an access key id
AWS_PAIRED = re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[A-Z])"
                        r"(?=[A-Za-z0-9/+]{0,39}\d)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
AWS_KEY_ID = re.compile(r"(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}")
# a value assigned to a key, unquoted; it counts when the key's name ends in a secret-sounding word (`KEY_NAME`)
ASSIGNED = re.compile(r"(?<![\w-])([\w-]+)['\"\]]{0,2}[ \t]*(=(?!=)|:(?!:))[ \t]*([^\s'\"`,;&<>(){}\[\]]{4,})")
PASSWORD_WORDS = r"pass(?:word|wd|phrase)?|pwd|contrase(?:ñ|n)a"
KEY_NAME = re.compile(r"(?i)(?:(" + PASSWORD_WORDS + r")|secret(?:[_-]?access)?(?:[_-]?key)?|(?:api|auth|access)[_-]?key"
                      r"|private[_-]?key|(?:access|auth|api|bearer|refresh|session|oauth|bot)?[_-]?token|credentials?)$")
NOT_SECRETS = {"none", "null", "nil", "true", "false", "undefined", "empty", "required", "optional"}
REFERENCE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # `settings.password`: a name, not a value
SYMBOL = re.compile(r"[^\w.-]|\d")
TOKEN_TAIL = re.compile(r"[A-Za-z0-9_-]*")

# each detect-secrets plugin used: its kind (placeholder `[KIND]`; AWS ids and secrets, and keyword hits, are split)
# and the text, lower-cased, that every match of its patterns holds (a line without any of them skips the plugin)
PLUGINS = {
    "ArtifactoryDetector": ("artifactory_token", ("akc", "ap")),
    "AWSKeyDetector": ("aws_access_key", ("a3t", "abia", "acca", "akia", "asia", "aws")),
    "AzureStorageKeyDetector": ("azure_storage_key", ("accountkey=",)),
    "BasicAuthDetector": ("password", ("://",)),
    "CloudantDetector": ("cloudant_key", ("cl",)),
    "DiscordBotTokenDetector": ("discord_token", (".",)),
    "GitHubTokenDetector": ("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    "GitLabTokenDetector": ("gitlab_token", ("gl", "gr1348941")),
    "IbmCloudIamDetector": ("ibm_cloud_key", ("key", "pwd", "pass", "token")),
    "IbmCosHmacDetector": ("ibm_cos_key", ("secret",)),
    "JwtTokenDetector": ("jwt", ("eyj",)),
    "MailchimpDetector": ("mailchimp_key", ("-us",)),
    "NpmDetector": ("npm_token", ("_authtoken",)),
    "OpenAIDetector": ("openai_key", ("t3blbkfj",)),
    "PypiTokenDetector": ("pypi_token", ("pypi-",)),
    "SendGridDetector": ("sendgrid_key", ("sg.",)),
    "SlackDetector": ("slack_token", ("xox", "hooks.slack.com")),
    "SoftlayerDetector": ("softlayer_key", ("softlayer", "sl")),
    "SquareOAuthDetector": ("square_secret", ("sq0csp-",)),
    "StripeDetector": ("stripe_key", ("k_live_",)),
    "TelegramBotTokenDetector": ("telegram_token", (":",)),
    "TwilioKeyDetector": ("twilio_key", ("ac", "sk")),
}

# the screen: token characters as b"a", others as a space; a run of RUN of them may be a token
_TOKEN_BYTES = bytes(97 if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "_-+=") else 32 for c in range(256))
RUN = 20
_RUN = b"a" * RUN
KEY_WORDS = ("pass", "pw", "secret", "key", "token", "contrase", "credential")
# (regex, kind, validity check or None, needles, whether it names a key word) of the plugins, built on first use
_PLUGINS: list | None = None
_KEYWORD: list | None = None  # (regex, group of the value) of the keyword plugin


def suspect(text: str) -> bool:
    """Whether a text may hold a secret the detectors find. False for nearly every text, in a few C-level passes:
    no run of `RUN` token characters, no private key header, no URL with user info, and no secret-sounding key word
    in the word before a `:` or `=` (comparisons written value first, `"x" == password`, are not looked for)."""
    if _RUN in text.encode("utf-8", "surrogatepass").translate(_TOKEN_BYTES):
        return True
    if "PRIVATE KEY" in text or "PuTTY-User-Key" in text or ("@" in text and "://" in text):
        return True
    marks = text.count(":") + text.count("=")
    if not marks or (marks > 8 and not _has_key_word(text.lower())):  # many marks: one look at the whole text first
        return False
    for ch in ":=":
        i = text.find(ch)
        while i >= 0:
            key = text[max(0, i - 40):i].rstrip(" \t'\"]").rsplit(None, 1)
            if key and _has_key_word(key[-1].lower()):
                return True
            i = text.find(ch, i + 1)
    return False


def _has_key_word(low: str) -> bool:
    for k in KEY_WORDS:
        if k in low:
            return True
    return False


def redact(text: str, found: Counter | None = None, patterns: dict[str, re.Pattern] | None = None,
           detect: bool = True) -> str:
    """The text with each secret replaced by its typed placeholder (`[GITHUB_TOKEN]`), counted by kind in `found`.

    `patterns` (placeholder kind -> compiled expression, a recipe's own) are replaced first, on every text; the
    detectors (`detect`) only look at texts `suspect` flags, so most come back as they were without a pattern
    being tried."""
    for name, pattern in (patterns or {}).items():
        text, n = pattern.subn(f"[{name.upper()}]", text)
        if n and found is not None:
            found[name.lower()] += n
    if not detect or not suspect(text):
        return text
    if "PRIVATE KEY" in text or "PuTTY-User-Key" in text:
        text, n = PRIVATE_KEY.subn("[PRIVATE_KEY]", text)
        if n and found is not None:
            found["private_key"] += n
    spans = find(text)
    for start, end, kind in reversed(spans):
        text = f"{text[:start]}[{kind.upper()}]{text[end:]}"
    if found is not None:
        found.update(kind for _, _, kind in spans)
    return text


def find(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each secret in a text (private key blocks aside: `redact` takes them whole first), in
    order and not overlapping; where detectors overlap, a known format wins over a keyword assignment."""
    candidates: list[tuple[int, int, int, str]] = []  # (rank: lower wins, start, end, kind)
    pos = 0
    for line in text.splitlines(keepends=True):
        if suspect(line):
            candidates += [(rank, pos + s, pos + e, kind) for rank, s, e, kind in _scan_line(line)]
        pos += len(line)
    if any(kind == "aws_access_key" for *_, kind in candidates):  # the pair: the secret key need not be named
        candidates += [(1, m.start(), m.end(), "aws_secret_key") for m in AWS_PAIRED.finditer(text)]
    kept: list[tuple[int, int, str]] = []
    for _, start, end, kind in sorted(candidates, key=lambda c: (c[0], c[1] - c[2], c[1])):
        if all(end <= s or start >= e for s, e, _ in kept):
            kept.append((start, end, kind))
    return sorted(kept)


def _scan_line(line: str) -> list[tuple[int, int, int, str]]:
    """(rank, start, end, kind) of what each detector finds in one line. Patterns that name a key word (`password`,
    `token`, `key`...) only run on lines that hold one, and the keyword plugin's only on lines with a quote."""
    from detect_secrets.filters import heuristic

    plugins, keyword = _detectors()
    low = line.lower()
    keyed = any(k in low for k in KEY_WORDS)
    out = []
    for regex, kind, valid, needles, needs_key in plugins:
        if (needs_key and not keyed) or not any(n in low for n in needles):
            continue
        for m in regex.finditer(line):
            start, end = _value_span(m)
            end = TOKEN_TAIL.match(line, end).end()  # a token is replaced whole (the JWT pattern stops short of it)
            value = line[start:end]
            if (valid is not None and not valid(m.group(0))) or _filtered(value, heuristic):
                continue
            what = "aws_secret_key" if kind == "aws_access_key" and not AWS_KEY_ID.fullmatch(value) else kind
            out.append((1 if what == "password" else 0, start, end, what))  # a known format in a URL's password wins
    if "aws" in low:
        out += [(0, *m.span(1), "aws_secret_key") for m in AWS_SECRET.finditer(line)]
    for regex, group in keyword if keyed and ('"' in line or "'" in line or "`" in line) else ():
        for m in regex.finditer(line):
            value = m.group(group)
            if not _filtered(value, heuristic, line):
                key = line[m.start():m.start(group)]
                out.append((2, *m.span(group), "password" if re.search(PASSWORD_WORDS, key, re.I) else "secret"))
    for m in ASSIGNED.finditer(line) if keyed else ():
        key = KEY_NAME.search(m.group(1))
        value = m.group(3)
        bare = value.rstrip(".!?:")  # judged without the sentence's end, replaced with it (a password may end in "!")
        if key is None or _filtered(bare, heuristic, line) or bare.lower() in NOT_SECRETS or REFERENCE.fullmatch(bare):
            continue
        password = key.group(1) is not None
        if (password and m.group(2) == "=") or SYMBOL.search(bare):
            out.append((3, *m.span(3), "password" if password else "secret"))
    return out


def _value_span(m: re.Match) -> tuple[int, int]:
    """Where the secret is in a plugin's match: its last group that ends the match (bar quotes and delimiters),
    else the whole match without the delimiters some patterns take in (`(?:\\s|=|:|"|^)AKC...`)."""
    start, end = m.span()
    for g in range(m.re.groups, 0, -1):
        s, e = m.span(g)
        if e > s and not any(c.isalnum() for c in m.string[e:end]):
            return s, e
    text = m.string
    while start < end and text[start] in " \t\r\n'\"=:@;,":
        start += 1
    while end > start and text[end - 1] in " \t\r\n'\"=:@;,":
        end -= 1
    return start, end


def _filtered(value: str, heuristic, line: str | None = None) -> bool:
    """detect-secrets' default false-positive filters; the ones that look at the line (`x = get_secret()`, `user_id:
    ...`) only for keyword assignments, as it does."""
    if len(value) < 4 or heuristic.is_templated_secret(value) or heuristic.is_prefixed_with_dollar_sign(value) \
            or heuristic.is_sequential_string(value) or heuristic.is_potential_uuid(value) \
            or heuristic.is_not_alphanumeric_string(value):
        return True
    return line is not None and (heuristic.is_indirect_reference(line) or heuristic.is_likely_id_string(value, line))


def _detectors() -> tuple[list, list]:
    """The detect-secrets plugins' patterns (imported on first use: the library takes a while to load)."""
    global _PLUGINS, _KEYWORD
    if _PLUGINS is None:
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.plugins.keyword import QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP

        classes = {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}
        _KEYWORD = list(QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP.items())
        _PLUGINS = [(regex, kind, getattr(classes[name], "is_formally_valid", None), needles,
                     any(k in regex.pattern.lower() for k in KEY_WORDS))
                    for name, (kind, needles) in PLUGINS.items() for regex in classes[name].denylist]
    return _PLUGINS, _KEYWORD
