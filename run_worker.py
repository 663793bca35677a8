"""Start an inference worker that takes images from the service's Redis (`--redis`):
`python run_worker.py --redis redis://HOST:6379/0`; `--help` lists the settings.

The same as the `ics-worker` console script (see `service.worker`; why this file
imports so little: `service.entry`)."""

from service.entry import worker

if __name__ == "__main__":
    worker()
