"""Shared memory that killed processes leave behind, removed when a pool starts.

A `kill -9` (or the OOM killer) of a service or worker leaves in `/dev/shm` its batch
directory (`service.pool.handover`) and the named semaphores of Python's multiprocessing
(`sem.mp-*`: the spawn context names them so that children can open them; the resource
tracker that would unlink them dies in the same kill). Nothing else removes them, so they
piled up restart after restart (a probe counted 203). What a live process uses stays: a
batch directory whose lock is held, and a semaphore that any live process has mapped (its
creator maps it before it has its name, so none is ever live and unmapped); and only this
user's files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from service.pool.handover import SHARED_MEMORY, remove_orphans

log = logging.getLogger(__name__)

SEMAPHORES = "sem.mp-*"  # multiprocessing's named semaphores, /dev/shm/sem.mp-<random>
SETTLE_SECONDS = 10.0  # a batch directory without its lock yet is left alone this long


def remove_leftovers(root: Path = SHARED_MEMORY) -> None:
    """Remove the batch directories and semaphores of processes that are gone; log how many."""
    if not root.is_dir():
        return
    directories = remove_orphans(root, SETTLE_SECONDS)
    semaphores = remove_orphan_semaphores(root)
    if directories or semaphores:
        log.info(
            "removed from %s what killed processes left: %d batch directories, %d semaphores",
            root,
            directories,
            semaphores,
        )


def remove_orphan_semaphores(root: Path) -> int:
    """Semaphores of this user that no live process has mapped. Returns how many went."""
    uid = os.getuid()
    candidates = {}
    for path in root.glob(SEMAPHORES):  # listed before the processes are read: a newer one is not judged
        try:
            status = path.stat()
        except FileNotFoundError:
            continue
        if status.st_uid == uid:
            candidates[path] = (status.st_dev, status.st_ino)
    if not candidates:
        return 0
    mapped = mapped_files()
    removed = 0
    for path, identity in candidates.items():
        if identity not in mapped:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
    return removed


def mapped_files() -> set[tuple[int, int]]:
    """(device, inode) of every file that a live process has mapped: by inode, since glibc
    maps a semaphore under a temporary name before it links it to its own. Processes that
    cannot be read are passed over: a Python process of this user can always be (it is
    dumpable); one that cannot (another user's, PID 1 of a sandbox) holds no semaphore of
    this user's."""
    mapped: set[tuple[int, int]] = set()
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            text = (process / "maps").read_text()
        except OSError:  # ended meanwhile, or not to be read
            continue
        for line in text.splitlines():
            _, _, _, device, inode, *_ = line.split(maxsplit=5)
            if inode != "0":
                major, minor = device.split(":")
                mapped.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
    return mapped
