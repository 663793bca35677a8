"""What a job classifies, one input at a time and always in the same order (a resumed job
finds each input at the index it had): image arguments, then the lines or the CSV column of
`--urls-file`. An argument that is a directory stands for its image files, directly in it,
or with `-r` in the whole tree (walked in sorted order). Nothing is read ahead: a list of
100,000 URLs or files is never held at once."""

from __future__ import annotations

import csv
import errno
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
    problem: str = ""  # why an invalid one is

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


def sources(
    images: Sequence[str],
    urls_file: str | None,
    url_column: str | None,
    recursive: bool,
    encoding: str = "utf-8",
) -> Iterator[Source]:
    """Every input of the job, numbered from 0; `encoding`: the URLs file's."""
    for index, (value, kind, problem) in enumerate(_values(images, urls_file, url_column, recursive, encoding)):
        yield Source(index, value, kind, problem)


def _values(
    images: Sequence[str], urls_file: str | None, url_column: str | None, recursive: bool, encoding: str
) -> Iterator[tuple[str, Kind, str]]:
    for image in images:
        if is_url(image):
            yield image, "url", ""
            continue
        path = Path(image)
        if path.is_dir():
            yield from ((str(found), "file", "") for found in _image_files(path, recursive))
        elif path.is_file():
            yield image, "file", ""
        else:
            raise InputError(f"{image}: no such file, and not an http(s) URL")
    if urls_file is not None:
        for line, url in _urls(urls_file, url_column, encoding):
            if _undecodable(url):  # shown with U+FFFD where the bytes were
                shown = url.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                yield shown, "invalid", f"line {line} is not valid {encoding} (see --encoding)"
            elif is_url(url):
                yield url, "url", ""
            else:
                yield url, "invalid", "not an http(s) URL"


def _undecodable(text: str) -> bool:
    """Bytes the encoding could not read (kept as lone surrogates by `surrogateescape`)."""
    return any("\udc80" <= character <= "\udcff" for character in text)


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


def _urls(urls_file: str, url_column: str | None, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, URL) of a text file (one per line; blank lines and `#` comments skipped)
    or of one column of a CSV file (`url_column`; by the `.csv` extension); `-` is standard
    input. Read in `encoding`, a byte-order mark dropped; bytes it cannot read stay in their
    line (as lone surrogates), so that one bad line fails alone."""
    handle = _open(urls_file, encoding)
    try:
        if url_column is not None or urls_file.lower().endswith(".csv"):
            column = url_column or "url"
            reader = csv.DictReader(_without_mark(handle))
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise InputError(f"{urls_file}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
            for row in reader:
                value = (row[column] or "").strip()
                if value:
                    yield reader.line_num, value
            return
        for number, line in enumerate(_without_mark(handle), start=1):
            value = line.strip()
            if value and not value.startswith("#"):
                yield number, value
    finally:
        handle.close()


def _without_mark(lines: Iterator[str]) -> Iterator[str]:
    """The lines, the first without a byte-order mark (Windows editors write one)."""
    for number, line in enumerate(lines):
        yield line.removeprefix("\ufeff") if number == 0 else line


def _open(path: str, encoding: str) -> IO[str]:
    """The file (or a copy of standard input's descriptor) as text; closed by the generator."""
    try:
        if Path(path).is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        raw = os.dup(sys.stdin.fileno()) if path == "-" else os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    return open(raw, encoding=encoding, errors="surrogateescape", newline="")
