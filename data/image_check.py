"""One image file checked the way DALI's reader would meet it: ``check_image(path, depth=...)``
returns the :class:`Problem` with the file, or None (:mod:`.check` walks a whole dataset with it).

How deep a file is looked at (``depth``):

- ``header``: the first 32 bytes must start like a format DALI decodes (JPEG, PNG, BMP, TIFF, PNM,
  JPEG 2000, WebP). Finds zero-byte, unreadable, non-image and unsupported files.
- ``quick`` (default; the training pre-flight): ``header`` plus the end of the file (its last 64
  bytes): a JPEG must end with its end-of-image marker ``FF D9`` (zero padding after it allowed),
  a PNG with its ``IEND`` chunk. Two small reads per file. A file whose end is not as expected is
  decoded with Pillow and is valid only if it decodes completely (some JPEGs carry data after the
  marker); the rare BMP/TIFF/PNM/JPEG 2000/WebP files are always decoded. Finds every truncated
  file, not corruption inside a file whose end is intact.
- ``full``: Pillow decodes every image completely (50-200x slower than ``quick``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

DEPTHS = ("header", "quick", "full")
#: Kinds of problems that are one unreadable file (what ``data.skip_unreadable`` may leave out).
FILE_KINDS = ("zero-byte", "unreadable", "missing-file", "not-an-image", "unsupported",
              "truncated", "undecodable")
_HEAD, _TAIL = 32, 64
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@dataclass(frozen=True)
class Problem:
    """One thing a check found: an unreadable file, or a structural fault of a dataset."""

    kind: str    # one of FILE_KINDS, or missing-split, no-classes, empty-class, unknown-class,
    #              bad-list, shard
    path: str
    detail: str

    def format(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"

    @property
    def is_file(self) -> bool:
        """One unreadable file (as opposed to a structural fault of the dataset)."""
        return self.kind in FILE_KINDS


_DALI_FORMATS = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"),
                 (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                 (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"))
_OTHER_FORMATS = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
                  (b"\x00\x00\x01\x00", "ICO"), (b"qoif", "QOI"))


def _sniff(head: bytes) -> str | None:
    """The DALI-decodable format ``head`` starts, or None."""
    for magic, name in _DALI_FORMATS:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PNM"
    return None


def _sniff_other(head: bytes) -> str | None:
    """An image format DALI does not decode, or None."""
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"msf1"):
        return "HEIF/AVIF"
    return None


def _ends_well(fmt: str, tail: bytes) -> bool:
    if fmt == "JPEG":
        return tail.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return tail.endswith(_PNG_END)
    return False  # other formats are decoded


def check_image(path: str | Path, *, depth: str = "quick") -> Problem | None:
    """The problem with one image file, or None when it passes the check of ``depth``."""
    if depth not in DEPTHS:
        raise ValueError(f"depth {depth!r}: expected one of {DEPTHS}")
    path = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return Problem("zero-byte", path, "empty file (0 bytes)")
            head = handle.read(_HEAD)
            tail = head
            if depth == "quick" and size > _HEAD:
                handle.seek(max(size - _TAIL, 0))
                tail = handle.read(_TAIL)
    except FileNotFoundError:
        return Problem("missing-file", path, "does not exist")
    except OSError as error:
        return Problem("unreadable", path, error.strerror or str(error))
    fmt = _sniff(head)
    if fmt is None:
        other = _sniff_other(head)
        if other is not None:
            return Problem("unsupported", path, f"a {other} image: DALI does not decode {other}")
        return Problem("not-an-image", path,
                       f"not an image ({size} bytes, starts with {head[:16]!r})")
    if depth == "header" or (depth == "quick" and _ends_well(fmt, tail)):
        return None
    return _decode(path, fmt, size, tail if depth == "quick" else None)


def _decode(path: str, fmt: str, size: int, tail: bytes | None) -> Problem | None:
    from PIL import Image, UnidentifiedImageError, features

    if fmt == "JPEG 2000" and not features.check_codec("jpg_2000"):
        return None  # Pillow cannot look deeper than the header here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning and the like
            with Image.open(path) as image:
                image.load()
                width, height = image.size
    except UnidentifiedImageError:
        return Problem("undecodable", path, f"starts like {fmt} but is not a readable {fmt} "
                                            f"image ({size} bytes)")
    except Exception as error:  # truncated / corrupt data: OSError, SyntaxError, ValueError...
        message = " ".join(f"{type(error).__name__}: {error}".split())
        if tail is None:
            with open(path, "rb") as handle:
                handle.seek(max(size - _TAIL, 0))
                tail = handle.read(_TAIL)
        if (fmt in ("JPEG", "PNG") and not _ends_well(fmt, tail)) or "truncated" in message:
            marker = "end-of-image marker" if fmt == "JPEG" else "end marker"
            return Problem("truncated", path, f"{size} bytes without the {fmt} {marker}; "
                                              f"decoding stops ({message})")
        return Problem("undecodable", path, message)
    if width < 1 or height < 1:
        return Problem("undecodable", path, f"image is {width}x{height}")
    return None
