"""The semantic qcow2 header: the generated raw layout checked against qemu's open-time rules.

The raw structures (header, extensions) come from diskspec.generated.qcow2; this module adds
the cross-field rules a reader must enforce before trusting any offset (qcow.md B.1 to B.3,
D.1) and gathers the extensions into named attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import FormatError
from ..generated import qcow2 as q

__all__ = ["Qcow2Header", "UnsupportedFeatureError", "load_header"]

INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
MAX_BACKING_FORMAT = 15  # qemu: len >= 16 is "too large"
MIN_EXTENDED_L2_CLUSTER_BITS = 14  # subclusters must be >= 512 bytes


class Qcow2HeaderError(FormatError):
    """A qcow2 header qemu would refuse to open."""


class UnsupportedFeatureError(Qcow2HeaderError):
    """Incompatible feature bits this reader does not know."""


def _mask(flag: type[q.IncompatibleFeature] | type[q.AutoclearFeature]) -> int:
    value = 0
    for member in flag:
        value |= int(member)
    return value


SUPPORTED_INCOMPATIBLE = _mask(q.IncompatibleFeature)
KNOWN_AUTOCLEAR = _mask(q.AutoclearFeature)


@dataclass(slots=True)
class Qcow2Header:
    """What a qcow2 reader needs from cluster 0, validated."""

    raw: q.Qcow2
    version: int
    cluster_bits: int
    cluster_size: int
    size: int
    l1_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: q.IncompatibleFeature
    compatible: q.CompatibleFeature
    autoclear: q.AutoclearFeature
    refcount_order: int
    header_length: int
    compression_type: int
    extended_l2: bool
    l2_bits: int
    crypt_method: int
    backing_file: bytes | None = None
    backing_format: str | None = None
    data_file: bytes | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: q.ExtBitmaps | None = None
    encryption: q.ExtFullDiskEncryption | None = None
    unknown_extensions: list[q.HeaderExtension] = field(default_factory=list)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & q.IncompatibleFeature.EXTERNAL_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear & q.AutoclearFeature.DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & q.IncompatibleFeature.DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & q.IncompatibleFeature.CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible & q.CompatibleFeature.LAZY_REFCOUNTS)

    @property
    def l1_shift(self) -> int:
        """log2 of the guest bytes one L1 entry covers."""
        return self.cluster_bits + self.l2_bits


def _fail(message: str) -> Qcow2HeaderError:
    return Qcow2HeaderError(f"qcow2 header: {message}")


def _unsupported(head: Qcow2Header) -> UnsupportedFeatureError:
    unknown = int(head.incompatible) & ~SUPPORTED_INCOMPATIBLE
    names = []
    rest = unknown
    for bit in range(64):
        if unknown >> bit & 1 and (int(q.FeatureType.INCOMPATIBLE), bit) in head.feature_names:
            names.append(head.feature_names[(int(q.FeatureType.INCOMPATIBLE), bit)])
            rest &= ~(1 << bit)
    if rest:
        names.append(f"Unknown incompatible feature: {rest:x}")
    return UnsupportedFeatureError(
        f"qcow2 header.incompatible_features at offset 0x48: Unsupported qcow2 feature(s): "
        f"{', '.join(names)}"
    )


def _collect_extensions(head: Qcow2Header) -> None:
    for ext in head.raw.extension_area.extensions:
        data = ext.data
        if isinstance(data, q.ExtBackingFileFormat):
            if len(data.name) > MAX_BACKING_FORMAT:
                raise _fail(f"backing file format extension: len={len(data.name)} too large")
            head.backing_format = data.name.decode("ascii", "replace")
        elif isinstance(data, q.ExtFeatureNameTable):
            for entry in data.entries:
                name = entry.name.split(b"\0", 1)[0].decode("utf-8", "replace")
                head.feature_names[(int(entry.feature_type), entry.bit)] = name
        elif isinstance(data, q.ExtBitmaps):
            head.bitmaps = data
        elif isinstance(data, q.ExtFullDiskEncryption):
            head.encryption = data
        elif isinstance(data, q.ExtExternalDataFile):
            head.data_file = data.name
        elif ext.ext_type != q.HeaderExtensionType.END:
            if ext.ext_type == q.HeaderExtensionType.FULL_DISK_ENCRYPTION:
                raise _fail(f"CRYPTO header extension size {ext.len_data}, but expected size 16")
            if ext.ext_type == q.HeaderExtensionType.BITMAPS:
                raise _fail("bitmaps_ext: Invalid extension length")
            head.unknown_extensions.append(ext)


def _check(head: Qcow2Header, file_size: int) -> None:
    cs = head.cluster_size
    if int(head.incompatible) & ~SUPPORTED_INCOMPATIBLE:
        raise _unsupported(head)
    compress_bit = bool(head.incompatible & q.IncompatibleFeature.COMPRESSION_TYPE)
    if head.compression_type == q.CompressionType.ZLIB and compress_bit:
        raise _fail("Compression type incompatible feature bit must not be set")
    if head.compression_type != q.CompressionType.ZLIB and not compress_bit:
        raise _fail("Compression type incompatible feature bit must be set")
    if head.compression_type not in (q.CompressionType.ZLIB, q.CompressionType.ZSTD):
        raise _fail(f"unknown compression type: {head.compression_type}")
    if head.extended_l2 and head.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise _fail(f"Unsupported subcluster size: {cs // 32}")
    if head.l1_offset % cs or head.l1_offset + 8 * head.l1_size > INT64_MAX:
        raise _fail(f"Active L1 table offset invalid ({head.l1_offset:#x})")
    needed = -(-head.size // (1 << head.l1_shift))
    if needed > INT_MAX:
        raise _fail("Image is too big")
    if head.l1_size < needed:
        raise _fail(f"L1 table is too small ({head.l1_size} entries, {needed} needed)")
    if head.refcount_table_offset % cs or (
        head.refcount_table_offset + head.refcount_table_clusters * cs > INT64_MAX
    ):
        raise _fail(f"Reference count table offset invalid ({head.refcount_table_offset:#x})")
    if head.refcount_table_clusters == 0:
        raise _fail("Image does not contain a reference count table")
    if head.snapshots_offset % cs or head.snapshots_offset + 40 * head.nb_snapshots > INT64_MAX:
        raise _fail(f"Snapshot table offset invalid ({head.snapshots_offset:#x})")
    if head.crypt_method not in (q.CryptMethod.NONE, q.CryptMethod.AES, q.CryptMethod.LUKS):
        raise _fail(f"Unsupported encryption method {head.crypt_method}")
    if head.crypt_method == q.CryptMethod.LUKS and head.encryption is None:
        raise _fail("Missing CRYPTO header for crypt method 2")
    if head.encryption is not None:
        if head.crypt_method != q.CryptMethod.LUKS:
            raise _fail("CRYPTO header extension only expected with LUKS encryption method")
        if head.encryption.ofs_encryption_header % cs:
            raise _fail(
                f"Encryption header offset '{head.encryption.ofs_encryption_header}' is not a "
                f"multiple of cluster size '{cs}'"
            )
    if head.data_file_raw and not head.has_data_file:
        raise _fail("data-file-raw requires a data file")
    del file_size


def load_header(f: BinaryIO) -> Qcow2Header:
    """Read and validate the header cluster of a qcow2 file."""
    f.seek(0)
    raw = q.Qcow2.read(f)
    h = raw.header
    file_size = f.seek(0, 2)
    v3 = h.version >= 3
    head = Qcow2Header(
        raw=raw,
        version=h.version,
        cluster_bits=h.cluster_bits,
        cluster_size=h.cluster_size,
        size=h.len_virtual_disk & ~511,
        l1_offset=h.ofs_l1_table,
        l1_size=h.num_l1_entries,
        refcount_table_offset=h.ofs_refcount_table,
        refcount_table_clusters=h.num_refcount_table_clusters,
        nb_snapshots=h.num_snapshots,
        snapshots_offset=h.ofs_snapshot_table,
        incompatible=h.incompatible_features if v3 and h.incompatible_features is not None
        else q.IncompatibleFeature(0),
        compatible=h.compatible_features if v3 and h.compatible_features is not None
        else q.CompatibleFeature(0),
        autoclear=h.autoclear_features if v3 and h.autoclear_features is not None
        else q.AutoclearFeature(0),
        refcount_order=h.refcount_order_effective,
        header_length=h.len_header_effective,
        compression_type=int(h.compression_type) if h.compression_type is not None else 0,
        extended_l2=h.has_extended_l2,
        l2_bits=h.cluster_bits - (4 if h.has_extended_l2 else 3),
        crypt_method=int(h.crypt_method),
    )
    with_name = raw.read_backing_file_name(f)
    if with_name is not None:
        if b"\0" in with_name:
            raise _fail("backing file name contains a NUL byte")
        head.backing_file = with_name
    _collect_extensions(head)
    _check(head, file_size)
    return head
