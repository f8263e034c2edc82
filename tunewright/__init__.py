"""tunewright: the seven-stage fine-tuning lifecycle as Prefect flows, tracked in MLflow."""

__version__ = "0.1.0"
