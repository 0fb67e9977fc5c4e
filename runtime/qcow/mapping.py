"""``qemu-img map`` for qcow v1 images: one layer of diskspec.qcow2.mapping's chain model.

qemu's qcow driver reports a normal cluster as data with its host offset (no offset when the
image is encrypted), a compressed cluster as data without an offset, and an unallocated one as
nothing, so the backing layer answers there. It never refines by the host file's holes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..qcow2.image import _BACKING, _COMPRESSED
from ..qcow2.mapping import _append, _Layer, _layer, _Run

if TYPE_CHECKING:
    from .image import QcowImage

__all__ = ["QcowLayer"]


class QcowLayer:
    """A qcow v1 image as a layer of the map: its read plan, without reading any data."""

    def __init__(self, img: QcowImage) -> None:
        self.img = img
        self.length = img.size
        self.backing: _Layer | None = _layer(img.backing) if img.backing is not None else None
        self.filename = str(img.path)

    def status(self, start: int, end: int) -> list[_Run]:
        runs: list[_Run] = []
        encrypted = self.img.head.encrypted
        for kind, guest, host, length in self.img._plan(start, end - start):
            if kind == _BACKING:
                run = _Run(guest, guest + length, False, False, None, None)
            elif kind == _COMPRESSED or encrypted:
                run = _Run(guest, guest + length, True, False, None, None)
            else:
                run = _Run(guest, guest + length, True, False, host, self.filename)
            _append(runs, run)
        return runs
