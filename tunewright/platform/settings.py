"""Where tunewright keeps its state, and the environment it sets before Prefect or MLflow start.

Everything the embedded default writes lives under one state folder: ``$TUNEWRIGHT_HOME``, else
the recipe's ``tracking.state_dir``, else ``./.tunewright``. Servers are used when their usual
variables are set: ``PREFECT_API_URL`` for Prefect, ``MLFLOW_TRACKING_URI`` for MLflow,
``TUNEWRIGHT_STUDY_STORAGE`` for the database of hyperparameter searches.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = ".tunewright"


def state_dir(configured: str | Path | None = None) -> Path:
    """The state folder: environment first, then the recipe, then ./.tunewright."""
    raw = os.environ.get("TUNEWRIGHT_HOME") or configured or DEFAULT_STATE_DIR
    path = Path(raw).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_tracking_uri(state: Path, configured: str | None = None) -> str:
    """MLflow store: the environment's server, else the recipe's, else SQLite in the state folder."""
    if os.environ.get("MLFLOW_TRACKING_URI") or configured:
        return os.environ.get("MLFLOW_TRACKING_URI") or configured
    from tunewright.platform.services import environment  # the MLflow server `tunewright up` started for this state folder

    return environment(state).get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}"


def mlflow_artifact_root(state: Path) -> str:
    """Artifact root for experiments created against the embedded SQLite store."""
    return (state / "mlartifacts").as_uri()


def study_storage(state: Path, configured: str | None = None) -> str:
    """Optuna's study database (an SQLAlchemy URL): the environment's, else the search's, else SQLite in the state folder.

    Workers that share a study need one database they all reach: PostgreSQL in production
    (``TUNEWRIGHT_STUDY_STORAGE=postgresql://user:password@host/db``, psycopg2 is installed).
    """
    return os.environ.get("TUNEWRIGHT_STUDY_STORAGE") or configured or f"sqlite:///{state / 'optuna.db'}"


def prefect_home(state: Path) -> Path:
    return state / "prefect"


def configure(state: Path, tracking_uri: str | None = None) -> dict[str, str]:
    """Set the process environment for an embedded run; returns what it set.

    Must run before ``prefect`` is imported: Prefect reads its settings at import.
    """
    wanted = {
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri(state, tracking_uri),
        # quiet the "git not found"/"no MLFLOW_ENABLE_ARTIFACTS" chatter of a local store
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if not os.environ.get("PREFECT_API_URL"):
        from tunewright.platform.services import environment

        started = environment(state).get("PREFECT_API_URL")  # the Prefect server `tunewright up` started here
        if started:
            os.environ["PREFECT_API_URL"] = started
    if not os.environ.get("PREFECT_API_URL"):
        # The temporary local server keeps its database here, so `prefect server start` with the
        # same PREFECT_HOME shows what the run recorded.
        wanted["PREFECT_HOME"] = str(prefect_home(state))
        # Prefect gives its temporary server 20 s to come up; a busy 2-core machine can need more
        wanted["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    done = {}
    for key, value in wanted.items():
        if key == "MLFLOW_TRACKING_URI" or key not in os.environ:
            os.environ[key] = value
            done[key] = value
    return done


def ui_commands(state: Path, tracking_uri: str) -> list[str]:
    """Commands that open the Prefect and MLflow UIs on what an embedded run recorded."""
    commands = []
    if os.environ.get("PREFECT_API_URL"):
        commands.append(f"open {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        commands.append(f"PREFECT_HOME={prefect_home(state)} .venv/bin/prefect server start")
    if tracking_uri.startswith("sqlite:"):
        commands.append(
            f".venv/bin/mlflow ui --backend-store-uri {tracking_uri} "
            f"--default-artifact-root {mlflow_artifact_root(state)}"
        )
    else:
        commands.append(f"open {tracking_uri}")
    return commands
