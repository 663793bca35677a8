"""Load a model ready to run (in worker processes): from the ONNX cache without torch, or as
a torch module for the torch runtimes and TorchScript / torch.export files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference import int8_cache, onnx_cache
from inference.onnx_runtimes import Runner, onnx_runner
from inference.protocol import ModelLoadError
from inference.specs import ONNX_RUNTIMES, ModelInfo, RunPrecision, Runtime, margin_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    fast: Runner  # uint8 pixels (N, H, W, 3) -> logits, at `precision`
    categories: tuple[str, ...]
    precision: RunPrecision  # what it really runs at
    exact: Runner | None = None  # fp32, for the images `fast` (bf16, int8) is unsure of (see `refine_unsure`)
    refine_margin: float = 0.0
    pass_size: int = 16  # images per forward pass: the largest size warmed, and the one it runs fastest at

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, the rows classified again by `exact`). A batch larger than `pass_size`
        runs in passes of it."""
        logits = in_passes(self.fast, batch, self.pass_size)
        return logits, self.refine(logits, batch)

    def refine(self, logits: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """The rows of `logits` the model is unsure of, classified again by `exact` (in
        place; see `refine_unsure`): those of the whole batch together (fp32 at one image
        measured 5-10% slower per image than at two to four), in passes too. Their indices."""
        exact = self.exact
        if exact is None:
            return np.empty(0, dtype=np.intp)
        return refine_unsure(logits, batch, lambda unsure: in_passes(exact, unsure, self.pass_size), self.refine_margin)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.forward(batch)[0]


def batch_sizes(largest: int) -> tuple[int, ...]:
    """The batch sizes a model runs at: the powers of two below `largest`, and `largest`."""
    return (*(1 << bit for bit in range(largest.bit_length()) if 1 << bit < largest), largest)


def in_passes(run: Runner, batch: np.ndarray, size: int) -> np.ndarray:
    """`run` over `batch`, at most `size` images at a time."""
    if len(batch) <= size:
        return run(batch)
    return np.concatenate([run(batch[start : start + size]) for start in range(0, len(batch), size)])


def padded(run: Runner, sizes: tuple[int, ...]) -> Runner:
    """`run` fed only batches of `sizes`: a partial batch is padded with blank images to the
    next size and their rows dropped from the result. A runtime's first pass at a new batch
    size plans and allocates (OpenVINO: about 20 ms more per size); with every size warmed at
    load, the first task after a start runs like the next ones (measured: 80% of the best of
    five 300-URL tasks with 16 sizes met during the first task, 94% with all warmed)."""

    def run_padded(batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        size = next((size for size in sizes if size >= count), count)
        if size == count:
            return run(batch)
        blank = np.zeros((size - count, *batch.shape[1:]), dtype=batch.dtype)
        return run(np.concatenate((batch, blank)))[:count]

    return run_padded


def refine_unsure(logits: np.ndarray, batch: np.ndarray, exact: Runner, margin: float) -> np.ndarray:
    """The rows of `logits` whose two best logits are within `margin` (`top_two_gap`),
    replaced (in place) by what `exact` (fp32) makes of their images; returns their indices.
    bf16's speed with fp32's answers, at the price of a second pass for some images: where
    bf16 and fp32 disagree on the best label, fp32 itself hesitates between two, so the gap
    is small."""
    unsure = np.flatnonzero(top_two_gap(logits) < margin)
    if len(unsure):
        logits[unsure] = exact(batch[unsure])
    return unsure


def top_two_gap(logits: np.ndarray) -> np.ndarray:
    """Per row, the best logit minus the second best: how sure the model is of its top-1.
    Measured on 1,200 diverse photos, it finds the images where bf16 and fp32 disagree with
    fewer second passes than the gap between the two best probabilities does: 98.2% agreement
    refining 17.8% (logit gap 0.2) against 97.9% refining 20.9% (probability gap 0.02)."""
    best_two = np.partition(logits, -2, axis=1)[:, -2:]
    gap: np.ndarray = best_two.max(axis=1) - best_two.min(axis=1)
    return gap


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, in float64 so that scores near 1 do not all round to 1.0."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    probabilities: np.ndarray = exponentials / exponentials.sum(axis=1, keepdims=True)
    return probabilities


def load_model(
    info: ModelInfo,
    runtime: Runtime,
    threads: int,
    cache_dir: Path,
    warm_batch: int = 1,
    refine_margin: float | None = None,
    calibration_dir: Path | None = None,
) -> LoadedModel:
    """Raises ModelLoadError, with the reason, for anything that keeps the model from running.

    The model runs batches of `batch_sizes(warm_batch)` images only (see `padded`), and once
    on blank images at each of these sizes before it is handed out: a runtime's first pass
    at a batch size allocates and plans (measured 1.8x a later pass at 16), and a task
    should not pay for that. A bf16 or int8 model also gets its fp32 twin for the images it
    is unsure of (`refine_unsure`), at `refine_margin` (None: the precision's measured one,
    `REFINE_MARGINS`). An int8 model is calibrated on first use (`inference.int8_cache`)."""
    precision = info.precision
    margin = margin_for(precision, refine_margin)
    try:
        if not info.weights_present():
            # Checked here so that torchvision never falls back to downloading.
            raise ModelLoadError(info.missing_weights())
        exact: Runner | None = None
        if runtime in ONNX_RUNTIMES and not info.spec.is_graph:
            run, categories = _from_cache(info, runtime, threads, precision, cache_dir, calibration_dir)
            if precision != "fp32" and margin > 0:
                exact, _ = _from_cache(info, runtime, threads, "fp32", cache_dir, calibration_dir)
        else:
            from inference.torch_models import torch_runner  # the one import of torch in a worker

            run, categories = torch_runner(info, runtime, threads)
            precision = "fp32"
        _check_outputs(run, info, len(categories))  # at batch size 1
        size = info.preprocessing.input_size
        sizes = batch_sizes(max(warm_batch, 1))
        for warm in sizes[1:]:
            run(np.zeros((warm, size, size, 3), dtype=np.uint8))
        run = padded(run, sizes)
        if exact is not None:
            # It gets the few unsure images of a batch, at whatever count they are: every
            # count is warmed here (a first pass at a new size measured 20-30 ms slower than
            # the next ones), none padded (fp32 runs 1-4 images as fast per image as 16).
            for warm in range(1, sizes[-1] + 1):
                exact(np.zeros((warm, size, size, 3), dtype=np.uint8))
    except ModelLoadError:
        raise
    except Exception as exc:  # a broken weights file, a wrong architecture, a failed export...
        raise ModelLoadError(f"model {info.name!r} could not be loaded: {exc}") from exc
    return LoadedModel(
        info=info,
        fast=run,
        categories=categories,
        precision=precision,
        exact=exact,
        refine_margin=margin,
        pass_size=sizes[-1],
    )


def _from_cache(
    info: ModelInfo, runtime: Runtime, threads: int, precision: str, cache_dir: Path, calibration_dir: Path | None
) -> tuple[Runner, tuple[str, ...]]:
    entry = onnx_cache.ensure(info, cache_dir)
    try:
        return _runner(info, entry, runtime, threads, precision, calibration_dir), entry.categories()
    except ModelLoadError:
        raise
    except Exception as exc:  # a damaged cache file: not fatal, it is made again
        log.warning("the cached export %s is unusable (%s); exporting it again", entry.onnx, exc)
        entry.remove()
        if precision == "int8":
            int8_cache.entry_for(entry, calibration_dir).remove()
        entry = onnx_cache.ensure(info, cache_dir)
        return _runner(info, entry, runtime, threads, precision, calibration_dir), entry.categories()


def _runner(
    info: ModelInfo,
    entry: onnx_cache.Entry,
    runtime: Runtime,
    threads: int,
    precision: str,
    calibration_dir: Path | None,
) -> Runner:
    path = entry.onnx
    if precision == "int8":
        path = int8_cache.ensure(info, entry, calibration_dir).xml
    return onnx_runner(path, runtime, threads, precision, info.preprocessing)


def _check_outputs(run: Runner, info: ModelInfo, num_labels: int) -> None:
    size = info.preprocessing.input_size
    outputs = run(np.zeros((1, size, size, 3), dtype=np.uint8)).shape[-1]
    if outputs != num_labels:
        raise ModelLoadError(f"model {info.name!r} has {outputs} outputs but {num_labels} labels")
