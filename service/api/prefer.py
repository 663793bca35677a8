"""`Prefer: wait=N` (RFC 7240; Replicate's convention for a synchronous answer): a submit
that asks for it is answered with the finished task if it ends within N seconds.

Preferences are hints, so a malformed one is ignored rather than refused, as the RFC asks;
the `Preference-Applied` header of the answer says when the wait was honoured, and for how
long (a wait above `--max-wait` is shortened to it).
"""

from __future__ import annotations

from collections.abc import Iterable

PREFER = "Prefer"
APPLIED = "Preference-Applied"


def wait_preference(headers: Iterable[str], max_wait: float) -> int | None:
    """The seconds to wait (at most `max_wait`), or None: no `wait` preference, a malformed
    one, `wait=0`, or a service with `--max-wait 0`."""
    for header in headers:
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].partition("=")
            if name.strip().lower() != "wait":
                continue
            value = value.strip().strip('"')
            if not value.isascii() or not value.isdigit():
                return None
            seconds = min(int(value), int(max_wait))
            return seconds or None
    return None


def applied(seconds: int) -> dict[str, str]:
    return {APPLIED: f"wait={seconds}"}
