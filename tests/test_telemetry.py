"""Nothing leaves the machine unasked: each library's own telemetry check says it is off in every process
tunewright starts (the CLI, a Prefect worker loading a flow, the server), with no variable set beforehand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what each library itself consults before it reports, asked after the entry point is imported
PROBE = """
import json, os, sys, importlib
importlib.import_module(sys.argv[1])
from mlflow.telemetry.utils import is_telemetry_disabled
import huggingface_hub.constants as hub
import evidently.telemetry as ev
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED
from ray._common.usage.usage_lib import usage_stats_enabled
import queue
import huggingface_hub.utils._telemetry as t
t._start_telemetry_thread = lambda: None  # what would post the queue to the hub
t._TELEMETRY_QUEUE = queue.Queue()
t.send_telemetry(topic="probe")  # what TRL's trainers call on start
print(json.dumps({
    "mlflow_disabled": is_telemetry_disabled(),
    "hf_hub_disabled": hub.HF_HUB_DISABLE_TELEMETRY,
    "hf_hub_send_telemetry_queued": t._TELEMETRY_QUEUE.qsize() > 0,
    "evidently_enabled": ev.event_logger.enabled(),
    "prefect_server_analytics": PREFECT_SERVER_ANALYTICS_ENABLED.value(),
    "gx_analytics": os.environ.get("GX_ANALYTICS_ENABLED"),
    "ray_usage_stats": usage_stats_enabled(),
}))
"""

SWITCHES = ("MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "DO_NOT_TRACK",
            "PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "CI",
            "RAY_USAGE_STATS_ENABLED",
            "PYTEST_CURRENT_TEST")


def _probe(entry: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES and not k.startswith("MLFLOW_")} | extra
    out = subprocess.run([sys.executable, "-c", PROBE, entry], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", ["tunewright.cli", "flows.finetune", "tunewright.serve.app"])
def test_every_entry_point_switches_every_librarys_telemetry_off(entry):
    found = _probe(entry)
    assert found == {"mlflow_disabled": True, "hf_hub_disabled": True, "hf_hub_send_telemetry_queued": False,
                     "evidently_enabled": False, "prefect_server_analytics": False, "gx_analytics": "False",
                     "ray_usage_stats": False}


def test_a_library_that_is_not_told_reports_so_the_probe_can_fail():
    """Without tunewright imported first, the same checks say telemetry is on: the probe can see a leak."""
    found = _probe("json")
    assert found["mlflow_disabled"] is False or found["hf_hub_disabled"] is False
    assert found["evidently_enabled"] is True and found["ray_usage_stats"] is True


def test_a_user_who_opts_in_keeps_their_setting():
    found = _probe("tunewright.cli", HF_HUB_DISABLE_TELEMETRY="0", DO_NOT_TRACK="")
    assert found["hf_hub_disabled"] is False
    assert found["mlflow_disabled"] is True  # MLflow's own switch is still off unless the user sets it
