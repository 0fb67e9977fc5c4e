"""diskspec: qcow (v1), qcow2 (v2, v3) and FVD disk images.

The on-disk structures are generated from the Kaitai Struct specs in specs/ into
``diskspec.generated``; everything diskspec raises for bad input derives from
:class:`FormatError`.
"""

from __future__ import annotations

import os as _os

from .errors import BuildError, FormatError, StructError, TruncatedError, ValidationError
from .image import Extent, Image, ImageError, UsageError

__all__ = [
    "BuildError",
    "Extent",
    "FormatError",
    "Image",
    "ImageError",
    "StructError",
    "TruncatedError",
    "UsageError",
    "ValidationError",
    "__version__",
    "create",
    "open",
]

__version__ = "0.1.0"


def open(
    path: str | _os.PathLike[str],
    mode: str = "r",
    fmt: str | None = None,
    *,
    backing: bool = True,
    passphrase: bytes | str | None = None,
    backing_format: str | None = None,
) -> Image:
    """Open a disk image.

    ``mode`` is "r" (nothing is ever written) or "r+". ``fmt`` is "raw", "qcow2", "qcow" or
    "fvd"; None reads it from the magic, and a file with no known magic is raw.
    ``backing=False`` opens the image alone, never touching the files it names.
    ``passphrase`` unlocks an encrypted image (LUKS, or the legacy AES method).
    ``backing_format`` is the format of a qcow v1 image's backing file, which qcow v1 cannot
    record; it is raw when not given (never probed).
    """
    from .opener import open_image

    return open_image(
        path, mode, fmt, backing=backing, passphrase=passphrase, backing_format=backing_format
    )


def create(path: str | _os.PathLike[str], fmt: str, size: int | str, **options: object) -> None:
    """Create an image, with qemu-img's option names (``compat``, ``cluster_size``, ...).

    ``size`` is bytes or a string with a k, M, G, T suffix, as qemu-img takes it. Encrypted
    qcow2 and qcow images take ``encrypt.format`` (qcow2: ``luks`` or ``aes``; qcow: ``aes``)
    and the other ``encrypt.*`` options in a ``**{...}`` dict, with the key either named by
    ``encrypt.key-secret`` in ``secrets={ID: bytes}`` or given as ``passphrase=``.
    """
    from .creator import create_image

    create_image(_os.fspath(path), fmt, size, dict(options))
