"""``diskspec.open``: format detection from the magic, and safe backing chains.

Names of backing and data files are opaque paths resolved against the folder of the image
that names them; they are never taken as protocols or JSON. A backing file whose format the
image does not record is opened as raw, never probed (qcow.md E.1). Chains are bounded and
loops are an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, cast

from .generated import fvd, qcow, qcow2
from .image import Image, ImageError, RawImage, UsageError

__all__ = ["MAX_CHAIN", "detect_format", "open_image", "unlock_image"]

MAX_CHAIN = 16
FORMATS = ("raw", "qcow2", "qcow", "fvd")


def detect_format(f: BinaryIO) -> str:
    """The format of an image from its first bytes; anything unknown is raw."""
    f.seek(0)
    head = f.read(8)
    f.seek(0)
    if head[:4] == qcow.Header.MAGIC_CONTENTS == qcow2.Header.MAGIC_CONTENTS and len(head) == 8:
        version = int.from_bytes(head[4:8], "big")
        return "qcow" if version == 1 else "qcow2"
    if head[:4] == fvd.Header.MAGIC_CONTENTS:
        return "fvd"
    return "raw"


def _resolve(name: bytes, image: Path) -> Path:
    if b"\0" in name:
        raise ImageError(f"{image}: referenced file name contains a NUL byte")
    path = Path(os.fsdecode(name))
    return path if path.is_absolute() else image.parent / path


def open_image(
    path: str | os.PathLike[str],
    mode: str = "r",
    fmt: str | None = None,
    *,
    backing: bool = True,
    passphrase: bytes | str | None = None,
    backing_format: str | None = None,
    _seen: tuple[tuple[int, int], ...] = (),
) -> Image:
    """Open an image; see :func:`diskspec.open`.

    ``backing_format`` is the format of the backing file of a qcow v1 image, which the image
    cannot record: raw when not given, never probed.
    """
    if mode not in ("r", "r+"):
        raise UsageError(f"mode must be 'r' or 'r+', not {mode!r}")
    p = Path(path)
    # unbuffered: metadata is written with os.pwrite, so a read buffer could go stale
    f = cast(BinaryIO, p.open("r+b" if mode == "r+" else "rb", buffering=0))
    try:
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino)
        if ident in _seen:
            raise ImageError(f"{p}: backing file creates an infinite loop")
        if len(_seen) >= MAX_CHAIN:
            raise ImageError(f"{p}: backing chain is longer than {MAX_CHAIN} images")
        seen = (*_seen, ident)
        kind = fmt or detect_format(f)
        if kind not in FORMATS:
            raise ImageError(f"Unknown driver '{kind}'")
        if kind == "raw":
            return RawImage(p, f, mode == "r+")
        if kind == "qcow2":
            img = _open_qcow2(p, f, mode, backing, seen)
        elif kind == "qcow":
            img = _open_qcow(p, f, mode, backing, backing_format, seen)
        elif kind == "fvd":
            from .fvd.image import open_fvd

            img = open_fvd(p, f, mode, backing, seen)
        else:
            raise ImageError(f"{p}: {kind} images are not supported yet")
        return unlock_image(img, passphrase)
    except BaseException:
        f.close()
        raise


def unlock_image(img: Image, passphrase: bytes | str | None, *, needed: bool = False) -> Image:
    """The image with ``passphrase`` given to it (closed on failure). FVD and raw images have
    no encryption and ignore it; with ``needed``, so does any image that is not encrypted."""
    unlock = getattr(img, "unlock", None)
    if passphrase is None or unlock is None or (needed and not getattr(img, "encrypted", True)):
        return img
    key = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    try:
        unlock(key)
    except BaseException:
        img.close()
        raise
    return img


def _open_qcow2(
    p: Path, f: BinaryIO, mode: str, backing: bool, seen: tuple[tuple[int, int], ...]
) -> Image:
    from .qcow2.image import Qcow2Image

    head = Qcow2Image.load_header(f)
    if mode == "r+" and head.corrupt:
        raise ImageError(f"{p}: qcow2: Image is corrupt; cannot be opened read/write")
    base: Image | None = None
    data: BinaryIO | None = None
    try:
        if backing and head.backing_file is not None:
            base = open_image(
                _resolve(head.backing_file, p), "r", head.backing_format or "raw", _seen=seen
            )
        if head.has_data_file:
            if head.data_file is None:
                raise ImageError(f"{p}: 'data-file' is required for this image")
            if backing:
                kind = "r+b" if mode == "r+" else "rb"
                data = cast(BinaryIO, _resolve(head.data_file, p).open(kind, buffering=0))
        img = Qcow2Image(p, f, mode == "r+", head, base, data)
        if mode == "r+" and head.dirty:
            # refcounts may be stale (lazy refcounts): rebuild them, as qemu does on open
            from .qcow2.check import rebuild_refcounts

            repaired = rebuild_refcounts(img)
            if repaired.failed is not None or repaired.check_errors:
                raise ImageError(f"{p}: Could not repair dirty image: Input/output error")
        return img
    except BaseException:
        if base is not None:
            base.close()
        if data is not None:
            data.close()
        raise


def _open_qcow(
    p: Path,
    f: BinaryIO,
    mode: str,
    backing: bool,
    backing_format: str | None,
    seen: tuple[tuple[int, int], ...],
) -> Image:
    from .qcow.image import QcowImage

    head = QcowImage.load_header(f, p)
    base: Image | None = None
    fmt = backing_format or "raw"  # qcow v1 records no backing format: never probe
    try:
        if backing and head.backing_file is not None:
            base = open_image(_resolve(head.backing_file, p), "r", fmt, _seen=seen)
        return QcowImage(p, f, mode == "r+", head, base, fmt if head.backing_file else None)
    except BaseException:
        if base is not None:
            base.close()
        raise
