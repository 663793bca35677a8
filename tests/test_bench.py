"""The benchmark's own parts still fit the code they measure (its figures are in the README;
a bench that no longer runs would leave them unchecked). No timing is asserted here."""

from __future__ import annotations

from bench.images import make_images
from bench.run_bench import offline_limit
from service.settings import Settings


def test_the_offline_limit_runs_the_worker_code() -> None:
    images = make_images(8)
    assert offline_limit(images, Settings(workers=1, threads_per_worker=1, batch_size=4)) > 0
