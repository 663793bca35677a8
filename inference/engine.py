"""The per-process classifier: a bounded LRU of loaded models and the batch forward pass."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from inference.int8_cache import PHOTOS_DIR
from inference.models import LoadedModel, load_model, softmax
from inference.preprocess import ImageRejected, preprocess
from inference.protocol import Label, Outcome, Prediction, Rejection, WorkerConfig
from inference.specs import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class Engine:
    config: WorkerConfig
    models: OrderedDict[str, LoadedModel] = field(default_factory=OrderedDict)  # least recently used first
    startup_error: str = ""  # why the default model did not load, if it did not
    on_load: Callable[[], None] | None = None  # told of each model loaded (the pool counts them)

    def model(self, info: ModelInfo) -> LoadedModel:
        """Load on first use, then keep the `max_loaded_models` most recently used (the
        default model always among them); raises inference.protocol.ModelLoadError."""
        loaded = self.models.get(info.name)
        if loaded is not None:
            self.models.move_to_end(info.name)
            return loaded
        config = self.config
        loaded = self.models[info.name] = load_model(
            info,
            config.runtime,
            config.threads,
            config.model_cache_dir,
            config.batch_size,
            config.refine_margin,
            config.calibration_dir,
        )
        if self.on_load is not None:
            self.on_load()
        default = config.default_model.name
        while len(self.models) > max(config.max_loaded_models, 1 if info.name == default else 2):
            evicted = next(name for name in self.models if name != default)
            del self.models[evicted]
            log.info("unloaded model %s (least recently used)", evicted)
        return loaded

    def warm_up(self) -> None:
        """Decode and resize a few shipped photos once: the first images a worker decodes
        otherwise pay for allocations and code paths met for the first time."""
        preprocessing = self.config.default_model.preprocessing
        for path in sorted(PHOTOS_DIR.glob("*.jpg"))[:4]:
            preprocess(path.read_bytes(), preprocessing, self.config.max_pixels)

    def classify(self, info: ModelInfo, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """Decode, preprocess and classify `images`, in forward passes of the configured
        `batch_size` (`LoadedModel.forward`; the service hands over two passes' worth).

        An image that cannot be decoded becomes a Rejection in its slot and does not
        affect the others.
        """
        model = self.model(info)
        outcomes: dict[int, Outcome] = {}
        inputs: dict[int, np.ndarray] = {}
        for slot, data in enumerate(images):
            try:
                inputs[slot] = preprocess(data, model.info.preprocessing, self.config.max_pixels)
            except ImageRejected as exc:
                outcomes[slot] = Rejection(exc.code, exc.message)
        if inputs:
            logits, again = model.forward(np.stack(list(inputs.values())))
            refined = set(again.tolist())
            for position, (slot, row) in enumerate(zip(inputs, softmax(logits), strict=True)):
                best = np.argsort(row)[::-1][: top_k[slot]]
                outcomes[slot] = Prediction(
                    tuple(
                        Label(class_index=int(index), label=model.categories[index], score=float(row[index]))
                        for index in best
                    ),
                    refined=position in refined,
                )
        return [outcomes[slot] for slot in range(len(images))]
