"""``qemu-img info`` for qcow v1 images, as qemu 7.2 prints it.

qemu's qcow driver has no format-specific block: the generic fields only, "encrypted" for AES
images, and the backing file name (never a backing format: qcow v1 cannot store one). Keys
are in qemu's QDict order (see diskspec.qcow2.info.qdict_order).
"""

from __future__ import annotations

import os
from typing import Any

from ..image import Image
from ..qcow2.info import _actual_size, _path_combine, _text, layer_info, qdict_order
from .image import QcowImage

__all__ = ["qcow_info_chain", "qcow_layer"]


def qcow_layer(img: QcowImage, filename: str) -> dict[str, Any]:
    """One ``qemu-img info --output=json`` entry of a qcow v1 image named ``filename``."""
    head = img.head
    items: list[tuple[str, Any]] = [
        ("filename", filename),
        ("format", "qcow"),
        ("dirty-flag", False),
        ("actual-size", _actual_size(img)),
        ("virtual-size", head.size),
        ("cluster-size", head.cluster_size),
    ]
    if head.encrypted:
        items.append(("encrypted", True))
    if head.backing_file:
        backing = _text(head.backing_file)
        items += [
            ("backing-filename", backing),
            ("full-backing-filename", _path_combine(filename, backing)),
        ]
    return qdict_order(items)


def qcow_info_chain(img: QcowImage) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain --output=json``: each layer named by the full backing
    file name of the layer above, as qemu opens it."""
    top = qcow_layer(img, str(img.path))
    chain = [top]
    info = top
    layer: Image | None = img.backing
    while layer is not None:
        info = layer_info(layer, info.get("full-backing-filename", os.fspath(layer.path)))
        chain.append(info)
        layer = getattr(layer, "backing", None)
    return chain
