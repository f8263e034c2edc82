"""Drift reports: evidently comparing the training data (reference) with production prompts and answers (current),
by their text features, their vocabulary and their meaning (base-model embeddings)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path


def _features(prompts: list[str]):
    import pandas as pd

    return pd.DataFrame({
        "prompt": prompts,
        "chars": [len(p) for p in prompts],
        "words": [len(p.split()) for p in prompts],
        "sentences": [max(1, len(re.findall(r"[.!?]+", p))) for p in prompts],
        "digits_share": [sum(ch.isdigit() for ch in p) / max(len(p), 1) for p in prompts],
        "upper_share": [sum(ch.isupper() for ch in p) / max(len(p), 1) for p in prompts],
    })


def drift_report(reference: list[str], current: list[str], drift_share: float, html_path: Path,
                 snapshots: list | None = None, timestamp=None) -> dict:
    """Run the evidently drift preset; save HTML; return per-column and dataset drift (and keep the evidently
    snapshot in `snapshots` when given, for a workspace)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset
    from sklearn.exceptions import ConvergenceWarning

    ref, cur = _features(reference), _features(current)
    definition = DataDefinition(text_columns=["prompt"],
                                numerical_columns=["chars", "words", "sentences", "digits_share", "upper_share"])
    report = Report([DataDriftPreset(drift_share=drift_share, text_method="abs_text_content_drift")],
                    include_tests=True)
    with warnings.catch_warnings():
        # the text domain classifier fails to converge exactly when the sets are alike
        warnings.simplefilter("ignore", ConvergenceWarning)
        snapshot = report.run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                              reference_data=Dataset.from_pandas(ref, data_definition=definition), timestamp=timestamp,
                              tags=["prompts"])
    d, status = _kept(snapshot, html_path, snapshots)
    summary: dict = {"columns": {}}
    for m in d["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("ValueDrift"):
            summary["columns"][cfg["column"]] = {"drift_detected": status.get(m["id"]) == "FAIL",
                                                 "score": float(m["value"]), "method": cfg["method"]}
        elif cfg["type"].endswith("DriftedColumnsCount"):
            summary["drifted_share"] = float(m["value"]["share"])
            summary["n_drifted"] = int(m["value"]["count"])
    summary["dataset_drift"] = summary.get("drifted_share", 0.0) >= drift_share
    return summary


def _kept(snapshot, html_path: Path, snapshots: list | None) -> tuple[dict, dict]:
    """Save an evidently snapshot as HTML (and keep it for the workspace); its results and its tests' statuses."""
    snapshot.save_html(str(html_path))
    if snapshots is not None:
        snapshots.append(snapshot)
    d = snapshot.dict()
    return d, {t["metric_config"]["metric_id"]: t["status"] for t in d.get("tests", [])}


def answer_features(answers: list[str]):
    """Length, words and JSON validity of each answer: what an answer drift report compares."""
    import pandas as pd

    from tunewright.scoring.metrics import json_valid

    return pd.DataFrame({"answer_chars": [len(a) for a in answers], "answer_words": [len(a.split()) for a in answers],
                         "answer_json_valid": [float(json_valid(a)) for a in answers]})


def numeric_drift(ref, cur, drift_share: float, html_path: Path, snapshots: list | None = None,
                  timestamp=None, tag: str = "answers") -> dict:
    """Drift of numeric columns (an evidently drift preset); save HTML; per-column drift and the drifted columns."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=list(ref.columns))
    with warnings.catch_warnings():
        # a column constant on both sides (every answer valid JSON) divides by a zero spread: no drift, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition), timestamp=timestamp, tags=[tag])
    d, status = _kept(snapshot, html_path, snapshots)
    columns = {m["config"]["column"]: {"drift_detected": status.get(m["id"]) == "FAIL", "score": float(m["value"])}
               for m in d["metrics"] if m["config"]["type"].endswith("ValueDrift")}
    return {"columns": columns, "drifted": [c for c, v in columns.items() if v["drift_detected"]]}


_WORD = re.compile(r"[^\W\d_]{2,}")  # words of letters: order numbers are not vocabulary


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def vocabulary_drift(reference: list[str], current: list[str], drift_share: float, html_path: Path,
                     snapshots: list | None = None, timestamp=None, top: int = 40, sample: int = 5000,
                     min_reference: int = 400, threshold: float = 0.1) -> dict:
    """Drift of the words the prompts use. The training prompts' vocabulary is built from half of them and the other
    half is the reference, so words the training data holds only once count as unseen on both sides alike. Each
    word of the reference and of the window is one row: one of the `top` commonest words, `(unseen)` when the
    vocabulary lacks it, `(other)` otherwise; evidently judges that distribution by its Jensen-Shannon distance.
    Also the window's commonest unseen words, which name what the traffic now talks about.

    The words of one prompt are not independent draws, so a small reference makes the distance noisy: with fewer
    than `min_reference` training prompts the figures are reported and not judged."""
    from collections import Counter

    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    vocab = Counter(w for p in reference[0::2] for w in _words(p))
    ref_words = [w for p in reference[1::2] for w in _words(p)]
    cur_words = [w for p in current for w in _words(p)]
    common = {w for w, _ in Counter(ref_words + cur_words).most_common(top) if w in vocab}

    def rows(words: list[str]) -> pd.DataFrame:
        step = max(1, len(words) // sample)
        return pd.DataFrame({"word": [w if w in common else "(unseen)" if w not in vocab else "(other)"
                                      for w in words[::step]]})

    definition = DataDefinition(categorical_columns=["word"])
    snapshot = Report([DataDriftPreset(drift_share=drift_share, cat_method="jensenshannon", cat_threshold=threshold)],
                      include_tests=True).run(
        current_data=Dataset.from_pandas(rows(cur_words), data_definition=definition),
        reference_data=Dataset.from_pandas(rows(ref_words), data_definition=definition), timestamp=timestamp,
        tags=["words"])
    d, status = _kept(snapshot, html_path, snapshots)
    drift = next(m for m in d["metrics"] if m["config"]["type"].endswith("ValueDrift"))
    unseen = Counter(w for w in cur_words if w not in vocab)
    judged = len(reference) >= min_reference
    return {"drift_detected": judged and status.get(drift["id"]) == "FAIL", "score": float(drift["value"]),
            "judged": judged, "note": "" if judged else (f"{len(reference)} training prompts, fewer than "
                                                         f"{min_reference}: reported, not judged"),
            "method": drift["config"]["method"],
            "unseen_share_reference": sum(w not in vocab for w in ref_words) / max(len(ref_words), 1),
            "unseen_share_current": sum(unseen.values()) / max(len(cur_words), 1),
            "new_words": [w for w, _ in unseen.most_common(15)], "vocabulary_size": len(vocab)}


def embedding_drift(model_dir: str, reference: list[str], current: list[str], sample: int = 300) -> dict:
    """Drift of the prompts' meaning: base-model embeddings of the training prompts (at most `sample`, evenly
    spaced) against the window's, judged by evidently's classifier method (ROC AUC against a bootstrapped null)."""
    import pandas as pd
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

    from tunewright.scoring.embeddings import embed

    step = max(1, len(reference) // sample)
    ref, cur = embed(model_dir, reference[::step][:sample]), embed(model_dir, current[:sample])
    columns = [f"e{i}" for i in range(ref.shape[1])]
    score, drifted, method = model(bootstrap=True)(pd.DataFrame(cur, columns=columns),
                                                   pd.DataFrame(ref, columns=columns))
    return {"score": float(score), "drift_detected": bool(drifted), "method": method, "n_reference": len(ref),
            "n_current": len(cur)}
