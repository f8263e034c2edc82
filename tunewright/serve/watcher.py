"""Follow registry aliases: when `models:/NAME@champion` moves, serve the new version.

Every `interval` seconds the watcher asks the registry which version each served alias points at. When
one has moved, it downloads the new version's adapter, loads it beside the running one, and swaps it in
(`Engine.swap`): requests already running finish on the old version, new ones go to the new version.
A version that fails to load is logged and the old one keeps serving. A challenger whose alias was removed (its
canary was decided) is retired: the share of traffic it answered goes back to its champion; a challenger registered
after the server started is loaded when its alias appears.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from tunewright.serve.engine import Engine, ServedModel

log = logging.getLogger("tunewright.serve")


class RegistryWatcher:
    """Poll the aliases served models were loaded by; swap in what they point at now."""

    def __init__(self, engine: Engine, aliases: dict[str, str], load: Callable[[ServedModel], object], cache: Path,
                 interval: float = 30.0):
        self.engine = engine
        self.aliases = dict(aliases)  # served name -> models:/NAME@ALIAS
        self.load = load
        self.cache = cache
        self.interval = interval
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)

    def start(self) -> "RegistryWatcher":
        if self.aliases:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001  keep watching (and keep the engines this thread started)
                log.error("registry watcher: %s", exc)

    def check(self) -> list[str]:
        """Swap every served alias that moved; the names swapped."""
        from tunewright.registry.adapters import fetch, registered_version

        swapped = []
        for name, ref in self.aliases.items():
            current = self.engine.backends.get(name)
            try:
                mv = registered_version(ref)
            except Exception as exc:  # the registry is down or the alias was removed: keep serving
                removed = name in self._routed() and _alias_removed(ref)  # a challenger decided, or none yet
                if removed and current is not None:
                    self.engine.retire(name)
                    log.info("%s: the alias was removed; its traffic goes back to the alias it answered for", ref)
                elif not removed:
                    log.warning("registry watcher: %s: %s", ref, exc)
                continue
            if current is not None and current.served.source and current.served.source.version == str(mv.version):
                continue
            try:
                source = fetch(ref, self.cache, log, what=f"serve {ref}", whole_ok=True)
                backend = self.load(ServedModel(name, source))
            except Exception as exc:
                log.error("registry watcher: %s moved to version %s, which failed to load (still serving %s): %s",
                          ref, mv.version, current.served.source.version if current and current.served.source
                          else "nothing", exc)
                continue
            self.engine.swap(name, backend)
            self.swaps += 1
            swapped.append(name)
            log.info("%s now serves %s version %s (%s)", name, mv.name, mv.version, ref)
        return swapped

    def _routed(self) -> set[str]:
        """The served names that answer for another (a challenger's share, or its shadow copies)."""
        return {target for target, _share in self.engine.challenger.values()} | set(self.engine.shadow.values())


def _alias_removed(ref: str) -> bool:
    """Whether the registry answers and the registered model no longer has the alias (not merely unreachable)."""
    from mlflow import MlflowClient

    from tunewright.registry.adapters import registered_reference

    name, _version, alias = registered_reference(ref)
    try:
        return bool(alias) and alias not in (MlflowClient().get_registered_model(name).aliases or {})
    except Exception:  # noqa: BLE001  unreachable, or the model is gone: nothing to conclude
        return False
