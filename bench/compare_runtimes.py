"""Forward-pass speed and agreement of every runtime and precision on the same weights.

    .venv/bin/python -m bench.compare_runtimes [--threads 1] [--batch 16] [--images 300]

For each runtime and precision this machine can run: images/s on pre-decoded pixels (the
normalisation is the runtime's: inside the model for OpenVINO, numpy for the others), its
set-up time (export, tracing or compiling, and a first pass over the photos), its top-1
agreement with eager PyTorch fp32 on the test photos plus `--images` benchmark photos, and
its largest probability difference.
OpenVINO bf16 is measured alone and as the service runs it: with the images it is unsure of
computed again in fp32 (`inference.models.refined`); its speed then depends on the photos.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.images import PHOTOS_DIR, make_diverse_images, make_images
from inference import onnx_cache
from inference.models import load_model, softmax
from inference.onnx_runtimes import Runner
from inference.preprocess import preprocess
from inference.specs import (
    BF16_CPU_FLAGS,
    EMBEDDED,
    INT8_CPU_FLAGS,
    REFINE_MARGINS,
    RUNTIMES,
    RunPrecision,
    cpu_flags,
    local_info,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over every photo")
    parser.add_argument("--images", type=int, default=300, help="benchmark photos for the agreement")
    parser.add_argument("--diverse", action="store_true", help="the diverse mix (bench.images) instead")
    args = parser.parse_args()

    info = local_info(EMBEDDED)
    made = make_diverse_images(args.images) if args.diverse else make_images(args.images)
    photos = [path.read_bytes() for path in sorted(PHOTOS_DIR.glob("*.jpg"))] + made
    inputs = np.stack([preprocess(data, info.preprocessing, 10**8) for data in photos])
    bf16 = bool(cpu_flags() & set(BF16_CPU_FLAGS))
    int8 = bool(cpu_flags() & set(INT8_CPU_FLAGS))
    with tempfile.TemporaryDirectory() as cache:
        onnx_cache.ensure(info, Path(cache))  # the export once, not in the first runtime's set-up time
        reference = _probabilities(load_model(info, "eager", args.threads, Path(cache)).run, inputs, args.batch)
        print(f"{len(inputs)} photos; bf16 on this CPU: {'yes' if bf16 else 'no (' + ', '.join(BF16_CPU_FLAGS) + ')'}")
        print(
            f"| runtime | precision | images/s ({args.threads} thread(s), batch {args.batch}) | set-up s | "
            "top-1 = eager fp32 | max |p - p_eager| |"
        )
        print("|---|---|---|---|---|---|")
        for runtime in RUNTIMES:
            variants: list[tuple[RunPrecision, float]] = [("fp32", 0.0)]
            if runtime == "openvino" and bf16:  # bf16 alone, and as the service runs it (refined)
                variants += [("bf16", 0.0), ("bf16", REFINE_MARGINS["bf16"])]
            if runtime == "openvino" and int8:
                variants += [("int8", 0.0), ("int8", REFINE_MARGINS["int8"])]
            for precision, margin in variants:
                started = time.perf_counter()
                model = load_model(
                    replace(info, spec=replace(EMBEDDED, precision=precision)),
                    runtime,
                    args.threads,
                    Path(cache),
                    warm_batch=args.batch,
                    refine_margin=margin,
                )
                probabilities = _probabilities(model.run, inputs, args.batch)  # torch.compile compiles here
                setup = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(args.rounds):  # every photo: the refined model's speed depends on them
                    _probabilities(model.run, inputs, args.batch)
                speed = args.rounds * len(inputs) / (time.perf_counter() - started)
                agree = (probabilities.argmax(axis=1) == reference.argmax(axis=1)).sum()
                difference = np.abs(probabilities - reference).max()
                print(
                    f"| {runtime} | {model.precision}{f' + fp32 under {margin:g}' if margin else ''} | {speed:.1f} | "
                    f"{setup:.1f} | {agree}/{len(inputs)} | "
                    f"{difference:.1e} |",
                    flush=True,
                )


def _probabilities(run: Runner, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([softmax(run(inputs[start : start + batch])) for start in range(0, len(inputs), batch)])


if __name__ == "__main__":
    main()
