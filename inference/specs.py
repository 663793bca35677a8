"""Which models the operator offers, as plain data: parsed without importing torch.

A `ModelSpec` is what the operator declared (a torchvision name, a checkpoint file, or the
embedded default). Worker processes turn specs into `ModelInfo` facts (`inference.zoo`) and
into runnable models (`inference.models`); the web process only reads and forwards specs.

Declarations come from `--models` (torchvision names, comma-separated) and `--models-file`
(a TOML file, see README "Adding a model").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

DEFAULT_MODEL = "efficientnet_lite0"

# Execution engines for nn.Module models (inference.runtimes builds them).
Runtime = Literal["onnx", "eager", "channels_last", "torchscript", "compile"]
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
DEFAULT_RUNTIME: Runtime = "onnx"

CHECKPOINT_FORMATS = ("state_dict", "torchscript", "export")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite's EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
_TFLITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
_TFLITE_STD = (128 / 255, 128 / 255, 128 / 255)


class CatalogError(ValueError):
    """A model declaration is malformed (reported at start-up)."""


@dataclass(frozen=True)
class Preprocessing:
    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ModelSpec:
    """One declared model.

    - embedded: the shipped EfficientNet-Lite0.
    - torchvision: `architecture` from torchvision's zoo with the weights enum `weights`
      ("DEFAULT", "IMAGENET1K_V2", ...), read from the torch hub cache only.
    - checkpoint: the file `path`, a `state_dict` for the torchvision `architecture`, or a
      whole `torchscript` / `export` (torch.export) model; `labels` names its classes.
    """

    name: str
    source: str
    architecture: str = ""
    weights: str = ""
    path: str = ""
    format: str = ""
    labels: str = ""
    preprocessing: Preprocessing | None = None  # None: the weights' own (torchvision) or the defaults


@dataclass(frozen=True)
class ModelInfo:
    """What a worker found out about a spec; `weights_path` is the file that must exist."""

    spec: ModelSpec
    architecture: str
    preprocessing: Preprocessing
    num_classes: int
    weights_path: str  # "" for the embedded model, whose weights ship in a package

    @property
    def name(self) -> str:
        return self.spec.name

    def weights_present(self) -> bool:
        return not self.weights_path or Path(self.weights_path).is_file()


EMBEDDED = ModelSpec(
    name=DEFAULT_MODEL,
    source="embedded",
    architecture="efficientnet-lite0",
    preprocessing=Preprocessing(224, 256, _TFLITE_MEAN, _TFLITE_STD),
)


def torchvision_spec(name: str) -> ModelSpec:
    """`resnet50` (its DEFAULT weights) or `mobilenet_v3_large:IMAGENET1K_V2`."""
    architecture, _, weights = name.strip().partition(":")
    if not architecture:
        raise CatalogError(f"empty torchvision model name in {name!r}")
    return ModelSpec(name=name.strip(), source="torchvision", architecture=architecture, weights=weights or "DEFAULT")


def declared_specs(models: str, models_file: str) -> list[ModelSpec]:
    """The embedded model, then `--models`, then the models file; names must be unique."""
    specs = [EMBEDDED]
    specs += [torchvision_spec(name) for name in models.split(",") if name.strip()]
    if models_file:
        specs += _specs_from_file(Path(models_file))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CatalogError(f"model {spec.name!r} is declared twice")
        seen.add(spec.name)
    return specs


def _specs_from_file(path: Path) -> list[ModelSpec]:
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read the models file {path}: {exc}") from exc
    table = document.get("models", {})
    if not isinstance(table, dict):
        raise CatalogError(f"{path}: [models] must be a table of model tables")
    return [_spec_from_table(name, entry, path.parent) for name, entry in table.items()]


def _spec_from_table(name: str, entry: Any, base: Path) -> ModelSpec:
    if not isinstance(entry, dict):
        raise CatalogError(f"models.{name} must be a table")
    known = {
        "source",
        "architecture",
        "weights",
        "path",
        "format",
        "labels",
        "input_size",
        "resize_size",
        "mean",
        "std",
    }
    unknown = sorted(set(entry) - known)
    if unknown:
        raise CatalogError(f"models.{name}: unknown keys {', '.join(unknown)}")
    source = entry.get("source", "checkpoint")
    preprocessing = _preprocessing(name, entry)
    if source == "torchvision":
        spec = torchvision_spec(f"{entry.get('architecture', '')}:{entry.get('weights', 'DEFAULT')}")
        return replace(spec, name=name, preprocessing=preprocessing)
    if source != "checkpoint":
        raise CatalogError(f"models.{name}: source must be torchvision or checkpoint, not {source!r}")
    architecture = str(entry.get("architecture", ""))
    form = entry.get("format", "state_dict" if architecture else "")
    if not form:
        raise CatalogError(
            f"models.{name}: a checkpoint needs `format` (torchscript, export), or the "
            "torchvision `architecture` its state_dict belongs to"
        )
    if form not in CHECKPOINT_FORMATS:
        raise CatalogError(f"models.{name}: format must be one of {', '.join(CHECKPOINT_FORMATS)}")
    if form == "state_dict" and not architecture:
        raise CatalogError(f"models.{name}: a state_dict needs the torchvision architecture it belongs to")
    for key in ("path", "labels"):
        if not entry.get(key):
            raise CatalogError(f"models.{name}: `{key}` is required for a checkpoint")
    labels = base / entry["labels"]
    if not labels.is_file():
        raise CatalogError(f"models.{name}: labels file {labels} does not exist")
    return ModelSpec(
        name=name,
        source="checkpoint",
        architecture=architecture,
        path=str(base / entry["path"]),
        format=form,
        labels=str(labels),
        preprocessing=preprocessing or Preprocessing(),
    )


def _preprocessing(name: str, entry: dict[str, Any]) -> Preprocessing | None:
    keys = ("input_size", "resize_size", "mean", "std")
    if not any(key in entry for key in keys):
        return None
    defaults = Preprocessing()
    try:
        input_size = int(entry.get("input_size", defaults.input_size))
        resize_size = int(entry.get("resize_size", round(input_size * 256 / 224)))
        mean = _triple(entry.get("mean", defaults.mean))
        std = _triple(entry.get("std", defaults.std))
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"models.{name}: bad preprocessing setting: {exc}") from exc
    if mean is None or std is None or min(std) <= 0 or input_size < 1 or resize_size < input_size:
        raise CatalogError(f"models.{name}: mean/std need 3 values (std > 0), resize_size >= input_size >= 1")
    return Preprocessing(input_size, resize_size, mean, std)


def _triple(values: Any) -> tuple[float, float, float] | None:
    """Three floats (one per RGB channel), or None if there are not three."""
    numbers = [float(value) for value in values]
    return (numbers[0], numbers[1], numbers[2]) if len(numbers) == 3 else None


def read_labels(path: str) -> tuple[str, ...]:
    """One label per line; blank lines at the end are ignored."""
    return tuple(Path(path).read_text().rstrip("\n").split("\n"))
