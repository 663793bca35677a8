"""Code that runs inside the inference worker processes.

The pool calls `init_worker` once per process (set the thread count, load the default
model) and then `classify_batch` per batch. Inputs and outputs are plain picklable data:
raw image bytes in, labels or per-image error codes out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from inference.models import LoadedModel, load_model
from inference.preprocess import ImageRejected, preprocess


@dataclass(frozen=True)
class WorkerConfig:
    default_model: str
    runtime: str
    threads: int
    max_pixels: int


@dataclass(frozen=True)
class Label:
    class_index: int
    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    labels: tuple[Label, ...]


@dataclass(frozen=True)
class Rejection:
    code: str
    message: str


Outcome = Prediction | Rejection


@dataclass
class _WorkerState:
    config: WorkerConfig
    models: dict[str, LoadedModel] = field(default_factory=dict)

    def model(self, name: str) -> LoadedModel:
        """Load on first use; raises inference.models.ModelLoadError."""
        loaded = self.models.get(name)
        if loaded is None:
            loaded = self.models[name] = load_model(name, self.config.runtime, self.config.threads)
        return loaded


# The per-process model cache: the only module-level mutable state in the project.
_state: _WorkerState | None = None


def init_worker(config: WorkerConfig) -> None:
    """Pool initializer: raise here and the pool is broken, which is what start-up wants."""
    global _state
    torch.set_num_threads(config.threads)
    _state = _WorkerState(config)
    _state.model(config.default_model)


def worker_info() -> tuple[int, tuple[str, ...]]:
    """(pid, loaded model names): lets the service check that workers came up."""
    return os.getpid(), tuple(_current().models)


def _current() -> _WorkerState:
    if _state is None:
        raise RuntimeError("init_worker() has not run in this process")
    return _state


def classify_batch(model_name: str, images: list[bytes], top_k: list[int]) -> list[Outcome]:
    """Decode, preprocess and classify `images` with one forward pass.

    Raises ModelLoadError when the model cannot be loaded. An image that cannot be decoded
    becomes a Rejection in its slot and does not affect the others.
    """
    state = _current()
    model = state.model(model_name)
    outcomes: dict[int, Outcome] = {}
    tensors: dict[int, torch.Tensor] = {}
    for slot, data in enumerate(images):
        try:
            tensors[slot] = preprocess(data, model.info, model.transform, state.config.max_pixels)
        except ImageRejected as exc:
            outcomes[slot] = Rejection(exc.code, exc.message)
    if tensors:
        probabilities = model.run(torch.stack(list(tensors.values()))).softmax(dim=1)
        for slot, row in zip(tensors, probabilities):
            scores, indices = row.topk(top_k[slot])
            outcomes[slot] = Prediction(
                tuple(
                    Label(class_index=int(index), label=model.categories[int(index)], score=float(score))
                    for score, index in zip(scores, indices)
                )
            )
    return [outcomes[slot] for slot in range(len(images))]
