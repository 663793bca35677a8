"""What killed processes leave in /dev/shm goes when a pool starts (issue 34, item 6): named
semaphores nobody has mapped any more and batch directories nobody holds; never what a live
process uses. Semaphores are real ones, made with the C library's `sem_open` as
multiprocessing does, in `/dev/shm`."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from service.pool.handover import LOCK, PREFIX, SHARED_MEMORY
from service.pool.leftovers import SETTLE_SECONDS, remove_leftovers

pytestmark = pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="no /dev/shm here")

O_CREAT = 0o100
SEM_FAILED = ctypes.c_void_p(0).value


def libc() -> ctypes.CDLL:
    library = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    library.sem_open.restype = ctypes.c_void_p
    library.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
    library.sem_close.argtypes = [ctypes.c_void_p]
    return library


def semaphore_name() -> str:
    return f"/mp-icstest{uuid.uuid4().hex[:8]}"  # as multiprocessing names them: /dev/shm/sem.mp-...


def test_semaphores_of_killed_processes_go_and_live_ones_stay(tmp_path: Path) -> None:
    orphan, live = semaphore_name(), semaphore_name()
    # A process that makes a semaphore and is killed with -9 (its resource tracker with it).
    script = (
        "import ctypes, ctypes.util, os, signal\n"
        "c = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "c.sem_open.restype = ctypes.c_void_p\n"
        f"assert c.sem_open({orphan.encode()!r}, {O_CREAT}, 0o600, 1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    assert (SHARED_MEMORY / f"sem.{orphan[1:]}").exists()
    c = libc()
    handle = c.sem_open(live.encode(), O_CREAT, 0o600, 1)  # this live process keeps it mapped
    assert handle not in (None, SEM_FAILED), os.strerror(ctypes.get_errno())
    try:
        remove_leftovers()
        assert not (SHARED_MEMORY / f"sem.{orphan[1:]}").exists()
        assert (SHARED_MEMORY / f"sem.{live[1:]}").exists()
    finally:
        c.sem_close(handle)
        c.sem_unlink(live.encode())


def test_batch_directories_without_a_holder_go_and_held_or_young_ones_stay(tmp_path: Path) -> None:
    released = tmp_path / f"{PREFIX}released"
    released.mkdir()
    (released / LOCK).touch()  # nobody holds its lock: its process is gone
    lockless = tmp_path / f"{PREFIX}lockless"
    lockless.mkdir()  # killed between making the directory and its lock
    old = time.time() - SETTLE_SECONDS - 1
    os.utime(lockless, (old, old))
    young = tmp_path / f"{PREFIX}young"
    young.mkdir()  # maybe being set up right now
    remove_leftovers(tmp_path)
    assert not released.exists() and not lockless.exists()
    assert young.exists()
