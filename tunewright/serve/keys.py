"""Who may call a server: its API keys, from the environment or a file only its owner can read, and the refusal to
listen beyond this machine without any."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

API_KEYS_ENV = "TUNEWRIGHT_API_KEYS"


def api_keys(key_file: Path | None = None) -> list[str]:
    """The keys in `TUNEWRIGHT_API_KEYS` (comma-separated) and in `key_file` (one per line, `#` comments), which
    must not be readable by anyone but its owner (as ssh asks of a private key)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"--api-key-file {path}: {exc.strerror or exc}") from None
        if mode & 0o077:
            raise ValueError(f"--api-key-file {path} can be read by others (mode {mode:04o}): `chmod 600 {path}`")
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"--api-key-file {path} holds no key (one per line)")
        keys += found
    return keys


def loopback(host: str) -> bool:
    """Whether `host` only listens for this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, keys: list[str], insecure: bool) -> None:
    """Refuse to listen beyond this machine with no API key, unless asked to with `--insecure`."""
    if not keys and not insecure and not loopback(host):
        raise ValueError(f"--host {host} listens beyond this machine and the server has no API key: anyone who can "
                         f"reach it could use the models. Give keys (--api-key-file, or {API_KEYS_ENV}), or pass "
                         "--insecure to serve openly on a network you trust")
