"""Every runtime runs the same weights: same top-1 as eager fp32, probabilities within 1e-3;
bf16 where the CPU has it. The ONNX export is cached on disk and a damaged file is rebuilt."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.images import make_images
from inference import onnx_cache
from inference.models import batch_sizes, load_model, padded, refine_unsure, softmax
from inference.preprocess import preprocess
from inference.protocol import ModelLoadError
from inference.specs import (
    BF16_CPU_FLAGS,
    EMBEDDED,
    REFINE_MARGINS,
    RUNTIMES,
    ModelInfo,
    ModelSpec,
    cpu_flags,
    local_info,
)
from tests.conftest import ImageServer, ServiceFactory, metric, submit, wait_for_task

pytestmark = pytest.mark.e2e  # the real model, through every runtime

INFO = local_info(EMBEDDED)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def batch(photos: dict[str, bytes]) -> np.ndarray:
    return np.stack([preprocess(data, INFO.preprocessing, 10**8) for data in photos.values()])


@pytest.fixture(scope="module")
def eager_probabilities(batch: np.ndarray, model_cache: Path) -> np.ndarray:
    return softmax(load_model(INFO, "eager", 1, model_cache).run(batch))


@pytest.mark.parametrize("runtime", [runtime for runtime in RUNTIMES if runtime != "eager"])
def test_runtime_agrees_with_eager(
    runtime: str, batch: np.ndarray, eager_probabilities: np.ndarray, model_cache: Path
) -> None:
    model = load_model(INFO, runtime, 1, model_cache)  # type: ignore[arg-type]  # every Runtime
    assert model.precision == "fp32"
    probabilities = softmax(model.run(batch))
    assert probabilities.shape == eager_probabilities.shape == (3, 1000)
    assert np.array_equal(probabilities.argmax(axis=1), eager_probabilities.argmax(axis=1))
    assert np.abs(probabilities - eager_probabilities).max() < 1e-3
    # A batch size the runtime has not seen yet (the ONNX graph has a dynamic batch axis).
    single = softmax(model.run(batch[:1]))
    assert np.abs(single - eager_probabilities[:1]).max() < 1e-3


def test_partial_batches_run_padded_to_a_warmed_size_and_give_their_own_rows() -> None:
    seen: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :4] * 2

    assert batch_sizes(16) == (1, 2, 4, 8, 16) and batch_sizes(12) == (1, 2, 4, 8, 12) and batch_sizes(1) == (1,)
    run_padded = padded(run, batch_sizes(16))
    batch = np.random.default_rng(0).random((5, 3, 2, 2), dtype=np.float32)
    assert np.array_equal(run_padded(batch), run(batch))
    assert np.array_equal(run_padded(batch[:4]), run(batch[:4]))
    assert seen == [8, 5, 4, 4]  # 5 images ran as 8; 4 as they are


def test_a_model_loaded_for_batches_of_16_gives_the_same_for_any_batch(
    batch: np.ndarray, eager_probabilities: np.ndarray, model_cache: Path
) -> None:
    model = load_model(INFO, "onnx", 1, model_cache, warm_batch=16)
    for rows in (batch[:1], batch[:3], np.concatenate([batch] * 6)):  # 1, 3 (as 4) and 18 images
        probabilities = softmax(model.run(rows))
        assert probabilities.shape == (len(rows), 1000)
        expected = np.concatenate([eager_probabilities] * 6)[: len(rows)]
        assert np.abs(probabilities - expected).max() < 1e-3


@pytest.mark.skipif(not cpu_flags() & set(BF16_CPU_FLAGS), reason=f"this CPU has none of {', '.join(BF16_CPU_FLAGS)}")
def test_openvino_bf16_agrees_where_fp32_is_confident(
    batch: np.ndarray, eager_probabilities: np.ndarray, model_cache: Path
) -> None:
    model = load_model(bf16(INFO), "openvino", 1, model_cache)
    assert model.precision == "bf16"
    probabilities = softmax(model.run(batch))
    confident = eager_probabilities.max(axis=1) > 0.5
    assert confident.any()
    assert np.array_equal(probabilities.argmax(axis=1)[confident], eager_probabilities.argmax(axis=1)[confident])


def test_refined_runs_only_the_unsure_rows_again() -> None:
    fast = np.array([[4.0, 0.0, 0.0], [1.0, 1.02, 0.0], [0.0, 0.0, 9.0], [2.0, 1.99, 0.0]], dtype=np.float32)
    exact_rows: list[np.ndarray] = []

    def exact(batch: np.ndarray) -> np.ndarray:
        exact_rows.append(batch.copy())
        return np.full((len(batch), 3), 7.0, dtype=np.float32)

    inputs = np.arange(4, dtype=np.float32).reshape(4, 1)
    logits = fast.copy()
    assert refine_unsure(logits, inputs, exact, margin=0.05).tolist() == [1, 3]
    (again,) = exact_rows
    assert again[:, 0].tolist() == [1.0, 3.0]  # the two near-ties, nothing else
    assert np.array_equal(logits[[0, 2]], fast[[0, 2]]) and (logits[[1, 3]] == 7.0).all()
    exact_rows.clear()
    assert refine_unsure(fast.copy(), inputs, exact, margin=0.001).tolist() == []
    assert exact_rows == []  # none that unsure


@pytest.mark.skipif(not cpu_flags() & set(BF16_CPU_FLAGS), reason=f"this CPU has none of {', '.join(BF16_CPU_FLAGS)}")
def test_bf16_refined_at_the_default_margin_has_the_top_1_of_fp32_on_nearly_every_photo(
    photos: dict[str, bytes], model_cache: Path
) -> None:
    """The default margin's measured trade (docs/models.md): on these 303 photos bf16 alone
    misses 2 of fp32's top-1 and the refine (at a logit gap of 0.2, about 5% of them refined)
    all but one: no margin short of refining most images makes it 100%, so the bar is the
    issue's 98%, with the refine doing better than bf16 alone."""
    images = list(photos.values()) + make_images(300)
    inputs = np.stack([preprocess(data, INFO.preprocessing, 10**8) for data in images])
    fp32 = load_model(INFO, "openvino", 1, model_cache, warm_batch=16)
    alone = load_model(bf16(INFO), "openvino", 1, model_cache, warm_batch=16, refine_margin=0)
    served = load_model(bf16(INFO), "openvino", 1, model_cache, warm_batch=16)
    assert served.refine_margin == REFINE_MARGINS["bf16"] == 0.2

    def top_1(run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.concatenate([run(inputs[start : start + 16]).argmax(axis=1) for start in range(0, len(inputs), 16)])

    expected = top_1(fp32.run)
    assert served.precision == "bf16"
    refined_agreement, alone_agreement = (top_1(served.run) == expected).mean(), (top_1(alone.run) == expected).mean()
    assert refined_agreement >= 0.98 and refined_agreement > alone_agreement >= 0.95
    refined_rows = sum(len(served.forward(inputs[start : start + 16])[1]) for start in range(0, len(inputs), 16))
    assert refined_rows < 0.15 * len(images)  # the bench photos: fp32 is sure of most


@pytest.mark.skipif(bool(cpu_flags() & set(BF16_CPU_FLAGS)), reason="this CPU computes bf16")
def test_bf16_where_the_cpu_cannot_is_a_load_error_not_silent_fp32(model_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="bf16"):
        load_model(bf16(INFO), "openvino", 1, model_cache)


def bf16(info: ModelInfo) -> ModelInfo:
    return replace(info, spec=replace(info.spec, precision="bf16"))


def test_unknown_runtime_is_a_load_error(model_cache: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model(INFO, "tensorflow", 1, model_cache)  # type: ignore[arg-type]  # the point of the test


def test_the_export_is_made_once_and_reused(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The run's shared cache: made by the first test that needed it (or here), as the first
    # start on a machine makes it. Exports made afresh: the damaged-export and install tests.
    entry = onnx_cache.ensure(INFO, model_cache)
    assert entry.onnx.is_file() and len(entry.categories()) == 1000
    made = entry.onnx.stat().st_mtime_ns

    def no_export(*_: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_cache, "_export", no_export)
    assert load_model(INFO, "openvino", 1, model_cache).info == INFO
    assert onnx_cache.ensure(INFO, model_cache) == entry
    assert entry.onnx.stat().st_mtime_ns == made


def test_a_damaged_export_is_rebuilt_not_fatal(
    tmp_path: Path, model_cache: Path, batch: np.ndarray, eager_probabilities: np.ndarray
) -> None:
    shared = onnx_cache.ensure(INFO, model_cache)
    entry = onnx_cache.entry_for(INFO, tmp_path)
    entry.meta.write_bytes(shared.meta.read_bytes())
    entry.onnx.write_bytes(shared.onnx.read_bytes()[:5000])  # cut short, as a full disk or a crash would
    model = load_model(INFO, "openvino", 1, tmp_path)
    assert np.array_equal(softmax(model.run(batch)).argmax(axis=1), eager_probabilities.argmax(axis=1))
    assert entry.onnx.stat().st_size > 1_000_000


def test_new_weights_get_a_new_export(tmp_path: Path) -> None:
    weights = tmp_path / "a.pth"
    weights.write_bytes(b"one")
    spec = ModelSpec(name="m", source="checkpoint", architecture="resnet18", path=str(weights))
    first = onnx_cache.entry_for(ModelInfo(spec, "resnet18", INFO.preprocessing, 10, str(weights)), tmp_path)
    weights.write_bytes(b"two")
    second = onnx_cache.entry_for(ModelInfo(spec, "resnet18", INFO.preprocessing, 10, str(weights)), tmp_path)
    assert first.onnx != second.onnx and first.onnx.parent == second.onnx.parent == tmp_path


def test_a_worker_on_the_default_path_never_imports_torch(model_cache: Path, photos: dict[str, bytes]) -> None:
    onnx_cache.ensure(INFO, model_cache)  # what the first start (or the install) did
    photo = Path(__file__).parent / "photos" / "coffee.jpg"
    program = f"""
import sys
from pathlib import Path
from inference import worker
from inference.protocol import Prediction, WorkerConfig
from inference.specs import EMBEDDED, local_info
info = local_info(EMBEDDED)
worker.init_worker(WorkerConfig(info, "openvino", 1, 10**8, Path({str(model_cache)!r})))
assert worker.worker_info()[2] == "", worker.worker_info()
outcome, = worker.classify_batch(info, [Path({str(photo)!r}).read_bytes()], [3])
assert isinstance(outcome, Prediction) and "espresso" in outcome.labels[0].label, outcome
assert worker.model_infos([EMBEDDED]) == [info]
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision")))
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_export_made_at_install_serves_from_a_read_only_cache(tmp_path: Path) -> None:
    """What the container image does: `python -m inference.export --cache-dir` at build time,
    then workers read the cache without writing to it (not even a lock file)."""
    cache = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, "-m", "inference.export", "--cache-dir", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    files = sorted(path.suffix for path in cache.iterdir())
    assert files == [".json", ".onnx"]
    cache.chmod(0o555)
    try:
        assert load_model(INFO, "openvino", 1, cache).categories[967] == "espresso"
        assert sorted(path.suffix for path in cache.iterdir()) == files
    finally:
        cache.chmod(0o755)


@pytest.mark.skipif(not cpu_flags() & set(BF16_CPU_FLAGS), reason=f"this CPU has none of {', '.join(BF16_CPU_FLAGS)}")
@pytest.mark.parametrize(("margin", "refined_share"), [(100.0, 1.0), (0.0, 0.0)], ids=["every-image", "never"])
async def test_the_refined_images_are_counted(
    make_real_service: ServiceFactory, image_server: ImageServer, margin: float, refined_share: float
) -> None:
    """`ics_refined_images_total`: images bf16 was unsure of, classified again in fp32. A
    margin of 100 (the largest allowed) refines every image (no two best logits are that far
    apart), 0 none; the labels are fp32's either way."""
    client = await make_real_service(refine_margin=margin)
    urls = [image_server.url(f"/photos/{name}") for name in ("coffee", "chelsea", "rocket")]
    task = await wait_for_task(client, (await submit(client, urls))["task_id"])
    assert [item["labels"][0]["label"] for item in task["items"]] == ["espresso", "Egyptian cat", "missile"]
    assert task["precision"] == "bf16"
    assert await metric(client, "ics_refined_images_total") == refined_share * len(urls)
