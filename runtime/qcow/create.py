"""Creating qcow v1 images byte for byte as ``qemu-img create -f qcow`` (7.2) writes them.

The layout (qcow.md A.5): the 48-byte header, the backing file name right after it, then the
L1 table at the next multiple of 8, zero-filled in whole 512-byte sectors. Without a backing
file clusters are 4 KiB with 4 KiB L2 tables; with one, 512-byte clusters (so that qemu never
copies unmodified sectors) with 32 KiB L2 tables. The AES key is not stored: an encrypted
image differs only by crypt_method. The header is built by the generated class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..crypto import SECTOR_SIZE
from ..generated import qcow as qv
from ..image import UsageError
from ..qcow2.create import MAX_BACKING_NAME, parse_size
from .header import INT64_MAX, MAX_L1_ENTRIES
from .masks import H

__all__ = ["create_qcow"]

# qemu's choices (block/qcow.c): log2 of the cluster size and of the entries per L2 table
PLAIN_BITS = (12, 9)
BACKED_BITS = (9, 12)
BACKING_FORMATS = ("raw", "qcow2", "qcow", "fvd")
_L1_ALIGN = 8


def _on_off(value: Any, name: str) -> bool:
    text = str(value).lower() if not isinstance(value, bool) else ("on" if value else "off")
    if text not in ("on", "off"):
        raise UsageError(f"Parameter '{name}' expects 'on' or 'off'")
    return text == "on"


def _encrypted(options: dict[str, Any], passphrase: bytes | str | None,
               secrets: Mapping[str, bytes] | None) -> bool:
    """Whether to encrypt (AES), checked as qemu checks the encrypt options."""
    legacy = options.pop("encryption", None)
    fmt = options.pop("encrypt.format", None)
    secret = options.pop("encrypt.key-secret", None)
    if legacy is not None and fmt is not None:
        raise UsageError("'encrypt.format' and its alias 'encryption' can't be used at the "
                         "same time")
    on = legacy is not None and _on_off(legacy, "encryption")
    if fmt is not None:
        if str(fmt) != "aes":
            raise UsageError("Unsupported encryption format")
        on = True
    if not on:
        return False
    if passphrase is not None:
        return True
    if secret is None:
        raise UsageError("Parameter 'encrypt.key-secret' is required for cipher")
    if secrets is None or str(secret) not in secrets:
        raise UsageError(f"No secret with id '{secret}'")
    return True


def create_qcow(
    path: Path,
    size: int | str,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    passphrase: bytes | str | None = None,
    secrets: Mapping[str, bytes] | None = None,
    **options: Any,
) -> None:
    """``qemu-img create -f qcow -o OPTIONS PATH SIZE``.

    Options are qemu's: ``backing_file``, ``backing_fmt`` (checked, but qcow v1 cannot store
    it), ``encryption=on`` or ``encrypt.format=aes`` with ``encrypt.key-secret=ID`` (looked up
    in ``secrets``) or a ``passphrase``.
    """
    opts = dict(options)
    n = parse_size(opts.pop("size", size))
    encrypt = _encrypted(opts, passphrase, secrets)
    if opts:
        raise UsageError(f"Invalid parameter '{sorted(opts)[0]}'")
    if n > INT64_MAX:
        raise UsageError(
            f"Invalid image size specified. Must be between 0 and {INT64_MAX}."
        )
    n = -(-n // SECTOR_SIZE) * SECTOR_SIZE
    if n == 0:
        raise UsageError("Image size is too small, cannot be zero length")
    name = os.fsencode(backing_file) if backing_file else b""
    if name:
        if not backing_fmt:
            raise UsageError("Backing file specified without backing format")
        if backing_fmt not in BACKING_FORMATS:
            raise UsageError(f"Unknown driver '{backing_fmt}'")
        if len(name) > MAX_BACKING_NAME:
            raise UsageError("Backing file name too long")
    cluster_bits, l2_bits = BACKED_BITS if name else PLAIN_BITS
    l1_offset = -(-(H.SIZE + len(name)) // _L1_ALIGN) * _L1_ALIGN
    header = qv.Header(
        version=1,
        ofs_backing_file_name=H.SIZE if name else 0,
        len_backing_file_name=len(name),
        mtime=0,
        len_virtual_disk=n,
        cluster_bits=cluster_bits,
        l2_bits=l2_bits,
        padding=bytes(2),
        crypt_method=qv.CryptMethod.AES if encrypt else qv.CryptMethod.NONE,
        ofs_l1_table=l1_offset,
    )
    l1_size = header.num_l1_entries
    if l1_size > MAX_L1_ENTRIES:
        raise UsageError("Image too large")
    l1_bytes = -(-8 * l1_size // SECTOR_SIZE) * SECTOR_SIZE
    head = header.build() + name
    with path.open("wb") as f:
        fd = f.fileno()
        os.pwrite(fd, head + bytes(l1_offset - len(head)), 0)
        zeros = bytes(min(l1_bytes, 1 << 20))
        for at in range(0, l1_bytes, len(zeros)):
            os.pwrite(fd, zeros[: min(len(zeros), l1_bytes - at)], l1_offset + at)
        os.fsync(fd)
