"""Code that runs inside the inference worker processes.

The pool calls `init_worker` once per process (load the default model, set the thread
count) and then `classify_batch` per batch. Inputs and outputs are plain picklable data:
raw image bytes in, labels or per-image error codes out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from inference.models import LoadedModel, ModelLoadError, load_model
from inference.preprocess import ImageRejected, preprocess

# The per-process model cache: the only module-level mutable state in the project.
_loaded: dict[str, LoadedModel] = {}
_max_pixels: int = 0


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


def init_worker(default_model: str, threads: int, max_pixels: int) -> None:
    """Pool initializer: raise here and the pool is broken, which is what start-up wants."""
    global _max_pixels
    torch.set_num_threads(threads)
    _max_pixels = max_pixels
    _get_model(default_model)


def worker_info() -> tuple[int, tuple[str, ...]]:
    """(pid, loaded model names): lets the service check that workers came up."""
    return os.getpid(), tuple(_loaded)


def _get_model(name: str) -> LoadedModel:
    model = _loaded.get(name)
    if model is None:
        model = _loaded[name] = load_model(name)
    return model


def classify_batch(model_name: str, images: list[bytes], top_k: list[int]) -> list[Outcome]:
    """Decode, preprocess and classify `images` in one forward pass.

    Raises ModelLoadError when the model cannot be loaded; any image that cannot be
    decoded becomes a Rejection in its slot and does not affect the others.
    """
    model = _get_model(model_name)
    outcomes: list[Outcome | None] = [None] * len(images)
    tensors: list[torch.Tensor] = []
    slots: list[int] = []
    for slot, data in enumerate(images):
        try:
            tensors.append(preprocess(data, model.info, model.transform, _max_pixels))
            slots.append(slot)
        except ImageRejected as exc:
            outcomes[slot] = Rejection(exc.code, exc.message)
    if tensors:
        with torch.inference_mode():
            probabilities = model.module(torch.stack(tensors)).softmax(dim=1)
        for row, slot in zip(probabilities, slots):
            scores, indices = row.topk(top_k[slot])
            outcomes[slot] = Prediction(
                tuple(
                    Label(class_index=int(index), label=model.categories[int(index)], score=float(score))
                    for score, index in zip(scores, indices)
                )
            )
    return [outcome for outcome in outcomes if outcome is not None]
