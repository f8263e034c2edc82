"""Stage loggers: Prefect's run logger inside a flow, a plain logger when a stage runs alone."""

from __future__ import annotations

import logging


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tunewright")


def transient_io_error(task, task_run, state) -> bool:
    """Prefect's retry condition for I/O-bound tasks: retry a lost connection or a timeout, not bad input (a missing
    file, a failed gate) and not anything else."""
    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return False
    except (ConnectionError, TimeoutError):
        return True
    except Exception as exc:  # noqa: BLE001  botocore's endpoint and read-timeout errors are not OSErrors
        return type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                      "ConnectionClosedError")
    return False
