"""The image object every format implements, and raw images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from .errors import FormatError

__all__ = ["Extent", "Image", "ImageError", "RawImage", "UsageError"]


class ImageError(FormatError):
    """An image cannot be opened or read as its format requires."""


class UsageError(ValueError):
    """The caller asked for something the image cannot do (a read past its end, ...)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """One run of ``qemu-img map``: guest range, where it comes from and how it reads."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    compressed: bool = False
    filename: str | None = None


class Image:
    """A disk image opened for reading (mode "r") or reading and writing ("r+")."""

    fmt: str = ""
    _owner: Image | None = None  # set on views that share the files of another image
    path: Path
    size: int
    writable: bool

    def __init__(self, path: Path, f: BinaryIO, writable: bool) -> None:
        self.path = path
        self._f = f
        self.writable = writable
        self.closed = False

    # context manager --------------------------------------------------------------------

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None and not f.closed and self._owner is None:
            f.close()

    # I/O --------------------------------------------------------------------------------

    def _check_range(self, n: int, offset: int) -> None:
        if self.closed:
            raise UsageError(f"{self.path}: image is closed")
        if n < 0 or offset < 0 or offset + n > self.size:
            raise UsageError(
                f"{self.path}: range {offset:#x}+{n:#x} is outside the image "
                f"(size {self.size:#x})"
            )

    def pread(self, n: int, offset: int) -> bytes:
        """Read ``n`` guest bytes at ``offset``."""
        self._check_range(n, offset)
        return self._read(n, offset)

    def _read(self, n: int, offset: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, data: bytes, offset: int) -> None:
        """Write guest bytes at ``offset`` (images opened with mode "r+")."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._check_range(len(data), offset)
        self._write(data, offset)

    def _write(self, data: bytes, offset: int) -> None:
        raise UsageError(f"{self.path}: writing {self.fmt} images is not supported yet")

    def write_zeroes(self, offset: int, n: int, unmap: bool = False) -> None:
        """Make a range read as zeros (formats with zero flags do better than writing)."""
        for at in range(offset, offset + n, 1 << 20):
            self.pwrite(bytes(min(1 << 20, offset + n - at)), at)

    def resize(self, new_size: int, shrink: bool = False) -> None:
        raise UsageError("Image format driver does not support resize")

    def flush(self) -> None:
        if self.writable:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush()
            finally:
                self.closed = True
                self._f.close()

    def map(self) -> list[Extent]:
        """The guest ranges and where they come from, merged like ``qemu-img map``."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"filename": str(self.path), "format": self.fmt, "virtual-size": self.size}

    # reading helpers for subclasses -------------------------------------------------------

    def _host_read(self, f: BinaryIO, n: int, offset: int) -> bytes:
        """Read host bytes; past the end of the file reads as zeros."""
        data = os.pread(f.fileno(), n, offset)
        if len(data) < n:
            data += bytes(n - len(data))
        return data


class RawImage(Image):
    """A raw image: guest offset = file offset."""

    fmt = "raw"

    def __init__(self, path: Path, f: BinaryIO, writable: bool) -> None:
        super().__init__(path, f, writable)
        self.size = os.fstat(f.fileno()).st_size

    def _read(self, n: int, offset: int) -> bytes:
        return self._host_read(self._f, n, offset)

    def _write(self, data: bytes, offset: int) -> None:
        os.pwrite(self._f.fileno(), data, offset)

    def _writable(self, n: int, offset: int) -> None:
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        self._check_range(n, offset)

    def write_zeroes(self, offset: int, n: int, unmap: bool = False) -> None:
        """Make a range read as zeros (written as zeros: a raw file has no zero flag)."""
        self._writable(n, offset)
        chunk = bytes(min(n, 1 << 20))
        for at in range(offset, offset + n, len(chunk) or 1):
            os.pwrite(self._f.fileno(), chunk[: min(len(chunk), offset + n - at)], at)

    def discard(self, offset: int, n: int) -> None:
        """Drop a range; on a raw file it then reads as zeros, as after qemu's hole punch."""
        self.write_zeroes(offset, n, unmap=True)

    def resize(self, new_size: int, shrink: bool = False) -> None:
        """``qemu-img resize -f raw``: truncate (shrinking needs ``shrink``)."""
        if not self.writable:
            raise UsageError(f"{self.path}: image is open read-only")
        if new_size < self.size and not shrink:
            raise UsageError("Use the --shrink option to perform a shrink operation.")
        os.ftruncate(self._f.fileno(), new_size)
        self.size = new_size

    def snapshots(self) -> list[Any]:
        """Raw images have no internal snapshots."""
        return []

    def create_snapshot(self, name: str) -> str:
        raise UsageError(f"Could not create snapshot '{name}': Operation not supported")

    def map(self) -> list[Extent]:
        from .qcow2.mapping import image_map

        return image_map(self)
