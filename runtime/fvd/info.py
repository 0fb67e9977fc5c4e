"""``info`` and ``map`` of FVD images (qemu-img has no FVD: a qemu-like layout, FVD's own
fields under "format-specific")."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..image import Extent
from ..qcow2.image import _BACKING, _DATA, _ZERO
from ..qcow2.info import _path_combine, layer_info, qdict_order
from ..qcow2.mapping import _emit
from .image import text_field

if TYPE_CHECKING:
    from .image import FvdImage

__all__ = ["fvd_info", "fvd_info_chain", "fvd_map"]


def fvd_info(img: FvdImage, filename: str | None = None) -> dict[str, Any]:
    h = img.h
    name = str(img.path) if filename is None else filename
    items: list[tuple[str, Any]] = [
        ("filename", name),
        ("format", "fvd"),
        ("dirty-flag", h.clean_shutdown == 0),
        ("actual-size", os.fstat(img._f.fileno()).st_blocks * 512),
        ("virtual-size", img.size),
    ]
    if img.base_name:
        items += [
            ("backing-filename", img.base_name),
            ("full-backing-filename", _path_combine(name, img.base_name)),
        ]
        if img.backing_format:
            items.append(("backing-filename-format", img.backing_format))
    data: dict[str, Any] = {
        "block-size": h.block_size,
        "base-img-size": h.len_base_img,
        "compact-image": bool(h.compact_image),
        "chunk-size": h.chunk_size,
        "storage-grow-unit": h.storage_grow_unit,
        "journal-size": h.len_journal,
        "all-data-in-fvd-img": bool(h.all_data_in_fvd_img),
        "clean-shutdown": bool(h.clean_shutdown),
        "copy-on-read": bool(h.copy_on_read),
        "need-zero-init": bool(h.need_zero_init),
        "metadata-size": h.len_metadata,
    }
    if text_field(h.data_file):
        data["data-file"] = text_field(h.data_file)
        data["data-file-format"] = text_field(h.data_file_fmt) or "raw"
    if text_field(h.add_storage_cmd):
        data["add-storage-cmd"] = text_field(h.add_storage_cmd)
    items.append(("format-specific", {"type": "fvd", "data": data}))
    return qdict_order(items)


def fvd_info_chain(img: FvdImage) -> list[dict[str, Any]]:
    """``info --backing-chain``: this image, then each open base layer."""
    top = fvd_info(img)
    chain = [top]
    below = img.backing
    name = top.get("full-backing-filename")
    if below is None:
        return chain
    info_chain = getattr(below, "info_chain", None)
    if info_chain is not None:
        rest: list[dict[str, Any]] = info_chain()
        rest[0]["filename"] = name or rest[0]["filename"]
        return chain + rest
    return [*chain, layer_info(below, name or str(below.path))]


def fvd_map(img: FvdImage) -> list[Extent]:
    """Guest ranges: FVD data (depth 0, with host offsets in the data storage; its holes are
    zero), EMPTY chunks (zero), and base ranges through the base's own map (depth + 1)."""
    out: list[Extent] = []
    if not img.size:
        return out
    storage = img._storage()
    base_map: list[Extent] | None = None
    for kind, guest, host, length in img._plan(0, img.size):
        if kind == _DATA:  # holes of the data storage read as zeros
            for h0, h1, is_data in storage.extents(host, host + length):
                _emit(out, Extent(guest + h0 - host, h1 - h0, 0, True, not is_data, is_data,
                                  h0, filename=storage.name))
        elif kind == _ZERO:
            _emit(out, Extent(guest, length, 0, True, True, False))
        elif kind == _BACKING:
            base = img.backing
            pos, end = guest, guest + length
            if base is not None:
                if base_map is None:
                    base_map = base.map()
                for e in base_map:
                    s, t = max(pos, e.start), min(end, e.start + e.length)
                    if s >= t:
                        continue
                    offset = None if e.offset is None else e.offset + (s - e.start)
                    _emit(out, Extent(s, t - s, e.depth + 1, e.present, e.zero, e.data,
                                      offset, e.compressed, e.filename))
                pos = max(pos, min(end, base.size))
            if pos < end:
                _emit(out, Extent(pos, end - pos, 0, False, True, False))
    return out
