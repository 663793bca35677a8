"""Byte counts as people read them in error messages: `20 MiB` rather than `20971520`."""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB


def readable(size: int) -> str:
    """`20 MiB`, `1.5 MiB`, `900 KiB`, `512 bytes` (the limits are binary multiples)."""
    if size >= MIB:
        return f"{size / MIB:.4g} MiB"
    if size >= KIB:
        return f"{size / KIB:.4g} KiB"
    return f"{size} bytes"
