"""Export a model to ONNX for the model cache (imports torch; run as a child process).

    python -m inference.export [--cache-dir DIR]     # the embedded default model, e.g. at install
    python -m inference.export --spec JSON --to FILE # what inference.onnx_cache runs on a miss

Writes `FILE` with `.json` (class names) first, then the `.onnx` file, each to a temporary
name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from inference.lifetime import die_with_parent
from inference.onnx_cache import default_cache_dir, entry_for, spec_from_json
from inference.specs import EMBEDDED, ModelInfo, ModelSpec, local_info
from inference.torch_models import load_module
from inference.zoo import model_info


def export(spec: ModelSpec, onnx_path: Path) -> None:
    info = model_info(spec)
    if not info.weights_file().is_file():
        raise SystemExit(f"the weights of model {spec.name!r} are not on disk ({info.weights_file()})")
    module, categories = load_module(spec)
    size = info.preprocessing.input_size
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    meta = onnx_path.with_suffix(".json")
    _write_atomically(meta, lambda path: path.write_text(json.dumps({"categories": list(categories)})))

    def write_onnx(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is legacy
            # dynamo=False: the TorchScript-based exporter takes ~1 s here, the dynamo one ~9 s,
            # for the same graph and outputs.
            torch.onnx.export(
                module,
                (torch.zeros(1, 3, size, size),),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )

    _write_atomically(onnx_path, write_onnx)


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, help="model cache to fill with the embedded default model")
    parser.add_argument("--spec", help="the model, as inference.onnx_cache.spec_to_json writes it")
    parser.add_argument("--to", type=Path, help="the .onnx file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.spec:
        if not args.to:
            parser.error("--spec needs --to")
        die_with_parent(os.getppid())  # started by a worker: not to outlive it
        export(spec_from_json(args.spec), args.to)
        return
    info: ModelInfo = local_info(EMBEDDED)
    entry = entry_for(info, args.cache_dir or default_cache_dir())
    export(EMBEDDED, entry.onnx)
    logging.info("exported %s to %s", EMBEDDED.name, entry.onnx)


if __name__ == "__main__":
    main()
