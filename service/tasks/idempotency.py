"""What an idempotency key remembers: the accepted submit it stands for, per API key, for
`--idempotency-ttl` seconds. A retried `POST /submit` with the same key gets that answer back
instead of creating a second task (`service.api.idempotency` does the HTTP side)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class IdempotencyKey:
    """A submit's `Idempotency-Key` header and the fingerprint of the request it came with."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Submission:
    """An accepted submit, as its idempotency key remembers it."""

    owner: str | None
    key: str
    fingerprint: str  # of the request: another request under the same key is refused
    task_id: str
    total: int
    created: float  # epoch seconds


class SubmissionKeys:
    """Keys in memory, oldest first: each is forgotten `ttl` seconds after it was used, and
    beyond `max_keys` the oldest go first (memory stays bounded whatever clients send)."""

    def __init__(self, ttl: float, max_keys: int, clock: Callable[[], float]) -> None:
        self._keys: dict[tuple[str | None, str], Submission] = {}
        self._ttl = ttl
        self._max_keys = max_keys
        self._clock = clock
        self.evicted = 0  # keys forgotten before their TTL, to keep within `max_keys`

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, owner: str | None, key: str) -> Submission | None:
        submission = self._keys.get((owner, key))
        if submission is None or submission.created <= self._clock() - self._ttl:
            return None
        return submission

    def add(
        self, owner: str | None, key: IdempotencyKey, task_id: str, total: int
    ) -> tuple[Submission, list[Submission]]:
        """Remember a new submission; it, and what had to be forgotten to make room."""
        submission = Submission(owner, key.key, key.fingerprint, task_id, total, self._clock())
        self._keys.pop((owner, key.key), None)  # an expired one with the same key: the new one is newest
        self._keys[(owner, key.key)] = submission
        forgotten = []
        while len(self._keys) > self._max_keys:
            forgotten.append(self._keys.pop(next(iter(self._keys))))
            self.evicted += 1
        return submission, forgotten

    def expire(self) -> list[Submission]:
        """Forget keys older than the TTL; those forgotten."""
        deadline = self._clock() - self._ttl
        forgotten = []
        while self._keys:
            oldest = next(iter(self._keys.values()))
            if oldest.created > deadline:
                break
            forgotten.append(self._keys.pop((oldest.owner, oldest.key)))
        return forgotten

    def drop_task(self, task_id: str) -> None:
        """Forget the key of a task whose creation was undone."""
        for name, submission in list(self._keys.items()):
            if submission.task_id == task_id:
                del self._keys[name]

    def restore(self, submissions: list[Submission]) -> None:
        """Take back keys kept elsewhere, oldest first."""
        for submission in sorted(submissions, key=lambda submission: submission.created):
            self._keys[(submission.owner, submission.key)] = submission
        self.expire()


class SubmissionExists(Exception):
    """The key was taken meanwhile (by a submit on another replica): answer as it did."""

    def __init__(self, submission: Submission) -> None:
        super().__init__(submission.key)
        self.submission = submission
