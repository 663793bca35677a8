"""What a job classifies, one input at a time and always in the same order (a resumed job
finds each input at the index it had): image arguments, then the lines or the CSV column of
`--urls-file`. An argument that is a directory stands for its image files, directly in it,
or with `-r` in the whole tree (walked in sorted order). Nothing is read ahead: a list of
100,000 URLs or files is never held at once."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

Kind = Literal["url", "file", "invalid"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The first bytes of the image formats the service decodes.
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class InputError(Exception):
    """An input that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Source:
    index: int  # the input's place in the job: the same in every run of the same command
    value: str  # a URL, or a file's path
    kind: Kind = "url"  # "invalid": a line of the URLs file that is not an http(s) URL

    @property
    def is_url(self) -> bool:
        return self.kind == "url"


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def is_image_file(path: Path) -> bool:
    """By extension, else by content (a photo saved without one)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    return head.startswith(MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def sources(images: Sequence[str], urls_file: str | None, url_column: str | None, recursive: bool) -> Iterator[Source]:
    """Every input of the job, numbered from 0."""
    for index, (value, kind) in enumerate(_values(images, urls_file, url_column, recursive)):
        yield Source(index, value, kind)


def _values(
    images: Sequence[str], urls_file: str | None, url_column: str | None, recursive: bool
) -> Iterator[tuple[str, Kind]]:
    for image in images:
        if is_url(image):
            yield image, "url"
            continue
        path = Path(image)
        if path.is_dir():
            yield from ((str(found), "file") for found in _image_files(path, recursive))
        elif path.is_file():
            yield image, "file"
        else:
            raise InputError(f"{image}: no such file, and not an http(s) URL")
    if urls_file is not None:
        yield from ((url, "url" if is_url(url) else "invalid") for url in _urls(urls_file, url_column))


def _image_files(directory: Path, recursive: bool) -> Iterator[Path]:
    if not recursive:
        yield from (path for path in sorted(directory.iterdir()) if path.is_file() and is_image_file(path))
        return
    for root, dirs, files in os.walk(directory):
        dirs.sort()  # walked in this order, so every run numbers the files alike
        for name in sorted(files):
            path = Path(root, name)
            if is_image_file(path):
                yield path


def _urls(urls_file: str, url_column: str | None) -> Iterator[str]:
    """The URLs of a text file (one per line; blank lines and `#` comments skipped) or of one
    column of a CSV file (`url_column`; by the `.csv` extension); `-` is standard input."""
    handle: IO[str] = sys.stdin if urls_file == "-" else _open(urls_file)
    try:
        if url_column is not None or urls_file.lower().endswith(".csv"):
            column = url_column or "url"
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise InputError(f"{urls_file}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
            for row in reader:
                value = (row[column] or "").strip()
                if value:
                    yield value
            return
        for line in handle:
            value = line.strip()
            if value and not value.startswith("#"):
                yield value
    finally:
        if handle is not sys.stdin:
            handle.close()


def _open(path: str) -> IO[str]:
    try:
        return open(path, newline="", encoding="utf-8")  # closed by the generator
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
