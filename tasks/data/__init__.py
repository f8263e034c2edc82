"""Stage 1, data preparation: readers (sources, formats), cleaning, balancing, the gate, the task."""

from tasks.data.stage import DataGateError, prepare_data

__all__ = ["DataGateError", "prepare_data"]
