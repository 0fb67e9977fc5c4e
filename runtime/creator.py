"""``diskspec.create``: dispatch on the format, with qemu-img's option names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .image import UsageError
from .qcow2.create import create_qcow2, parse_size

__all__ = ["create_image"]


def _create_raw(path: Path, size: int | str, options: dict[str, Any]) -> None:
    n = parse_size(size)
    mode = str(options.pop("preallocation", "off"))
    if options:
        raise UsageError(f"Invalid parameter '{sorted(options)[0]}'")
    with path.open("wb") as f:
        f.truncate(n)
        if mode == "falloc" and n:
            os.posix_fallocate(f.fileno(), 0, n)
        elif mode == "full":
            zeros = bytes(1 << 20)
            for at in range(0, n, len(zeros)):
                f.write(zeros[: min(len(zeros), n - at)])
        elif mode != "off":
            raise UsageError(f"Parameter 'preallocation' does not accept value '{mode}'")


def create_image(path: str, fmt: str, size: int | str, options: dict[str, Any]) -> None:
    p = Path(path)
    if fmt == "qcow2":
        create_qcow2(p, size, **options)
    elif fmt == "qcow":
        from .qcow.create import create_qcow

        create_qcow(p, size, **options)
    elif fmt == "raw":
        _create_raw(p, size, options)
    elif fmt == "fvd":
        from .fvd.create import create_fvd

        create_fvd(p, size, **options)
    else:
        raise UsageError(f"creating {fmt} images is not supported yet")
