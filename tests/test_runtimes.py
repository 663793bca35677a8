"""Every runtime runs the same weights: same top-1 as eager, probabilities within 1e-3."""

from __future__ import annotations

import pytest
import torch

from inference.models import load_model
from inference.preprocess import preprocess
from inference.protocol import ModelLoadError
from inference.specs import EMBEDDED, RUNTIMES


@pytest.fixture(scope="module")
def batch(photos: dict[str, bytes]) -> torch.Tensor:
    model = load_model(EMBEDDED, "eager", threads=1)
    return torch.stack([preprocess(data, model.info.preprocessing, model.transform, 10**8) for data in photos.values()])


@pytest.fixture(scope="module")
def eager_probabilities(batch: torch.Tensor) -> torch.Tensor:
    return load_model(EMBEDDED, "eager", threads=1).run(batch).softmax(dim=1)


@pytest.mark.parametrize("runtime", [runtime for runtime in RUNTIMES if runtime != "eager"])
def test_runtime_agrees_with_eager(runtime: str, batch: torch.Tensor, eager_probabilities: torch.Tensor) -> None:
    torch.set_num_threads(1)
    run = load_model(EMBEDDED, runtime, threads=1).run
    probabilities = run(batch).softmax(dim=1)
    assert probabilities.shape == eager_probabilities.shape == (3, 1000)
    assert torch.equal(probabilities.argmax(dim=1), eager_probabilities.argmax(dim=1))
    assert (probabilities - eager_probabilities).abs().max() < 1e-3
    # A batch size the runtime has not seen yet (the ONNX graph has a dynamic batch axis).
    single = run(batch[:1]).softmax(dim=1)
    assert (single - eager_probabilities[:1]).abs().max() < 1e-3


def test_unknown_runtime_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError):
        load_model(EMBEDDED, "tensorflow", threads=1)
