"""Scale-out through Redis: the job streams between web replicas and workers (`jobs`), and
the standalone worker process (`worker`, started by `run_worker.py`)."""
