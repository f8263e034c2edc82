"""Stage 1, data preparation: readers (sources, formats), cleaning, balancing, the gate, the task.

`prepare_data` (the Prefect task) loads on first use, so a worker process that needs only the
row work does not import Prefect.
"""

from tasks.data.prepare import DataGateError, prepare

__all__ = ["DataGateError", "prepare", "prepare_data"]


def __getattr__(name: str):
    if name == "prepare_data":
        from tasks.data.stage import prepare_data
        return prepare_data
    raise AttributeError(f"module 'tasks.data' has no attribute {name!r}")
