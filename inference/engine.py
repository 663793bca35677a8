"""The per-process classifier: a bounded LRU of loaded models and the batch forward pass."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from inference.models import LoadedModel, load_model
from inference.preprocess import ImageRejected, preprocess
from inference.protocol import Label, Outcome, Prediction, Rejection, WorkerConfig
from inference.specs import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class Engine:
    config: WorkerConfig
    models: OrderedDict[str, LoadedModel] = field(default_factory=OrderedDict)  # least recently used first
    startup_error: str = ""  # why the default model did not load, if it did not

    def model(self, spec: ModelSpec) -> LoadedModel:
        """Load on first use, then keep the `max_loaded_models` most recently used (the
        default model always among them); raises inference.protocol.ModelLoadError."""
        loaded = self.models.get(spec.name)
        if loaded is not None:
            self.models.move_to_end(spec.name)
            return loaded
        loaded = self.models[spec.name] = load_model(spec, self.config.runtime, self.config.threads)
        default = self.config.default_model.name
        while len(self.models) > max(self.config.max_loaded_models, 1 if spec.name == default else 2):
            evicted = next(name for name in self.models if name != default)
            del self.models[evicted]
            log.info("unloaded model %s (least recently used)", evicted)
        return loaded

    def classify(self, spec: ModelSpec, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """Decode, preprocess and classify `images` with one forward pass.

        An image that cannot be decoded becomes a Rejection in its slot and does not
        affect the others.
        """
        model = self.model(spec)
        outcomes: dict[int, Outcome] = {}
        tensors: dict[int, torch.Tensor] = {}
        for slot, data in enumerate(images):
            try:
                tensors[slot] = preprocess(data, model.info.preprocessing, model.transform, self.config.max_pixels)
            except ImageRejected as exc:
                outcomes[slot] = Rejection(exc.code, exc.message)
        if tensors:
            probabilities = model.run(torch.stack(list(tensors.values()))).softmax(dim=1)
            for slot, row in zip(tensors, probabilities, strict=True):
                scores, indices = row.topk(min(top_k[slot], row.numel()))
                outcomes[slot] = Prediction(
                    tuple(
                        Label(class_index=int(index), label=model.categories[int(index)], score=float(score))
                        for score, index in zip(scores, indices, strict=True)
                    )
                )
        return [outcomes[slot] for slot in range(len(images))]
