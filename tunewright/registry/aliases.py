"""Moving registry aliases with checks and a record: stage 6's promotion, `tunewright promote` and `rollback`.

Every move is recorded on the version (`tunewright.<alias>.by`, `.reason`, `.at`) and in a short history
on the registered model (`tunewright.history.<alias>`, newest last) that `rollback` walks back through.
A move either happens whole or not at all: if recording it fails, the alias goes back where it was.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass

HISTORY_KEEP = 20


class PromotionError(ValueError):
    """A version that cannot take the alias (missing, not a tunewright model, or its gate failed)."""


@dataclass(frozen=True)
class Move:
    name: str
    alias: str
    version: str
    previous: str | None
    by: str
    reason: str
    action: str


def _client(client=None):
    from mlflow import MlflowClient

    return client or MlflowClient()


def alias_holder(name: str, alias: str, client=None) -> str | None:
    """The version an alias points at now, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(client).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history(name: str, alias: str, client=None) -> list[dict]:
    from mlflow.exceptions import MlflowException

    try:
        tags = _client(client).get_registered_model(name).tags or {}
    except MlflowException as exc:
        raise PromotionError(f"{name}: no such registered model ({exc.message})") from None
    return json.loads(tags.get(f"tunewright.history.{alias}", "[]"))


def check_version(name: str, version: str, client=None, force: bool = False):
    """The model version, if it may take an alias: it exists, is a tunewright model, and passed its gate (unless
    `force`, for a person overriding the gate with a reason)."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionError(f"{name} version {version}: not in the registry at {client.tracking_uri} "
                             f"({exc.message})") from None
    tags = mv.tags or {}
    if "tunewright.kind" not in tags:
        raise PromotionError(f"{name} version {version} was not registered by tunewright (no tunewright.kind tag)")
    if mv.status != "READY":
        raise PromotionError(f"{name} version {version} is {mv.status}, not READY")
    gate = tags.get("tunewright.gate", "")
    if not force and gate != "passed":
        raise PromotionError(f"{name} version {version} did not pass its promotion gate "
                             f"({tags.get('tunewright.promotion', gate or 'no gate result')}); pass --force with a "
                             "--reason to promote it anyway")
    return mv


def move_alias(name: str, alias: str, version: str, *, by: str | None = None, reason: str, action: str = "promote",
               client=None) -> Move:
    """Point `alias` at `version` and record who moved it and why; all or nothing."""
    client = _client(client)
    version = str(version)
    by = by or getpass.getuser()
    previous = alias_holder(name, alias, client)
    past = history(name, alias, client)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_registered_model_alias(name, alias, version)
    try:
        for key, value in (("by", by), ("reason", reason), ("at", at), ("action", action)):
            client.set_model_version_tag(name, version, f"tunewright.{alias}.{key}", value[:4900])
        entry = {"version": version, "previous": previous, "by": by, "reason": reason[:300], "at": at,
                 "action": action}
        client.set_registered_model_tag(name, f"tunewright.history.{alias}",
                                        json.dumps((past + [entry])[-HISTORY_KEEP:]))
    except BaseException:
        restore_alias(name, alias, previous, client)
        raise
    return Move(name, alias, version, previous, by, reason, action)


def retire_alias(name: str, alias: str, *, reason: str, by: str | None = None, action: str = "retire",
                 client=None) -> Move:
    """Remove `alias` (a challenger whose canary ended) and record who removed it and why, on the version that held
    it and in the alias history; all or nothing."""
    client = _client(client)
    by = by or getpass.getuser()
    previous = alias_holder(name, alias, client)
    if previous is None:
        raise PromotionError(f"{name}@{alias}: no version holds it")
    past = history(name, alias, client)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.delete_registered_model_alias(name, alias)
    try:
        for key, value in (("by", by), ("reason", reason), ("at", at), ("action", action)):
            client.set_model_version_tag(name, previous, f"tunewright.{alias}.{key}", value[:4900])
        entry = {"version": None, "previous": previous, "by": by, "reason": reason[:300], "at": at, "action": action}
        client.set_registered_model_tag(name, f"tunewright.history.{alias}",
                                        json.dumps((past + [entry])[-HISTORY_KEEP:]))
    except BaseException:
        restore_alias(name, alias, previous, client)
        raise
    return Move(name, alias, "", previous, by, reason, action)


def restore_alias(name: str, alias: str, version: str | None, client=None) -> None:
    """Put an alias back on `version`, or remove it when it pointed nowhere."""
    client = _client(client)
    if version is None:
        try:
            client.delete_registered_model_alias(name, alias)
        except Exception:  # noqa: BLE001  it may never have been set
            pass
    else:
        client.set_registered_model_alias(name, alias, version)


def promote(name: str, version: str, alias: str = "champion", *, reason: str, by: str | None = None,
            force: bool = False, client=None) -> Move:
    """`tunewright promote`: the checks, then the recorded move."""
    client = _client(client)
    check_version(name, version, client, force=force)
    if alias_holder(name, alias, client) == str(version):
        raise PromotionError(f"{name} version {version} already holds '{alias}'")
    return move_alias(name, alias, version, by=by, reason=("forced past the gate: " if force else "") + reason,
                      action="promote", client=client)


def rollback(name: str, alias: str = "champion", *, reason: str, to: str | None = None, by: str | None = None,
             client=None) -> Move:
    """`tunewright rollback`: move the alias back to the version that held it before (or to `to`)."""
    client = _client(client)
    current = alias_holder(name, alias, client)
    if to is None:
        past = history(name, alias, client)
        # the version the current holder replaced when it was promoted (rollbacks themselves are not undone)
        earlier = [e["previous"] for e in reversed(past)
                   if e["version"] == current and e.get("previous") and e.get("action") != "rollback"]
        if not earlier:
            raise PromotionError(f"{name}@{alias}: no earlier version in its history to roll back to "
                                 f"(it holds {current or 'nothing'}); name one with --to")
        to = earlier[0]
    if str(to) == current:
        raise PromotionError(f"{name} version {to} already holds '{alias}'")
    check_version(name, to, client, force=True)  # it held the alias before: its gate was passed or overridden then
    return move_alias(name, alias, str(to), by=by, reason=reason, action="rollback", client=client)
