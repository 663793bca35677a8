"""The fixed reference pipeline the service's throughput is measured against.

Deliberately not the service's own worker code, and not to be tuned with it: Pillow draft
decode, the same resize/crop/normalisation, ONNX Runtime in fp32 on the embedded model's
ONNX export, one process per core, batches of 16. Only its input file is shared (the
export from the model cache).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

BATCH = 16
SIZE, RESIZE = 224, 256
MEAN, STD = 127 / 255, 128 / 255  # EfficientNet-Lite's (x - 127) / 128

_session = None  # per reference process


def _start(onnx_path: str) -> None:
    global _session
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    _session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])


def _decode(data: bytes) -> np.ndarray:
    encoded = Image.open(io.BytesIO(data))
    width, height = encoded.size
    scale = RESIZE / min(width, height)
    encoded.draft("RGB", (round(width * scale), round(height * scale)))
    decoded = encoded.convert("RGB")
    width, height = decoded.size
    short, long = sorted((width, height))
    new_long = int(RESIZE * long / short)
    size = (RESIZE, new_long) if width <= height else (new_long, RESIZE)
    resized = decoded.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - SIZE) / 2), round((size[1] - SIZE) / 2)
    pixels = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32)
    return ((pixels / 255 - MEAN) / STD).transpose(2, 0, 1)


def _classify(images: list[bytes]) -> list[int]:
    assert _session is not None
    (logits,) = _session.run(None, {_session.get_inputs()[0].name: np.stack([_decode(data) for data in images])})
    return [int(index) for index in np.asarray(logits).argmax(axis=1)]


def reference_images_per_second(images: list[bytes], onnx_path: Path, processes: int | None = None) -> float:
    """Images/s of the reference on `images`, all processes busy (after a warm-up)."""
    processes = processes or len(os.sched_getaffinity(0))
    batches = [images[start : start + BATCH] for start in range(0, len(images), BATCH)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, context, _start, (str(onnx_path),)) as pool:
        for future in [pool.submit(_classify, batches[0]) for _ in range(processes * 2)]:
            future.result()
        started = time.perf_counter()
        done = sum(len(future.result()) for future in [pool.submit(_classify, batch) for batch in batches])
        return done / (time.perf_counter() - started)
