"""Cluster compression of qcow and qcow2: raw deflate (12-bit window) and zstd, bounded."""

from __future__ import annotations

import io
import zlib

import zstandard

from .errors import FormatError

__all__ = [
    "CompressedDataError",
    "compress_deflate",
    "compress_zstd",
    "inflate_cluster",
    "unzstd_cluster",
]

# qemu deflates with a 12-bit window and no zlib header; reading with the largest window is
# lenient and still bounded by the output size.
_WRITE_WBITS = -12
_READ_WBITS = -15


class CompressedDataError(FormatError):
    """A compressed cluster does not decompress to exactly one cluster (qemu: EIO)."""


def inflate_cluster(data: bytes, cluster_size: int, where: str) -> bytes:
    """Raw deflate to exactly ``cluster_size`` bytes; trailing input is ignored."""
    d = zlib.decompressobj(_READ_WBITS)
    try:
        out = d.decompress(data, cluster_size)
    except zlib.error as exc:
        raise CompressedDataError(f"{where}: deflate data is corrupt ({exc})") from exc
    if len(out) != cluster_size:
        raise CompressedDataError(
            f"{where}: deflate data gives {len(out)} bytes, expected {cluster_size}"
        )
    return out


def unzstd_cluster(data: bytes, cluster_size: int, where: str) -> bytes:
    """zstd (one or more frames) to exactly ``cluster_size`` bytes; output is bounded."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        out = reader.read(cluster_size)
        while len(out) < cluster_size:
            more = reader.read(cluster_size - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as exc:
        raise CompressedDataError(f"{where}: zstd data is corrupt ({exc})") from exc
    if len(out) != cluster_size:
        raise CompressedDataError(
            f"{where}: zstd data gives {len(out)} bytes, expected {cluster_size}"
        )
    return bytes(out)


def compress_deflate(data: bytes) -> bytes:
    """Raw deflate as qemu writes it (readable by qemu's 12-bit-window inflate)."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WRITE_WBITS, 9)
    return c.compress(data) + c.flush()


def compress_zstd(data: bytes) -> bytes:
    """One zstd frame, as qemu's compressor writes it."""
    return zstandard.ZstdCompressor().compress(data)
