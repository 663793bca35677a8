"""Facts about declared models, and torchvision weights in the torch hub cache (imports torch).

Runs in worker processes (and in `run_service.py --prefetch`). Nothing here downloads
except `prefetch`: weights are looked up in the cache (`$TORCH_HOME/hub/checkpoints`), and
a file that is not there makes the model unavailable at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models
from torchvision.models import WeightsEnum, get_model_weights, list_models

from inference.specs import CatalogError, ModelInfo, ModelSpec, Preprocessing, local_info, torchvision_spec

log = logging.getLogger(__name__)


def classification_models() -> list[str]:
    return list[str](list_models(module=torchvision.models))  # classification only, not detection etc.


def weights_of(spec: ModelSpec) -> WeightsEnum:
    if spec.architecture not in classification_models():
        raise CatalogError(f"{spec.name!r}: torchvision has no classification model {spec.architecture!r}")
    enum = get_model_weights(spec.architecture)
    try:
        return enum[spec.weights]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(member.name for member in enum)])
        raise CatalogError(f"{spec.name!r}: weights must be one of {choices}, not {spec.weights!r}") from None


def cache_file(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (or would download) these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(str(weights.url)).path)


def model_info(spec: ModelSpec) -> ModelInfo:
    """Raises CatalogError for a declaration that can never work (unknown architecture...)."""
    if spec.source != "torchvision":
        return local_info(spec)
    weights = weights_of(spec)
    transform = weights.transforms()
    own = Preprocessing(
        input_size=transform.crop_size[0],
        resize_size=transform.resize_size[0],
        mean=transform.mean,
        std=transform.std,
    )
    return ModelInfo(
        spec,
        architecture=spec.architecture,
        preprocessing=spec.preprocessing or own,
        num_classes=len(weights.meta["categories"]),
        weights_path=str(cache_file(weights)),
    )


def discover_cached(declared: set[str]) -> list[ModelSpec]:
    """Torchvision weights already in the hub cache that nobody declared: those run too.

    Named `arch` for an architecture's DEFAULT weights, `arch:WEIGHTS` otherwise."""
    found = []
    for architecture in classification_models():
        enum = get_model_weights(architecture)
        for weights in enum:
            name = architecture if weights is enum["DEFAULT"] else f"{architecture}:{weights.name}"
            if name not in declared and cache_file(weights).is_file():
                found.append(torchvision_spec(name))
    return found


def prefetch(names: list[str]) -> None:
    """Download torchvision weights into the hub cache (the one command that downloads)."""
    for name in names:
        weights = weights_of(torchvision_spec(name))
        target = cache_file(weights)
        if target.is_file():
            log.info("%s: %s is already in the cache", name, target)
            continue
        log.info("%s: downloading %s to %s", name, weights.url, target)
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
