"""Worker processes end with the web process, however it ended, say that they are alive, and
count the models they load.

A `kill -9` of the web process used to leave its workers (hundreds of MB each) running under
PID 1 for good, and a restart started more beside them. Linux's parent-death signal kills a
child when the thread that started it goes; the check after it closes the window in which
the parent died before the signal was armed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from multiprocessing.context import BaseContext

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when `parent_pid` (this process's parent) ends; exit now if it already has."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


HEARTBEAT_SECONDS = 0.5  # how often a worker says it is alive


class Heartbeat:
    """Shared memory in which each worker of one pool writes, every HEARTBEAT_SECONDS, that it
    is alive, from a thread of its own: a worker that is stopped (SIGSTOP) or otherwise
    frozen falls silent, which the pool sees, even while idle. Each worker also counts there
    the models it loads, for the pool's metrics. Made by the pool, handed to its workers as
    they start."""

    def __init__(self, workers: int, context: BaseContext) -> None:
        self._pids = context.Array("i", workers)  # slot -> the pid of the worker writing there
        self._beats = context.Array("d", workers)  # slot -> its last beat, time.monotonic()
        self._taken = context.Value("i", 0)
        self._loads = context.Value("i", 0)  # models loaded by the workers, all together

    def start(self) -> None:
        """In a worker: take a slot and beat until the process ends."""
        with self._taken.get_lock():
            slot = self._taken.value
            self._taken.value += 1
        self._pids[slot] = os.getpid()
        self._beats[slot] = time.monotonic()
        threading.Thread(target=self._beat, args=(slot,), name="heartbeat", daemon=True).start()

    def _beat(self, slot: int) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            self._beats[slot] = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process

    def silent(self, longer_than: float) -> list[int]:
        """In the pool: pids of workers that have not beaten for `longer_than` seconds."""
        now = time.monotonic()
        taken = min(self._taken.value, len(self._pids))
        return [self._pids[slot] for slot in range(taken) if now - self._beats[slot] > longer_than]

    def model_loaded(self) -> None:
        """In a worker: one more model loaded."""
        with self._loads.get_lock():
            self._loads.value += 1

    @property
    def model_loads(self) -> int:
        """In the pool: the models its workers have loaded so far."""
        return int(self._loads.value)
