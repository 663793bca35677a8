"""Write (or, with --check, verify) requirements.txt and requirements-dev.txt from pyproject.toml.

    python3 tools/requirements.py            # regenerate after changing a pin in pyproject.toml
    python3 tools/requirements.py --check    # exit 1 if either file is out of date

pyproject.toml is the one place where pins are edited; the two files are the pinned lists the
README, the Dockerfile and CI install from, so they cannot drift from it.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# Generated from pyproject.toml by `python3 tools/requirements.py`; edit the pins there.\n"


def rendered() -> dict[Path, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = HEADER + "# What the service and the client need to run (the Docker image installs only this file).\n"
    runtime += "".join(f"{requirement}\n" for requirement in [*project["dependencies"], *extras["server"]])
    dev = HEADER + "# Everything for development, tests and CI: the service, the client, then the tools.\n"
    dev += "-r requirements.txt\n" + "".join(f"{requirement}\n" for requirement in extras["dev"])
    return {ROOT / "requirements.txt": runtime, ROOT / "requirements-dev.txt": dev}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a file is out of date")
    args = parser.parse_args()
    stale = [path for path, text in rendered().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.name} is out of date with pyproject.toml: run python3 tools/requirements.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in rendered().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
