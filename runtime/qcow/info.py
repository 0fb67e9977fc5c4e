"""``qemu-img info`` for qcow v1 images, as qemu 7.2 prints it.

qemu's qcow driver has no format-specific block: the generic fields only, "encrypted" for AES
images, and the backing file name (never a backing format: qcow v1 cannot store one). Keys
are in qemu's QDict order (see diskspec.qcow2.info.qdict_order).
"""

from __future__ import annotations

import os
from typing import Any

from ..image import Image
from ..qcow2.info import image_items, layer_info, qdict_order
from .image import QcowImage

__all__ = ["qcow_info_chain", "qcow_layer"]


def qcow_layer(img: QcowImage, filename: str) -> dict[str, Any]:
    """One ``qemu-img info --output=json`` entry of a qcow v1 image named ``filename``."""
    head = img.head
    # qcow v1 has no dirty flag and cannot record a backing format
    items = image_items(img, filename, size=head.size, cluster_size=head.cluster_size,
                        dirty=False, encrypted=head.encrypted, backing_file=head.backing_file,
                        backing_format=None)
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
