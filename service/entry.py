"""What the launchers call: `run_service.py`, `run_worker.py` and the console scripts
`ics-service` and `ics-worker`.

They import the service only when called. multiprocessing's spawn runs the launching script
again in every worker process (as `__mp_main__`), so whatever the script imports at its top,
each worker imports too: with `service.main` that was the whole web stack, 0.7 s of each
worker's start and about 40 MiB of its memory, for nothing.

`--version` is answered here, and a client-only install (`pip install .` without the
`server` extra) gets one line saying what to install rather than a traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import NoReturn

from client import __version__

INSTALL_SERVER = "pip install 'image-classification-service[server]' (in a checkout: pip install -r requirements.txt)"


def service() -> None:
    _run("service.main")


def worker() -> None:
    _run("service.worker")


def _run(module: str) -> None:
    """`module.main(program)`, or one line saying what to install if its imports are missing."""
    program = _program()
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        _missing(program, exc)
    main(program)


def _program() -> str:
    """The name the user typed (`ics-service`, `run_service.py`), for `--help` and errors."""
    program = Path(sys.argv[0]).name
    if "--version" in sys.argv[1:]:
        print(f"{program} {__version__}")
        raise SystemExit(0)
    return program


def _missing(program: str, exc: ModuleNotFoundError) -> NoReturn:
    print(
        f"{program}: the service's dependencies are not installed ({exc.name} is missing): {INSTALL_SERVER}",
        file=sys.stderr,
    )
    raise SystemExit(1)
