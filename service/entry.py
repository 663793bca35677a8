"""What the launchers call: `run_service.py`, `run_worker.py` and the console scripts
`ics-service` and `ics-worker`.

They import the service only when called. multiprocessing's spawn runs the launching script
again in every worker process (as `__mp_main__`), so whatever the script imports at its top,
each worker imports too: with `service.main` that was the whole web stack, 0.7 s of each
worker's start and about 40 MiB of its memory, for nothing.
"""

from __future__ import annotations


def service() -> None:
    from service.main import main

    main()


def worker() -> None:
    from service.worker import main

    main()
