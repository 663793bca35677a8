"""ONNX exports of the models, cached on disk, so workers run them without importing torch.

An entry is two files named after the model and a key: the hash of its weights file, its
architecture and the export format's version, so new weights or a new export never reuse
an old file. `<stem>.json` (class names and the input size) is written first and `<stem>.onnx`
last, each by an atomic rename, so an `.onnx` file that exists is complete. A missing entry
is exported by `python -m inference.export` in a child process (the one place torch is
imported on this path), under a lock file so that workers starting together export once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.protocol import ModelLoadError
from inference.specs import ModelInfo, ModelSpec, Preprocessing

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when inference.export changes what it writes
EXPORT_TIMEOUT = 600.0  # seconds; a large torchvision model exports in well under a minute


def cache_home() -> Path:
    """`$XDG_CACHE_HOME`, or `~/.cache` (the XDG base directory rule; torch's hub follows it too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_cache_dir() -> Path:
    """`<cache home>/ics/models`: shared by every data dir."""
    return cache_home() / "ics" / "models"


@dataclass(frozen=True)
class Entry:
    onnx: Path
    meta: Path

    @property
    def lock(self) -> Path:
        return self.onnx.with_suffix(".lock")

    def categories(self) -> tuple[str, ...]:
        return tuple(json.loads(self.meta.read_text())["categories"])

    def remove(self) -> None:
        self.onnx.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def entry_for(info: ModelInfo, cache_dir: Path) -> Entry:
    """Where the export of `info` lives; hashes its weights file (tens of ms for 100 MB)."""
    digest = hashlib.sha256()
    with info.weights_file().open("rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{info.spec.source}:{info.architecture}:{info.num_classes}:v{EXPORT_VERSION}".encode())
    stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', info.name)}-{digest.hexdigest()[:16]}"
    return Entry(cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json")


def ensure(info: ModelInfo, cache_dir: Path) -> Entry:
    """The cached export of `info`, made first if it is not there; raises ModelLoadError."""
    try:
        entry = entry_for(info, cache_dir)
    except OSError as exc:
        raise ModelLoadError(f"the weights of model {info.name!r} cannot be read: {exc}") from exc
    if not entry.onnx.is_file():
        made_once(entry.onnx, entry.lock, lambda: _export(info.spec, entry))
    return entry


def made_once(target: Path, lock: Path, make: Callable[[], None]) -> None:
    """Run `make` to write `target` unless it exists, once across the processes that ask at
    the same time (the others wait on `lock`, then find it); raises ModelLoadError."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another process may be making it: wait for it
            if not target.is_file():
                make()
    except OSError as exc:
        raise ModelLoadError(f"the model cache {lock.parent} is not usable: {exc}") from exc


def _export(spec: ModelSpec, entry: Entry) -> None:
    log.debug("exporting model %s to %s (once per weights file)", spec.name, entry.onnx)
    run_child(
        ["inference.export", "--spec", spec_to_json(spec), "--to", str(entry.onnx)],
        entry.onnx,
        EXPORT_TIMEOUT,
        doing=f"exporting model {spec.name!r}",
        failing=f"model {spec.name!r} could not be exported to ONNX",
    )


def run_child(arguments: list[str], makes: Path, timeout: float, doing: str, failing: str) -> None:
    """`python -m <arguments>` (a module of this package, where this process found it,
    whatever the working directory) to write `makes`. Raises ModelLoadError: `<doing> took
    over <timeout>s`, or `<failing>: ` and the child's last line of stderr."""
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", *arguments]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"{doing} took over {timeout:g}s") from None
    if done.returncode != 0 or not makes.is_file():
        lines = done.stderr.strip().splitlines()
        raise ModelLoadError(f"{failing}: {lines[-1] if lines else f'exit status {done.returncode}'}")


def spec_to_json(spec: ModelSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


def spec_from_json(text: str) -> ModelSpec:
    fields = json.loads(text)
    if fields.get("preprocessing") is not None:
        fields["preprocessing"] = preprocessing_from_fields(fields["preprocessing"])
    return ModelSpec(**fields)


def preprocessing_from_fields(values: dict[str, Any]) -> Preprocessing:
    """A `Preprocessing` from its `dataclasses.asdict` fields, as JSON gave them back."""
    return Preprocessing(
        int(values["input_size"]), int(values["resize_size"]), tuple(values["mean"]), tuple(values["std"])
    )
