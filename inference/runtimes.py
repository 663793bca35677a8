"""Ways to run a torch module: the same weights, different torch execution engines.

Every runner here maps a normalised float batch (N, 3, H, W) to logits (N, classes), numpy
in and out; `inference.torch_models` puts the pixel normalisation in front, so that they
take what the ONNX runners (`inference.onnx_runtimes`, the service's default, no torch at
all) take. These stay selectable with `--runtime`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

FloatRunner = Callable[[np.ndarray], np.ndarray]  # float (N, 3, H, W) -> logits (N, classes)

TORCH_RUNTIMES = ("eager", "channels_last", "torchscript", "compile")


def build_runner(module: torch.nn.Module, runtime: str, input_size: int) -> FloatRunner:
    module = module.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    if runtime == "eager":
        return _numpy(module)
    if runtime == "channels_last":
        module = module.to(memory_format=torch.channels_last)
        return _numpy(lambda batch: module(batch.contiguous(memory_format=torch.channels_last)))
    if runtime == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still works
            traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]  # untyped in torch
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        return _numpy(frozen)
    if runtime == "compile":
        return _no_single_batches(_numpy(torch.compile(module, dynamic=True)))
    raise ValueError(f"unknown torch runtime {runtime!r}; choose one of {', '.join(TORCH_RUNTIMES)}")


def graph_runner(module: Callable[[torch.Tensor], torch.Tensor]) -> FloatRunner:
    """For a model that already is a compiled graph (TorchScript, torch.export): run it as
    it is; the runtimes above convert nn.Modules."""
    return _numpy(module)


def _no_single_batches(run: FloatRunner) -> FloatRunner:
    """A batch of one image runs padded to two: torch.compile specialises a dimension of size
    1, so the first batch of one would compile a graph of its own (about a minute here), and
    every other size shares the dynamic one."""

    def run_padded(batch: np.ndarray) -> np.ndarray:
        if len(batch) != 1:
            return run(batch)
        return run(np.concatenate([batch, batch]))[:1]

    return run_padded


def _numpy(function: Callable[[torch.Tensor], torch.Tensor]) -> FloatRunner:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return function(torch.from_numpy(batch)).numpy()

    return run
