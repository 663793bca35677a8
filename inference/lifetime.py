"""Processes the service starts end with the process that started them, however it ended.

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

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when `parent_pid` (this process's parent) ends; exit now if it already has."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)
