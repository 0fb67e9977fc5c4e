"""``diskspec fvd prefetch FILE``: pull the whole base into the image (fvd.md 4.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from ..image import UsageError

__all__ = ["run"]


def run(
    command: str, filename: str, progress: Callable[[int], Callable[[int], None]], out: TextIO
) -> int:
    """Run an fvd subcommand; ``progress(total)`` returns what to call with each step."""
    from ..opener import open_image
    from .image import FvdImage

    if command != "prefetch":
        raise UsageError(f"unknown fvd command {command!r}")
    with open_image(filename, "r+") as img:
        if not isinstance(img, FvdImage):
            raise UsageError(f"{filename}: not an FVD image (format {img.fmt})")
        copied = img.prefetch(progress(img.base_size))
    out.write(f"Prefetched {copied} bytes; the base image is no longer needed.\n")
    return 0
