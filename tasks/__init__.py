"""One module per stage of the fine-tuning lifecycle; each exposes its Prefect task(s)."""
