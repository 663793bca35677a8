"""Hostile or odd bodies through the whole service: each ends in a clear per-item outcome."""

from __future__ import annotations

import io
import time

from PIL import Image

from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


async def test_hostile_and_unusual_images(
    make_real_service: ServiceFactory, image_server: ImageServer, photos: dict[str, bytes]
) -> None:
    coffee = Image.open(io.BytesIO(photos["coffee"])).convert("RGB")
    rocket = Image.open(io.BytesIO(photos["rocket"])).convert("RGB").resize(coffee.size)
    sixteen_bit = Image.open(io.BytesIO(photos["coffee"])).convert("L").point(lambda v: v * 256, "I").convert("I;16")
    image_server.files.update(
        {
            # 4 Mpx of one colour: a few KB of PNG, over this service's 1 Mpx cap but far
            # under Pillow's own bomb check (2 x 89 Mpx), so only our cap can stop it.
            "bomb.png": encode(Image.new("L", (2000, 2000)), "PNG"),
            "truncated.jpg": photos["coffee"][: len(photos["coffee"]) * 2 // 3],
            "text.jpg": b"<html>not an image</html>",
            "cmyk.jpg": encode(coffee.convert("CMYK"), "JPEG", quality=90),
            "16bit.png": encode(sixteen_bit, "PNG"),
            "animated.gif": encode(coffee, "GIF", save_all=True, append_images=[rocket], duration=100, loop=0),
            "coffee.webp": encode(coffee, "WEBP", quality=90),
        }
    )
    client = await make_real_service(max_image_pixels=1_000_000)
    names = ["bomb.png", "truncated.jpg", "text.jpg", "cmyk.jpg", "16bit.png", "animated.gif", "coffee.webp"]
    accepted = await submit(client, [image_server.url(f"/file/{name}") for name in names])
    task = await wait_for_task(client, accepted["task_id"])

    outcomes = {
        name: item["error"]["code"] if item["error"] else item["labels"][0]["label"]
        for name, item in zip(names, task["items"], strict=True)
    }
    assert outcomes["bomb.png"] == "image_too_large"
    assert outcomes["truncated.jpg"] == "not_an_image"
    assert outcomes["text.jpg"] == "not_an_image"  # served as image/jpeg: the bytes decide
    assert outcomes["cmyk.jpg"] == "espresso"
    assert task["items"][4]["status"] == "succeeded"  # 16-bit greyscale is classified
    assert outcomes["animated.gif"] == "espresso"  # the first frame, not the rocket
    assert outcomes["coffee.webp"] == "espresso"
    assert task["status"] == "completed"


async def test_a_server_dripping_bytes_is_cut_off_by_the_total_timeout(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(download_timeout=2.0, read_timeout=1.0)
    started = time.monotonic()
    task = await wait_for_task(client, (await submit(client, [image_server.url("/drip")]))["task_id"])
    assert task["items"][0]["error"]["code"] == "timeout"
    assert time.monotonic() - started < 10  # the drip would go on for a minute
