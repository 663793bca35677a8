"""Forward-pass speed of each runtime on the same weights and pre-decoded inputs.

    .venv/bin/python -m bench.compare_runtimes [--threads 1] [--batch 16]

Prints images/s per runtime, its set-up time (export, tracing or compiling) and its largest
probability difference from eager on the test photos.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.images import PHOTOS_DIR
from inference.models import load_model
from inference.preprocess import preprocess
from inference.specs import EMBEDDED, RUNTIMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    eager = load_model(EMBEDDED, "eager", args.threads)
    photos = [path.read_bytes() for path in sorted(PHOTOS_DIR.glob("*.jpg"))]
    inputs = torch.stack([preprocess(data, eager.info.preprocessing, eager.transform, 10**8) for data in photos])
    reference = eager.run(inputs).softmax(dim=1)
    batch = inputs.repeat(args.batch // len(photos) + 1, 1, 1, 1)[: args.batch]

    print(f"| runtime | images/s ({args.threads} thread(s), batch {args.batch}) | set-up s | max |p - p_eager| |")
    print("|---|---|---|---|")
    for runtime in RUNTIMES:
        started = time.perf_counter()
        model = load_model(EMBEDDED, runtime, args.threads)
        model.run(batch)  # torch.compile compiles here
        setup = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.rounds):
            model.run(batch)
        speed = args.rounds * args.batch / (time.perf_counter() - started)
        difference = (model.run(inputs).softmax(dim=1) - reference).abs().max().item()
        print(f"| {runtime} | {speed:.1f} | {setup:.1f} | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
