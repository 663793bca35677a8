"""The models this service offers, as the web process sees them (no torch here).

Built at start-up from what `service.pool.process.describe_models` found out about the
declared models and the torch hub cache. Whether a model's weights are on disk is checked on every question, so a model
prefetched while the service runs becomes available without a restart. What an int8
model's calibration measured is added when it is known (`service.pool.factory.prepare_models`).
"""

from __future__ import annotations

from inference.int8_cache import Calibration
from inference.specs import ModelInfo


class ModelCatalog:
    def __init__(self, infos: list[ModelInfo], default: str) -> None:
        self._infos = {info.name: info for info in infos}
        self._calibrations: dict[str, Calibration] = {}
        self.default = default

    def get(self, name: str) -> ModelInfo | None:
        return self._infos.get(name)

    def info(self, name: str) -> ModelInfo:
        return self._infos[name]

    def available(self) -> list[str]:
        return [name for name, info in self._infos.items() if info.weights_present()]

    def infos(self) -> list[ModelInfo]:
        return list(self._infos.values())

    def calibration(self, name: str) -> Calibration | None:
        return self._calibrations.get(name)

    def calibrated(self, name: str, calibration: Calibration) -> None:
        self._calibrations[name] = calibration
