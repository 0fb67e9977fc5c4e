"""Where an FVD image keeps its data: the image file itself, a raw data file, or a data file of
another format (``data_file_fmt``, fvd.md rule 6), behind one small interface.

Offsets are those of the data region as the header lays it out; a data file of another format
is addressed through its guest offsets, so it grows by resize where a raw file grows by
truncate.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from ..image import Extent, Image
from .consts import SECTOR

__all__ = ["FileStorage", "ImageStorage", "Storage"]


class Storage:
    """The data storage of one FVD image."""

    name: str

    def read(self, n: int, offset: int) -> bytes:
        """``n`` bytes at ``offset``; past the end reads as zeros."""
        raise NotImplementedError

    def read_into(self, view: memoryview, offset: int) -> None:
        view[:] = self.read(len(view), offset)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise NotImplementedError

    def length(self) -> int:
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(from, to, holds data) runs of [start, end): the rest reads as zeros."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class FileStorage(Storage):
    """A plain file: the FVD image itself or a raw data file."""

    def __init__(self, f: BinaryIO, owned: bool) -> None:
        self.f = f
        self.fd = f.fileno()
        self.owned = owned
        self.name = str(f.name)

    def read(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        return data + bytes(n - len(data)) if len(data) < n else data

    def read_into(self, view: memoryview, offset: int) -> None:
        got = os.preadv(self.fd, [view], offset)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def length(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, n: int) -> None:
        os.ftruncate(self.fd, n)

    def sync(self) -> None:
        os.fsync(self.fd)

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        from ..qcow2.mapping import _file_extents

        return iter(_file_extents(self.fd, start, end))

    def close(self) -> None:
        if self.owned:
            self.f.close()


def _round_up(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


class ImageStorage(Storage):
    """A data file in another format (qcow2, say), read and written through its guest
    offsets; it grows and shrinks by resize."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.name = str(img.path)
        self._map: list[Extent] | None = None

    def read(self, n: int, offset: int) -> bytes:
        size = self.img.size
        if offset >= size or n <= 0:
            return bytes(max(n, 0))
        got = self.img.pread(min(n, size - offset), offset)
        return got + bytes(n - len(got))

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        end = offset + len(data)
        if end > self.img.size:
            self.img.resize(_round_up(end))
        self.img.pwrite(bytes(data), offset)
        self._map = None

    def length(self) -> int:
        return self.img.size

    def truncate(self, n: int) -> None:
        n = _round_up(n)
        if n != self.img.size:
            self.img.resize(n, shrink=True)
            self._map = None

    def sync(self) -> None:
        self.img.flush()

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        if self._map is None:
            self._map = self.img.map()
        pos = start
        for e in self._map:
            lo, hi = max(pos, e.start), min(end, e.start + e.length)
            if lo >= hi:
                continue
            yield lo, hi, e.data and not e.zero
            pos = hi
        if pos < end:
            yield pos, end, False

    def close(self) -> None:
        self.img.close()
