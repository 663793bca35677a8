"""Run a model's ONNX export with OpenVINO (the default) or ONNX Runtime: no torch needed.

OpenVINO also runs the int8 models `inference.quantize` makes of an export (`.xml` files).
Both map a batch of uint8 pixels (N, H, W, 3) to logits (N, classes), numpy in and out:
OpenVINO converts and normalises the pixels inside the model (a pre-processing step it
compiles with the rest), ONNX Runtime gets them normalised by numpy. Precision is always set
explicitly: OpenVINO would otherwise pick bf16 by itself on CPUs that have it.
With one single-threaded worker process per core, OpenVINO's thread pinning can put two
workers on one core (measured: 190 instead of 275 images/s), so pinning is off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from inference.preprocess import normalize
from inference.protocol import ModelLoadError
from inference.specs import BF16_CPU_FLAGS, Preprocessing, cpu_flags

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 pixels (N, H, W, 3) -> logits (N, classes)


def onnx_runner(path: Path, runtime: str, threads: int, precision: str, preprocessing: Preprocessing) -> Runner:
    if runtime == "openvino":
        return _openvino(path, threads, precision, preprocessing)
    if runtime == "onnx":
        if precision != "fp32":
            raise ModelLoadError(f"ONNX Runtime runs fp32 here, not {precision}")
        return _onnxruntime(path, threads, preprocessing)
    raise ValueError(f"{runtime!r} does not run ONNX files")


def _openvino(path: Path, threads: int, precision: str, preprocessing: Preprocessing) -> Runner:
    import openvino
    from openvino.preprocess import PrePostProcessor

    # An int8 model (`inference.quantize`) runs its quantized layers in int8 and the others
    # in bf16 where the CPU has it (measured: 1.8 ms per image against 2.5 for all-bf16).
    rest = "bf16" if precision == "bf16" or (precision == "int8" and cpu_flags() & set(BF16_CPU_FLAGS)) else "fp32"
    wanted = {"fp32": openvino.Type.f32, "bf16": openvino.Type.bf16}[rest]
    core = openvino.Core()
    # Pixels in as they are; the conversion, normalisation and transposition run in the
    # model (cheaper than numpy doing them first: measured about 5% of a worker's time).
    steps = PrePostProcessor(core.read_model(path))
    steps.input().tensor().set_element_type(openvino.Type.u8).set_layout(openvino.Layout("NHWC"))
    steps.input().model().set_layout(openvino.Layout("NCHW"))
    steps.input().preprocess().convert_element_type(openvino.Type.f32).mean(
        [255 * value for value in preprocessing.mean]
    ).scale([255 * value for value in preprocessing.std])
    compiled = core.compile_model(
        steps.build(),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": wanted,
        },
    )
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    if used != wanted:  # OpenVINO falls back to f32 without a word where the CPU lacks bf16
        raise ModelLoadError(f"OpenVINO runs this model in {used.to_string()}, not the {rest} asked for")
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        request.infer({0: batch})
        logits: np.ndarray = request.get_output_tensor(0).data.copy()  # the buffer is reused
        return logits

    return run


def _onnxruntime(path: Path, threads: int, preprocessing: Preprocessing) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        (logits,) = session.run(["logits"], {"input": normalize(batch, preprocessing)})
        return np.asarray(logits)

    return run
