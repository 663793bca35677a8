"""The benchmark's own parts still fit the code they measure (its figures are in docs/performance.md;
a bench that no longer runs would leave them unchecked). No timing is asserted here."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import reference
from bench.download_floor import floor_per_image
from bench.images import make_diverse_images, make_images
from bench.run_bench import reference_limit
from bench.throughput import IdleWatch, stage_costs
from bench.workers_offline import workers_images_per_second
from inference import onnx_cache
from inference.engine import Engine
from inference.protocol import Prediction, WorkerConfig
from inference.specs import BF16_CPU_FLAGS, EMBEDDED, cpu_flags, local_info
from service.settings import Settings
from testing.image_server import start_image_server
from testing.services import ROOT

pytestmark = pytest.mark.e2e  # the benchmarks run real services


def test_the_reference_pipeline_runs(model_cache: Path) -> None:
    images = make_images(8)
    assert reference_limit(images, Settings(workers=1, threads_per_worker=1, model_cache_dir=model_cache)) > 0


def test_the_workers_offline_bench_runs(model_cache: Path) -> None:
    config = WorkerConfig(local_info(EMBEDDED), "openvino", 1, 10**8, model_cache)
    assert workers_images_per_second(make_images(20), config, processes=1) > 0


def test_the_reference_classifies_as_the_service_does(photos: dict[str, bytes], model_cache: Path) -> None:
    """A fair reference: same model, same answers, on the test photos and benchmark photos."""
    info = local_info(EMBEDDED)
    images = list(photos.values()) + make_images(16)
    reference._start(str(onnx_cache.ensure(info, model_cache).onnx))
    engine = Engine(WorkerConfig(info, "onnx", 1, 10**8, model_cache))
    ours = [
        outcome.labels[0].class_index
        for outcome in engine.classify(info, images, [1] * len(images))
        if isinstance(outcome, Prediction)
    ]
    assert ours == reference._classify(images)


def test_the_webhook_bench_runs() -> None:
    command = [sys.executable, "-m", "bench.webhooks", "--tasks", "3", "--images", "2"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "3 webhooks, 3 tasks of 2 images submitted at once: latency after the task's end p50" in run.stdout


@pytest.mark.parametrize("client", ["service", "bare"])
def test_the_download_floor_bench_runs(tmp_path: Path, client: str) -> None:
    """It downloads through the service's own client or the bare one; a download that fails
    fails it."""
    for number, data in enumerate(make_images(12)):
        (tmp_path / f"{number}.jpg").write_bytes(data)
    server, port = start_image_server(str(tmp_path))
    try:
        assert floor_per_image(port, 12, rate=1000.0, client=client) > 0
        with pytest.raises(subprocess.CalledProcessError):
            floor_per_image(port, 13, rate=1000.0, client=client)  # /img/12.jpg is not there: HTTP 404
    finally:
        server.terminate()
        server.join()


def test_the_throughput_bench_measures_every_stage(model_cache: Path) -> None:
    """bench.throughput's per-stage costs: every stage is timed; with a margin of 100 every
    image is refined (on a CPU with bf16; fp32 has no refine)."""
    bf16 = bool(cpu_flags() & set(BF16_CPU_FLAGS))
    info = local_info(replace(EMBEDDED, precision="bf16" if bf16 else "fp32"))
    config = WorkerConfig(info, "openvino", 1, 10**8, model_cache, batch_size=8, refine_margin=100.0)
    costs = stage_costs(make_diverse_images(12), config)
    assert all(costs[stage] > 0 for stage in ("decode", "resize", "forward", "handover")), costs
    assert costs["refined_share"] == (1.0 if bf16 else 0.0)
    assert (costs["refine"] > 0) == bf16


def test_the_idle_share_is_taken_between_the_samples_inside_the_span() -> None:
    watch = IdleWatch()
    # (time, idle CPU seconds, all CPU seconds): 2 cores, half idle from t=10 to t=11
    watch.samples = [(9.9, 0.0, 0.0), (10.0, 5.0, 20.0), (10.5, 5.5, 21.0), (11.0, 6.0, 22.0), (11.1, 6.2, 22.2)]
    assert watch.idle_share(10.0, 11.0) == 0.5
    assert watch.idle_share(10.2, 10.4) != watch.idle_share(10.2, 10.4)  # NaN: no two samples to tell
