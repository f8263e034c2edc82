"""Stage 7, monitoring and maintenance: drift between training prompts and production requests.

In the fine-tuning flow, an evidently report compares the prompts the model was trained on
(reference) with a batch of production requests (current): a baseline, with no event (`baseline`).
The monitoring flow (`flows/monitor.py`) reads windows of what `tunewright serve` logged
(`traffic`), judges drift (`drift`), latency and errors (`window`), and emits
`tunewright.drift.detected` at most once per window and once per cooldown (`retrain`); the
`retrain-on-drift` deployment in prefect.yaml is triggered by it. Where a challenger meets live traffic, the same
run compares it with the champion and promotes it or rolls it back, once per canary (`canary`).
"""

from tasks.monitor.baseline import monitor_drift
from tasks.monitor.canary import CanaryVerdict, arm_figures, decide, decide_canary, split_arms
from tasks.monitor.drift import drift_report, embedding_drift, vocabulary_drift
from tasks.monitor.retrain import DRIFT_EVENT, label_window, labelled_path, with_labelled_window
from tasks.monitor.traffic import read_requests, read_window, request_prompt, service_figures
from tasks.monitor.window import WindowVerdict, judge_window, monitor_traffic

__all__ = ["CanaryVerdict", "DRIFT_EVENT", "WindowVerdict", "arm_figures", "decide", "decide_canary", "drift_report",
           "embedding_drift", "judge_window", "label_window", "labelled_path", "monitor_drift", "monitor_traffic",
           "read_requests", "read_window", "request_prompt", "service_figures", "split_arms", "vocabulary_drift",
           "with_labelled_window"]
