"""One module per stage of the fine-tuning lifecycle; each exposes its Prefect task(s)."""

import tunewright  # noqa: F401,E402  switches library telemetry off before any stage imports a library
