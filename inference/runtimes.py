"""Ways to run a loaded torch model: the same weights, different execution engines.

Every runtime is a function from a float batch (N, 3, H, W) to logits (N, classes). The
service default is ONNX Runtime on an in-memory `torch.onnx.export` of the model, which
measured about 5x faster than eager PyTorch for EfficientNet-Lite0 on this CPU (see the
README's Performance section); the others stay selectable with `--runtime`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch

from inference.specs import RUNTIMES

Runner = Callable[[torch.Tensor], torch.Tensor]


def build_runner(module: torch.nn.Module, runtime: str, input_size: int, threads: int) -> Runner:
    module = module.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    if runtime == "eager":
        return _no_grad(module)
    if runtime == "channels_last":
        module = module.to(memory_format=torch.channels_last)
        return _no_grad(lambda batch: module(batch.contiguous(memory_format=torch.channels_last)))
    if runtime == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still works
            traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]  # untyped in torch
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        return _no_grad(frozen)
    if runtime == "compile":
        return _no_grad(torch.compile(module, dynamic=True))
    if runtime == "onnx":
        return _onnx_runner(module, example, threads)
    raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def graph_runner(module: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    """For a model that already is a compiled graph (TorchScript, torch.export): run it as
    it is; the runtimes above convert nn.Modules."""
    return _no_grad(module)


def _no_grad(function: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return function(batch)

    return run


def _onnx_runner(module: torch.nn.Module, example: torch.Tensor, threads: int) -> Runner:
    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is legacy
        # dynamo=False: the TorchScript-based exporter takes ~1 s here, the dynamo one ~9 s
        # per worker start, for the same graph and outputs.
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works; torch's annotation lists paths only
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(["logits"], {"input": batch.numpy()})
        return torch.from_numpy(logits)

    return run
