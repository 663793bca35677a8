"""The per-process classifier: a cache of loaded models and the batch forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.models import LoadedModel, load_model
from inference.preprocess import ImageRejected, preprocess
from inference.protocol import Label, Outcome, Prediction, Rejection, WorkerConfig


@dataclass
class Engine:
    config: WorkerConfig
    models: dict[str, LoadedModel] = field(default_factory=dict)

    def model(self, name: str) -> LoadedModel:
        """Load on first use; raises inference.protocol.ModelLoadError."""
        loaded = self.models.get(name)
        if loaded is None:
            loaded = self.models[name] = load_model(name, self.config.runtime, self.config.threads)
        return loaded

    def classify(self, model_name: str, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """Decode, preprocess and classify `images` with one forward pass.

        An image that cannot be decoded becomes a Rejection in its slot and does not
        affect the others.
        """
        model = self.model(model_name)
        outcomes: dict[int, Outcome] = {}
        tensors: dict[int, torch.Tensor] = {}
        for slot, data in enumerate(images):
            try:
                tensors[slot] = preprocess(data, model.info, model.transform, self.config.max_pixels)
            except ImageRejected as exc:
                outcomes[slot] = Rejection(exc.code, exc.message)
        if tensors:
            probabilities = model.run(torch.stack(list(tensors.values()))).softmax(dim=1)
            for slot, row in zip(tensors, probabilities, strict=True):
                scores, indices = row.topk(top_k[slot])
                outcomes[slot] = Prediction(
                    tuple(
                        Label(class_index=int(index), label=model.categories[int(index)], score=float(score))
                        for score, index in zip(scores, indices, strict=True)
                    )
                )
        return [outcomes[slot] for slot in range(len(images))]
