"""Stage 1, data preparation: readers (sources, formats), cleaning, balancing, the gate, the task."""

from tasks.data.prepare import DataGateError, prepare
from tasks.data.stage import prepare_data

__all__ = ["DataGateError", "prepare", "prepare_data"]
