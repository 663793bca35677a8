"""Models beside the embedded default: a torchvision architecture from a state_dict, a
TorchScript file and a torch.export file (all made by the test, each with its labels file),
torchvision weights found in the torch hub cache, a declared model whose weights are
missing (unavailable at once, never downloaded), a broken checkpoint, and the workers' LRU."""

from __future__ import annotations

import asyncio
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from inference.engine import Engine
from inference.protocol import WorkerConfig
from inference.specs import EMBEDDED, CatalogError, ModelSpec, declared_specs, local_info, torchvision_spec
from inference.torch_models import imagenet_categories
from inference.zoo import cache_file, weights_of
from service.api.appkeys import SETTINGS
from service.settings import load_settings
from testing.services import ROOT, service_command
from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task


class Favourite(torch.nn.Module):
    """A small real network whose answer is fixed by its bias: class `favourite`, score ~1."""

    def __init__(self, classes: int, favourite: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1))
        self.head = torch.nn.Linear(8, classes)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favourite), classes) * 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    resnet = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():  # the weights decide the answer: "gamma"
        resnet.fc.weight.zero_()
        resnet.fc.bias.copy_(torch.tensor([0.0, 0.0, 20.0, 0.0]))
    torch.save(resnet.state_dict(), directory / "pets.pth")
    (directory / "pets.txt").write_text("alpha\nbeta\ngamma\ndelta\n")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still supported
        torch.jit.script(Favourite(3, favourite=0).eval()).save(str(directory / "colours.pt"))
    (directory / "colours.txt").write_text("red\ngreen\nblue\n")

    example = torch.zeros(2, 3, 160, 160)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(Favourite(2, favourite=1).eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(exported, directory / "shapes.pt2")
    (directory / "shapes.txt").write_text("circle\nsquare\n")

    (directory / "broken.pth").write_bytes(b"not a checkpoint")
    (directory / "models.toml").write_text(
        """
[models.pets]
architecture = "resnet18"
path = "pets.pth"
labels = "pets.txt"

[models.colours]
format = "torchscript"
path = "colours.pt"
labels = "colours.txt"

[models.shapes]
format = "export"
path = "shapes.pt2"
labels = "shapes.txt"
input_size = 160
resize_size = 180

[models.broken]
architecture = "resnet18"
path = "broken.pth"
labels = "pets.txt"
"""
    )
    return directory


class DownloadTrap:
    """An HTTP(S) proxy on 127.0.0.1 that counts connection attempts: workers inherit
    HTTP(S)_PROXY pointing here, so any download torch.hub tried would show up."""

    def __init__(self) -> None:
        self.attempts = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.Response:
        self.attempts += 1
        return web.Response(status=502)


@pytest.fixture
async def download_trap(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> DownloadTrap:
    trap = DownloadTrap()
    server: TestServer = await aiohttp_server(trap.app, host="127.0.0.1")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, str(server.make_url("/")).rstrip("/"))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return trap


async def top_label(client: TestClient, url: str, model: str) -> dict[str, Any]:
    task = await wait_for_task(client, (await submit(client, [url], model=model, top_k=1))["task_id"])
    assert task["status"] == "completed", task
    assert task["model"] == model
    (item,) = task["items"]
    assert item["status"] == "succeeded", item
    return item["labels"][0]


async def test_checkpoints_serve_beside_the_default_and_missing_weights_are_unavailable(
    make_real_service: ServiceFactory, image_server: ImageServer, model_dir: Path, download_trap: DownloadTrap
) -> None:
    client = await make_real_service(models="resnet50", models_file=str(model_dir / "models.toml"))
    precision = client.server.app[SETTINGS].resolve_precision(EMBEDDED).precision  # bf16 on CPUs that have it
    listing = await (await client.get("/models")).json()
    models = {entry["name"]: entry for entry in listing["models"]}
    assert listing["default"] == "efficientnet_lite0"
    assert set(models) == {"efficientnet_lite0", "resnet50", "pets", "colours", "shapes", "broken"}
    assert models["efficientnet_lite0"] == {
        "name": "efficientnet_lite0",
        "source": "embedded",
        "architecture": "efficientnet-lite0",
        "input_size": 224,
        "num_classes": 1000,
        "precision": precision,
        "refine_margin": 0.2 if precision == "bf16" else 0.0,
        "calibration": None,  # int8 only
        "default": True,
        "weights_present": True,
    }
    assert models["pets"]["source"] == "checkpoint" and models["pets"]["architecture"] == "resnet18"
    assert models["pets"]["num_classes"] == 4 and models["pets"]["weights_present"]
    assert models["colours"]["architecture"] == "torchscript" and models["colours"]["num_classes"] == 3
    assert models["colours"]["precision"] == "fp32"  # a TorchScript file runs as it is
    assert models["shapes"]["input_size"] == 160
    assert models["resnet50"] == {
        "name": "resnet50",
        "source": "torchvision",
        "architecture": "resnet50",
        "input_size": 224,
        "num_classes": 1000,
        "precision": precision,
        "refine_margin": 0.2 if precision == "bf16" else 0.0,
        "calibration": None,
        "default": False,
        "weights_present": False,
    }

    coffee = image_server.url("/photos/coffee")
    labels = await asyncio.gather(
        *(top_label(client, coffee, name) for name in ("efficientnet_lite0", "pets", "colours", "shapes"))
    )
    assert [label["label"] for label in labels] == ["espresso", "gamma", "red", "square"]
    assert [label["class_index"] for label in labels[1:]] == [2, 0, 1]
    assert all(label["score"] > 0.99 for label in labels[1:])

    for model, code in (("resnet50", "model_unavailable"), ("resnet9000", "unknown_model")):
        response = await client.post("/submit", json={"urls": [coffee], "model": model})
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["code"] == code
        assert "resnet50" not in error["details"]["available"] and "pets" in error["details"]["available"]
        if code == "model_unavailable":  # says what to do
            assert "(download them once with --prefetch resnet50)" in error["message"]
    assert download_trap.attempts == 0


async def test_a_model_that_fails_to_load_fails_its_task_only(
    make_real_service: ServiceFactory, image_server: ImageServer, model_dir: Path
) -> None:
    client = await make_real_service(models_file=str(model_dir / "models.toml"))
    coffee = image_server.url("/photos/coffee")
    broken = await submit(client, [coffee, coffee], model="broken")
    healthy = await submit(client, [coffee])
    failed, completed = await wait_for_task(client, broken["task_id"]), await wait_for_task(client, healthy["task_id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "model_load_failed"
    assert "broken" in failed["error"]["message"]
    assert completed["status"] == "completed"
    assert completed["items"][0]["labels"][0]["label"] == "espresso"


@pytest.mark.e2e
async def test_torchvision_weights_in_the_hub_cache_are_found_and_used(
    make_real_service: ServiceFactory, image_server: ImageServer, empty_torch_home: Path, download_trap: DownloadTrap
) -> None:
    # Stand-in weights with the real file name (random values: the test checks the path, not accuracy).
    target = cache_file(weights_of(torchvision_spec("resnet18")))
    assert str(target).startswith(str(empty_torch_home))
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), target)
    try:
        client = await make_real_service()
        models = {entry["name"]: entry for entry in (await (await client.get("/models")).json())["models"]}
        assert models["resnet18"]["source"] == "torchvision" and models["resnet18"]["weights_present"]
        label = await top_label(client, image_server.url("/photos/chelsea"), "resnet18")
        assert label["label"] in imagenet_categories()

        # `--prefetch` finds it in the cache and downloads nothing.
        done = subprocess.run(
            service_command(0, "--prefetch", "resnet18"), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "already in the cache" in done.stderr
        assert download_trap.attempts == 0
    finally:
        target.unlink()


def test_workers_keep_a_bounded_lru_of_models(model_dir: Path, model_cache: Path) -> None:
    infos = {spec.name: local_info(spec) for spec in declared_specs("", str(model_dir / "models.toml"))}
    default = infos["efficientnet_lite0"]
    engine = Engine(WorkerConfig(default, "eager", threads=1, max_pixels=10**8, model_cache_dir=model_cache))
    engine.model(default)
    engine.model(infos["pets"])
    engine.model(infos["colours"])
    assert list(engine.models) == ["efficientnet_lite0", "pets", "colours"]
    engine.model(infos["pets"])  # used again: now the most recent
    engine.model(infos["shapes"])  # evicts the least recently used one that is not the default
    assert list(engine.models) == ["efficientnet_lite0", "pets", "shapes"]
    for name in ("pets", "shapes", "colours"):
        engine.model(infos[name])
    assert list(engine.models) == ["efficientnet_lite0", "shapes", "colours"]  # the default is never evicted


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[models.a]\npath = "a.pth"\nlabels = "labels.txt"\n', "needs `format`"),
        (
            '[models.a]\nformat = "state_dict"\npath = "a.pth"\nlabels = "labels.txt"\n',
            "needs the torchvision architecture",
        ),
        ('[models.a]\narchitecture = "resnet18"\npath = "a.pth"\n', "`labels` is required"),
        ('[models.a]\narchitecture = "resnet18"\npath = "a.pth"\nlabels = "nope.txt"\n', "does not exist"),
        ('[models.a]\nformat = "onnx"\npath = "a.onnx"\nlabels = "labels.txt"\n', "format must be one of"),
        ('[models.a]\nformat = "torchscript"\npath = "a"\nlabels = "labels.txt"\ncolour = 1\n', "unknown keys colour"),
        ('[models.efficientnet_lite0]\nsource = "torchvision"\narchitecture = "resnet18"\n', "declared twice"),
        ("[models", "cannot read the models file"),
    ],
)
def test_bad_model_declarations_are_refused_at_start(tmp_path: Path, toml: str, problem: str) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "models.toml").write_text(toml)
    with pytest.raises(CatalogError, match=problem):
        declared_specs("", str(tmp_path / "models.toml"))


def test_torchvision_names() -> None:
    assert torchvision_spec("resnet50") == ModelSpec("resnet50", "torchvision", "resnet50", "DEFAULT")
    spec = torchvision_spec("mobilenet_v3_large:IMAGENET1K_V2")
    assert (spec.architecture, spec.weights) == ("mobilenet_v3_large", "IMAGENET1K_V2")
    with pytest.raises(CatalogError, match="weights must be one of DEFAULT, IMAGENET1K_V1"):
        weights_of(torchvision_spec("resnet18:IMAGENET1K_V9"))
    with pytest.raises(CatalogError, match="no classification model"):
        weights_of(torchvision_spec("fasterrcnn_resnet50_fpn"))


@pytest.mark.e2e
def test_a_default_model_that_cannot_load_stops_start_up_with_a_clear_message(download_trap: DownloadTrap) -> None:
    done = subprocess.run(
        service_command(0, "--models", "resnet50", "--default-model", "resnet50"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stderr
    assert "the default model cannot load" in done.stderr
    assert "weights of model 'resnet50' are not on disk (download them once with --prefetch resnet50)" in done.stderr
    assert download_trap.attempts == 0


def test_the_default_model_must_be_declared(model_dir: Path) -> None:
    with pytest.raises(SystemExit):
        load_settings(["--default-model", "pets"])
    settings = load_settings(["--default-model", "pets", "--models-file", str(model_dir / "models.toml")])
    assert settings.default_model == "pets"
