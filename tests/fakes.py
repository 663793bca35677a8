"""Fakes of the task engine's interfaces, for fast unit tests without worker processes."""

from __future__ import annotations

import asyncio

from inference.protocol import Label, Outcome, Prediction, Rejection
from inference.specs import ModelInfo, ModelSpec, Preprocessing
from service.pool import InferencePool

LABEL_PREFIX = b"label:"


def image(label: str) -> bytes:
    """Bytes the fake pool classifies as `label`."""
    return LABEL_PREFIX + label.encode()


def infos(specs: list[ModelSpec]) -> list[ModelInfo]:
    """What the catalog would know of `specs`, without asking a worker process."""
    return [ModelInfo(spec, spec.architecture or "fake", Preprocessing(), 1000, "") for spec in specs]


class FakePool(InferencePool):
    """An inference pool without processes. An image whose bytes are `image(label)` gets that
    label (score 0.9); other bytes are rejected as `not_an_image`. `failures` are raised by the
    next calls, one each, in order; while `hold` is cleared, batches wait. A model "loads" the
    first time it is asked for."""

    def __init__(self) -> None:
        self._restarts = 0
        self.batches: list[list[bytes]] = []
        self.models: set[str] = set()  # those asked for so far
        self.failures: list[Exception] = []
        self.hold = asyncio.Event()
        self.hold.set()

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def model_loads(self) -> int:
        return len(self.models)

    def check_ready(self) -> bool:
        return True

    async def classify(self, model: ModelInfo, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        self.batches.append(images)
        self.models.add(model.name)
        await self.hold.wait()
        if self.failures:
            raise self.failures.pop(0)
        return [_outcome(data, k) for data, k in zip(images, top_k, strict=True)]


def _outcome(data: bytes, top_k: int) -> Outcome:
    if not data.startswith(LABEL_PREFIX):
        return Rejection("not_an_image", "the body is not a recognised image format")
    label = data.removeprefix(LABEL_PREFIX).decode()
    return Prediction(tuple(Label(label=label, class_index=index, score=0.9 / (index + 1)) for index in range(top_k)))
