"""Uploaded image bytes held by the service, under one service-wide budget.

Every uploaded byte the service holds, from the moment it is read off the socket until its
image is queued for the model, counts against `--max-upload-bytes`: however many clients
upload at once, memory stays bounded. The API reserves bytes while it reads a form
(`service.api.forms`); a task's `TaskUploads` gives them back as its images are queued, or
all at once when the task ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UPLOAD_PREFIX = "upload:"  # an uploaded file's item has url `upload:<file name>`


class UploadBudget:
    """Bytes of uploaded images held by the whole service."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes

    @property
    def url(self) -> str:
        """What the task's item shows in place of a URL."""
        return UPLOAD_PREFIX + self.filename


class TaskUploads:
    """One task's uploaded images, by item index, until they are queued. Their bytes stay
    reserved in the budget until taken, or released all at once when the task ends."""

    def __init__(self, sources: Sequence[str | Upload], budget: UploadBudget) -> None:
        self._files = {index: source.data for index, source in enumerate(sources) if isinstance(source, Upload)}
        self._budget = budget

    def __contains__(self, index: int) -> bool:
        return index in self._files

    def take(self, index: int) -> bytes:
        data = self._files.pop(index)
        self._budget.release(len(data))
        return data

    def release(self) -> None:
        """Give back what was never taken (the task was cancelled or failed); idempotent."""
        self._budget.release(sum(len(data) for data in self._files.values()))
        self._files.clear()
