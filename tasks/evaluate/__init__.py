"""Stage 5, evaluation and validation: base vs fine-tuned on the held-out split.

Both models answer every test prompt with batched greedy generation; the task metric is exact
match (on parsed JSON, with per-field accuracy, for structured tasks) plus the answer loss. A
reward model is judged instead by how often it scores the held-out chosen answer above the
rejected one, against the base model's own log-probabilities as the baseline.

`stage` holds the Prefect tasks; `answers` who answers (base answers cached, the champion from the
registry); `scoring` the figures; `report` the chart, HTML page and tables; `reward_model` a reward
model's evaluation.
"""

from tasks.evaluate.stage import evaluate, summarise_folds

__all__ = ["evaluate", "summarise_folds"]
