"""The inference pool: where batches of image bytes become labels.

`InferencePool` is what the task engine sees; `service.pool.process` runs the workers in local
processes. Errors a pool raises are its own (below), so callers never depend on how it runs.
"""

from __future__ import annotations

from typing import Protocol

from inference.protocol import Outcome
from inference.specs import ModelInfo


class DefaultModelError(RuntimeError):
    """The workers started but the default model did not load in them."""


class WorkerCrashed(Exception):
    """A worker died during the batch; the pool gets fresh workers for the next one."""


class InferenceTimeout(Exception):
    """A batch ran longer than the batch timeout; its workers were recycled."""


class InferencePool(Protocol):
    @property
    def restarts(self) -> int:
        """Times the workers were replaced."""
        ...

    @property
    def model_loads(self) -> int:
        """Models the workers have loaded, the replaced ones' included."""
        ...

    def check_ready(self) -> bool:
        """Every worker is up with the default model loaded (no side effects)."""
        ...

    async def classify(self, model: ModelInfo, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """One forward pass. Raises inference.protocol.ModelLoadError if `model` cannot load,
        WorkerCrashed if a worker died, and InferenceTimeout if the batch overran."""
        ...
