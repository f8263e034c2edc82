"""A registered model's canary setting: what share of its served alias's live traffic `challenger` answers, and how.

The setting is a registered-model tag (`tunewright.canary`, JSON `{"share": 0.1, "mode": "canary"}`) so that every
party reads the same one: `tunewright canary NAME` and stage 6 (a recipe's `deploy.canary`) write it,
`tunewright serve` routes by it when it follows `models:/NAME@ALIAS`, and the monitoring flow decides the canary.
"""

from __future__ import annotations

import json

CANARY_TAG = "tunewright.canary"
MODES = ("canary", "shadow")


def check_setting(share: float, mode: str) -> None:
    """A share in (0, 1] and a known mode, or a ValueError naming which is wrong."""
    if not 0 < share <= 1:
        raise ValueError(f"share {share}: a share of the traffic between 0 (exclusive) and 1")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: {' or '.join(MODES)}")


def set_canary(name: str, share: float, mode: str = "canary", client=None) -> dict:
    """Record the canary setting on the registered model (a share of 0 removes it); the setting written."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    if not share:
        try:
            client.delete_registered_model_tag(name, CANARY_TAG)
        except Exception:  # noqa: BLE001  there was none
            pass
        return {}
    check_setting(share, mode)
    setting = {"share": float(share), "mode": mode}
    client.set_registered_model_tag(name, CANARY_TAG, json.dumps(setting))
    return setting


def canary_setting(name: str, client=None) -> dict | None:
    """The registered model's canary setting (`share`, `mode`), or None when it has none (or does not exist)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        raw = (client.get_registered_model(name).tags or {}).get(CANARY_TAG)
    except MlflowException:
        return None
    if not raw:
        return None
    setting = json.loads(raw)
    check_setting(float(setting.get("share", 0)), setting.get("mode", "canary"))
    return {"share": float(setting["share"]), "mode": setting.get("mode", "canary")}
