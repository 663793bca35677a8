"""What models exist, described without importing torch.

The web process validates `model` names and reports model facts from here; only worker
processes import `inference.models`, which pulls in torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str  # "embedded", later also "torchvision" or "checkpoint"
    architecture: str
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int


DEFAULT_MODEL = "efficientnet_lite0"

# Execution engines for the same weights (inference.runtimes builds them).
RUNTIMES = ("onnx", "eager", "channels_last", "torchscript", "compile")
DEFAULT_RUNTIME = "onnx"

# TF-Lite's EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
_TFLITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
_TFLITE_STD = (128 / 255, 128 / 255, 128 / 255)

MODELS: dict[str, ModelInfo] = {
    DEFAULT_MODEL: ModelInfo(
        name=DEFAULT_MODEL,
        source="embedded",
        architecture="efficientnet-lite0",
        input_size=224,
        resize_size=256,
        mean=_TFLITE_MEAN,
        std=_TFLITE_STD,
        num_classes=1000,
    ),
}
