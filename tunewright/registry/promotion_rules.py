"""Promotion gate rules: `json_exact_match >= 0.6`, `json_exact_match >= champion.json_exact_match + 0.02`,
`toxicity <= base.toxicity`.

A rule compares two sums of terms; a term is a number or a metric. A bare metric is the candidate's
(`tuned.` may be written); `base.` and `champion.` name the other models stage 5 scored on the same
test set. A rule that names the champion passes when there is none yet (and says so).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

MODELS = ("tuned", "base", "champion")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_RULE = re.compile(r"^(?P<lhs>[^<>=]+?)\s*(?P<op>>=|<=|==|>|<)\s*(?P<rhs>[^<>=]+)$")
_TERM = re.compile(r"\s*(?P<sign>[+-])?\s*(?:(?P<num>\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)|"
                   r"(?:(?P<model>tuned|base|champion)\.)?(?P<metric>[A-Za-z_][A-Za-z0-9_]*))\s*")


class GateRuleError(ValueError):
    """A gate rule that cannot be read, or that names a metric stage 5 does not compute."""


@dataclass(frozen=True)
class Term:
    sign: float
    number: float | None = None
    model: str = "tuned"
    metric: str = ""

    def value(self, scores: dict[str, dict[str, float]]) -> float | None:
        if self.number is not None:
            return self.sign * self.number
        got = scores.get(self.model, {}).get(self.metric)
        return None if got is None else self.sign * got

    def text(self) -> str:
        return f"{self.number:g}" if self.number is not None else f"{self.model}.{self.metric}"


@dataclass(frozen=True)
class Rule:
    text: str
    lhs: tuple[Term, ...]
    op: str
    rhs: tuple[Term, ...]

    def metrics(self) -> set[str]:
        return {t.metric for t in self.lhs + self.rhs if t.number is None}

    def names_champion(self) -> bool:
        return any(t.model == "champion" for t in self.lhs + self.rhs if t.number is None)

    def check(self, scores: dict[str, dict[str, float]]) -> tuple[bool, str]:
        """(passed, what was compared) against model -> metric -> value."""
        if self.names_champion() and not scores.get("champion"):
            return True, f"{self.text}: no champion yet"
        sides = []
        for side in (self.lhs, self.rhs):
            values = [t.value(scores) for t in side]
            missing = [t.text() for t, v in zip(side, values) if v is None]
            if missing:
                raise GateRuleError(f"deploy.gate {self.text!r}: stage 5 has no {', '.join(missing)} "
                                    f"(it scored {sorted(scores.get('tuned', {}))})")
            sides.append(sum(values))
        a, b = sides
        # scores are shares of a test set: a float sum that lands a hair off the bound is on it
        passed = {">=": a >= b - 1e-9, "<=": a <= b + 1e-9, "==": abs(a - b) <= 1e-9}.get(self.op, _OPS[self.op](a, b))
        return passed, f"{self.text}: {sides[0]:.4f} {self.op} {sides[1]:.4f}"


def _terms(text: str, rule: str) -> tuple[Term, ...]:
    terms, pos = [], 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (terms and not m["sign"]):
            raise GateRuleError(f"deploy.gate {rule!r}: cannot read {text[pos:]!r} (write terms like 0.6, "
                                "exact_match, base.toxicity, champion.exact_match + 0.02)")
        sign = -1.0 if m["sign"] == "-" else 1.0
        terms.append(Term(sign, float(m["num"])) if m["num"] else Term(sign, None, m["model"] or "tuned", m["metric"]))
        pos = m.end()
    if not terms:
        raise GateRuleError(f"deploy.gate {rule!r}: a side is empty")
    return tuple(terms)


def parse_rule(text: str) -> Rule:
    m = _RULE.match(text.strip())
    if not m:
        raise GateRuleError(f"deploy.gate {text!r}: expected `LEFT OP RIGHT` with OP one of >=, <=, >, <, ==")
    return Rule(text.strip(), _terms(m["lhs"], text), m["op"], _terms(m["rhs"], text))


def check_rules(rules: list[str], scores: dict[str, dict[str, float]]) -> list[dict]:
    """Each rule with whether it passed and the figures it compared."""
    out = []
    for text in rules:
        passed, detail = parse_rule(text).check(scores)
        out.append({"rule": text, "passed": passed, "detail": detail})
    return out
