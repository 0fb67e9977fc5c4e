"""Creating qcow2 images with qemu-img's option names and qemu's layout.

Cluster 0 holds the header, its extensions (backing format, data file, full disk encryption,
feature name table, end) and the backing file name; then come the refcount table, the refcount
blocks, the L1 table and, for LUKS, the LUKS header with its key material, as ``qemu-img
create`` lays them out (qcow.md B.4). Everything is built through the generated classes, so
every byte comes from the spec.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto import (
    LUKS_CIPHER_ALGS,
    LUKS_CIPHER_MODES,
    LUKS_HASH_ALGS,
    LUKS_IVGEN_ALGS,
    LUKS_STRIPES,
    SECTOR_SIZE,
    LuksParams,
    luks_format,
)
from ..generated import qcow2 as q
from ..image import UsageError
from ..structbase import words_to_bytes

__all__ = ["Encryption", "Qcow2Options", "create_qcow2", "parse_encryption", "parse_size"]

DEFAULT_CLUSTER_SIZE = 65536
V3_HEADER_LENGTH = 112  # what qemu writes (header through compression_type and padding)
V2_HEADER_LENGTH = 72
MAX_L1_ENTRIES = 4194304
MAX_BACKING_NAME = 1023
FEATURE_TABLE_MIN_CLUSTER = 4096  # qemu writes the table only for larger clusters


def parse_size(value: str | int) -> int:
    """A size as qemu-img takes it: bytes, or a number with k, M, G, T, P, E (powers of 2)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}
    suffix = text[-1:].lower() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(suffix)] if suffix else text
    try:
        amount = float(number)
    except ValueError as exc:
        raise UsageError(f"Invalid image size specified: {value!r}") from exc
    if suffix not in units or amount < 0:
        raise UsageError(f"Invalid image size specified: {value!r}")
    return int(amount * units[suffix])


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise UsageError(f"Parameter '{name}' expects 'on' or 'off'")


# The LUKS create options in qemu's order, with the QAPI member each one sets.
LUKS_OPTIONS = (
    ("encrypt.cipher-alg", "cipher-alg"),
    ("encrypt.cipher-mode", "cipher-mode"),
    ("encrypt.ivgen-alg", "ivgen-alg"),
    ("encrypt.ivgen-hash-alg", "ivgen-hash-alg"),
    ("encrypt.hash-alg", "hash-alg"),
    ("encrypt.iter-time", "iter-time"),
)
ENCRYPT_OPTIONS = ("encryption", "encrypt.format", "encrypt.key-secret",
                   *(name for name, _ in LUKS_OPTIONS))


@dataclass(frozen=True, slots=True)
class Encryption:
    """How a new image is encrypted: the method, the key and, for LUKS, its parameters."""

    method: q.CryptMethod
    passphrase: bytes
    luks: LuksParams | None = None


def _choice(value: Any, member: str, allowed: tuple[str, ...]) -> str:
    text = str(value)
    if text not in allowed:
        raise UsageError(f"Parameter '{member}' does not accept value '{text}'")
    return text


def _luks_params(given: dict[str, Any]) -> LuksParams:
    values: dict[str, Any] = {}
    for name, member in LUKS_OPTIONS:
        if name not in given:
            continue
        value = given[name]
        if member == "iter-time":
            try:
                values["iter_time"] = int(str(value), 0)
            except ValueError as exc:
                raise UsageError(f"Parameter '{name}' expects a number") from exc
            continue
        allowed = {
            "cipher-alg": tuple(LUKS_CIPHER_ALGS),
            "cipher-mode": LUKS_CIPHER_MODES,
            "ivgen-alg": LUKS_IVGEN_ALGS,
        }.get(member, LUKS_HASH_ALGS)
        values[member.replace("-", "_")] = _choice(value, member, allowed)
    params = LuksParams(**values)
    if params.cipher_mode == "xts" and params.cipher_name in ("des", "3des", "cast5"):
        raise UsageError(f"Unsupported cipher mode {params.cipher_mode}")
    if params.ivgen_alg == "essiv":
        try:
            size = hashlib.new(params.ivgen_hash_alg or "sha256").digest_size
        except ValueError as exc:
            raise UsageError(f"Hash '{params.ivgen_hash_alg}' is not available") from exc
        family, _ = LUKS_CIPHER_ALGS[params.cipher_alg]
        if (family, size) not in LUKS_CIPHER_ALGS.values():
            raise UsageError(f"No {family.upper()} cipher with key size {size} available")
    material = params.key_bytes * LUKS_STRIPES
    if material % SECTOR_SIZE:
        # qemu-img 7.2 aborts on an assertion here; such an image would not open in qemu
        raise UsageError(f"LUKS key material of {material} bytes is not a whole number of "
                         f"sectors ({params.cipher_alg} {params.cipher_mode})")
    return params


def parse_encryption(
    opts: dict[str, Any],
    passphrase: bytes | str | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> Encryption | None:
    """Take the encryption options out of ``opts`` and check them as qemu-img does.

    ``encrypt.key-secret=ID`` names one of ``secrets``; without it ``passphrase`` is the key.
    """
    legacy = opts.pop("encryption", None)
    fmt = opts.pop("encrypt.format", None)
    secret = opts.pop("encrypt.key-secret", None)
    luks = {name: opts.pop(name) for name, _ in LUKS_OPTIONS if name in opts}
    if legacy is not None and fmt is not None:
        raise UsageError("'encrypt.format' and its alias 'encryption' can't be used at the "
                         "same time")
    if legacy is not None:
        if not _bool(legacy, "encryption"):
            return None
        fmt = "aes"
    if fmt is None:
        if secret is not None or luks:
            raise UsageError("Parameter 'encrypt.format' is missing")
        return None
    fmt = _choice(fmt, "format", ("aes", "luks"))
    if fmt == "aes" and luks:
        raise UsageError(f"Parameter '{next(iter(luks))}' is unexpected")
    params = _luks_params(luks) if fmt == "luks" else None
    if secret is not None:
        if secrets is None or str(secret) not in secrets:
            raise UsageError(f"No secret with id '{secret}'")
        key = secrets[str(secret)]
    elif passphrase is not None:
        key = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    else:
        raise UsageError("Parameter 'encrypt.key-secret' is required for cipher")
    method = q.CryptMethod.LUKS if params is not None else q.CryptMethod.AES
    return Encryption(method, key, params)


@dataclass(slots=True)
class Qcow2Options:
    """The qcow2 create options of qemu-img 7.2, validated as qemu validates them."""

    size: int
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    extended_l2: bool = False
    lazy_refcounts: bool = False
    compression_type: int = 0
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False
    preallocation: str = "off"
    encryption: Encryption | None = None

    @classmethod
    def from_qemu(cls, size: int | str, options: dict[str, Any]) -> Qcow2Options:
        opts = dict(options)
        o = cls(size=parse_size(opts.pop("size", size)))
        o.encryption = parse_encryption(opts, opts.pop("passphrase", None),
                                        opts.pop("secrets", None))
        compat = str(opts.pop("compat", "1.1"))
        if compat in ("0.10", "v2"):
            o.version = 2
        elif compat not in ("1.1", "v3"):
            raise UsageError(f"Invalid compatibility level: '{compat}'")
        cs = parse_size(opts.pop("cluster_size", DEFAULT_CLUSTER_SIZE))
        if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
            raise UsageError(
                "Cluster size must be a power of two between 512 and 2048k"
            )
        o.cluster_bits = cs.bit_length() - 1
        bits = int(opts.pop("refcount_bits", 16))
        if bits < 1 or bits > 64 or bits & (bits - 1):
            raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
        o.refcount_order = bits.bit_length() - 1
        o.extended_l2 = _bool(opts.pop("extended_l2", False), "extended_l2")
        o.lazy_refcounts = _bool(opts.pop("lazy_refcounts", False), "lazy_refcounts")
        ctype = str(opts.pop("compression_type", "zlib"))
        types = {"zlib": q.CompressionType.ZLIB, "zstd": q.CompressionType.ZSTD}
        if ctype not in types:
            raise UsageError(f"Parameter 'compression-type' does not accept value '{ctype}'")
        o.compression_type = int(types[ctype])
        o.backing_file = opts.pop("backing_file", None)
        o.backing_fmt = opts.pop("backing_fmt", None)
        o.data_file = opts.pop("data_file", None)
        o.data_file_raw = _bool(opts.pop("data_file_raw", False), "data_file_raw")
        o.preallocation = str(opts.pop("preallocation", "off"))
        if opts:
            raise UsageError(f"Invalid parameter '{sorted(opts)[0]}'")
        o.check()
        return o

    def check(self) -> None:
        if self.size % 512:
            self.size += 512 - self.size % 512
        if self.version < 3:
            if self.refcount_order != 4:
                raise UsageError("Different refcount widths than 16 bits require compatibility "
                                 "level 1.1 or above (use compat=1.1 or greater)")
            if self.lazy_refcounts:
                raise UsageError("Lazy refcounts only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)")
            if self.compression_type:
                raise UsageError("Non-zlib compression type is only supported with "
                                 "compatibility level 1.1 and above (use compat=1.1 or greater)")
            if self.extended_l2:
                raise UsageError("Extended L2 entries are only supported with compatibility "
                                 "level 1.1 and above (use compat=1.1 or greater)")
            if self.data_file:
                raise UsageError("Data file is only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)")
        if self.extended_l2 and self.cluster_bits < 14:
            raise UsageError("Extended L2 entries are only supported with cluster sizes of "
                             "at least 16 KB")
        if self.data_file_raw and not self.data_file:
            raise UsageError("data-file-raw requires data-file")
        if self.backing_file and self.data_file_raw:
            raise UsageError("Backing file and data-file-raw cannot be used at the same time")
        if self.backing_file and not self.backing_fmt:
            raise UsageError("Backing file specified without backing format")
        if self.backing_file and len(os.fsencode(self.backing_file)) > MAX_BACKING_NAME:
            raise UsageError("Backing file name too long")
        if self.backing_fmt and len(self.backing_fmt) > 15:
            raise UsageError(f"Unknown driver '{self.backing_fmt}'")
        if self.preallocation not in ("off", "metadata", "falloc", "full"):
            raise UsageError(f"Parameter 'preallocation' does not accept value "
                             f"'{self.preallocation}'")
        if self.l1_entries > MAX_L1_ENTRIES:
            raise UsageError("The image size is too large for file format 'qcow2' (try using "
                             "a larger cluster size)")

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def luks_clusters(self) -> int:
        """Clusters of the LUKS header and key material (0 without LUKS)."""
        luks = self.encryption.luks if self.encryption is not None else None
        return -(-luks.payload_offset // self.cluster_size) if luks is not None else 0

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l1_entries(self) -> int:
        shift = self.cluster_bits + self.l2_bits
        return (self.size + (1 << shift) - 1) >> shift


def _extension(ext_type: q.HeaderExtensionType, data: Any, raw: bytes) -> q.HeaderExtension:
    return q.HeaderExtension(
        ext_type=ext_type, len_data=len(raw), data=data, padding=bytes(-len(raw) % 8)
    )


def feature_name_table() -> q.ExtFeatureNameTable:
    """The feature name table qemu writes: every known bit with its name (from the spec)."""
    entries = []
    for kind, labels in (
        (q.FeatureType.INCOMPATIBLE, q.INCOMPATIBLE_FEATURE_LABELS),
        (q.FeatureType.COMPATIBLE, q.COMPATIBLE_FEATURE_LABELS),
        (q.FeatureType.AUTOCLEAR, q.AUTOCLEAR_FEATURE_LABELS),
    ):
        for flag, label in labels.items():
            entries.append(q.FeatureNameEntry(
                feature_type=kind, bit=int(flag).bit_length() - 1,
                name=label.encode("ascii").ljust(46, b"\0"),
            ))
    return q.ExtFeatureNameTable(entries=entries)


def header_cluster(o: Qcow2Options, layout: dict[str, int]) -> bytes:
    """Cluster 0 of a new image: header, extensions, backing file name."""
    cs = o.cluster_size
    incompatible = 0
    if o.compression_type:
        incompatible |= q.IncompatibleFeature.COMPRESSION_TYPE
    if o.extended_l2:
        incompatible |= q.IncompatibleFeature.EXTENDED_L2
    if o.data_file:
        incompatible |= q.IncompatibleFeature.EXTERNAL_DATA_FILE
    autoclear = q.AutoclearFeature.DATA_FILE_RAW if o.data_file_raw else 0
    compatible = q.CompatibleFeature.LAZY_REFCOUNTS if o.lazy_refcounts else 0
    crypt = o.encryption.method if o.encryption is not None else q.CryptMethod.NONE
    extensions: list[q.HeaderExtension] = []
    if o.backing_fmt and o.backing_file:
        name = o.backing_fmt.encode("ascii")
        extensions.append(_extension(q.HeaderExtensionType.BACKING_FILE_FORMAT,
                                     q.ExtBackingFileFormat(name=name), name))
    if o.data_file:
        name = os.fsencode(o.data_file)
        extensions.append(_extension(q.HeaderExtensionType.EXTERNAL_DATA_FILE,
                                     q.ExtExternalDataFile(name=name), name))
    if o.encryption is not None and o.encryption.luks is not None:
        fde = q.ExtFullDiskEncryption(ofs_encryption_header=layout["luks"] * cs,
                                      len_encryption_header=o.encryption.luks.payload_offset)
        extensions.append(_extension(q.HeaderExtensionType.FULL_DISK_ENCRYPTION, fde,
                                     fde.build()))
    if o.version >= 3 and cs > FEATURE_TABLE_MIN_CLUSTER:
        table = feature_name_table()
        extensions.append(_extension(q.HeaderExtensionType.FEATURE_NAME_TABLE, table,
                                     table.build()))
    extensions.append(_extension(q.HeaderExtensionType.END, b"", b""))
    backing = os.fsencode(o.backing_file) if o.backing_file else b""
    v3 = o.version >= 3
    head_len = V3_HEADER_LENGTH if v3 else V2_HEADER_LENGTH
    ext_len = sum(len(e.build()) for e in extensions)
    header = q.Header(
        version=o.version,
        ofs_backing_file_name=head_len + ext_len if backing else 0,
        len_backing_file_name=len(backing),
        cluster_bits=o.cluster_bits,
        len_virtual_disk=o.size,
        crypt_method=crypt,
        num_l1_entries=o.l1_entries,
        ofs_l1_table=layout["l1"] * cs if layout["l1_clusters"] else 0,
        ofs_refcount_table=layout["reftable"] * cs,
        num_refcount_table_clusters=layout["reftable_clusters"],
        num_snapshots=0,
        ofs_snapshot_table=0,
        incompatible_features=q.IncompatibleFeature(incompatible) if v3 else None,
        compatible_features=q.CompatibleFeature(compatible) if v3 else None,
        autoclear_features=q.AutoclearFeature(autoclear) if v3 else None,
        refcount_order=o.refcount_order if v3 else None,
        len_header=head_len if v3 else None,
        compression_type=q.CompressionType(o.compression_type) if v3 else None,
        padding=bytes(7) if v3 else None,
    )
    end = header.ofs_backing_file_name if backing else cs
    area_len = end - head_len
    used = ext_len
    if used > area_len:
        raise UsageError("header extensions do not fit in the first cluster")
    area = q.HeaderExtensionArea(extensions=extensions, rest=bytes(area_len - used))
    image = q.Qcow2(header=header, extension_area=area)
    data = image.build() + backing
    if len(data) > cs:
        raise UsageError("header extensions and backing file name do not fit in one cluster")
    return data


def _layout(o: Qcow2Options) -> dict[str, int]:
    """Header, refcount table, refcount blocks, L1, LUKS area, as qemu places them."""
    cs = o.cluster_size
    per_block = cs * 8 >> o.refcount_order
    l1_clusters = -(-8 * o.l1_entries // cs)  # none for an empty disk: qemu writes offset 0
    luks_clusters = o.luks_clusters
    tables, blocks = 1, 1
    while True:
        total = 1 + tables + blocks + l1_clusters + luks_clusters
        need_blocks = -(-total // per_block)
        need_tables = -(-need_blocks * 8 // cs)
        if need_blocks <= blocks and need_tables <= tables:
            break
        blocks, tables = max(blocks, need_blocks), max(tables, need_tables)
    return {
        "reftable": 1,
        "reftable_clusters": tables,
        "refblocks": 1 + tables,
        "refblock_count": blocks,
        "l1": 1 + tables + blocks,
        "l1_clusters": l1_clusters,
        "luks": 1 + tables + blocks + l1_clusters,
        "total": 1 + tables + blocks + l1_clusters + luks_clusters,
    }


def create_qcow2(path: Path, size: int | str, **options: Any) -> None:
    """``qemu-img create -f qcow2 -o OPTIONS PATH SIZE``."""
    o = Qcow2Options.from_qemu(size, options)
    layout = _layout(o)
    cs = o.cluster_size
    cluster0 = header_cluster(o, layout)
    reftable = [0] * (layout["reftable_clusters"] * cs // 8)
    for i in range(layout["refblock_count"]):
        reftable[i] = (layout["refblocks"] + i) * cs
    per_block = cs * 8 >> o.refcount_order
    counts = [1] * layout["total"] + [0] * (layout["refblock_count"] * per_block - layout["total"])
    from array import array

    table_words = array("Q", reftable)
    if o.data_file:
        data_path = Path(o.data_file)
        if not data_path.is_absolute():
            data_path = path.parent / data_path
        with data_path.open("wb") as d:
            d.truncate(o.size if o.data_file_raw else 0)
    with path.open("wb") as f:
        fd = f.fileno()
        os.pwrite(fd, cluster0, 0)
        os.pwrite(fd, words_to_bytes(table_words, True), layout["reftable"] * cs)
        for i in range(layout["refblock_count"]):
            chunk = counts[i * per_block : (i + 1) * per_block]
            values = array(_refcount_code(o.refcount_order), chunk)
            fields = {f"refcounts_{1 << k}": values if k == o.refcount_order else None
                      for k in range(7)}
            block = q.RefcountBlock(cluster_bits=o.cluster_bits,
                                    refcount_order=o.refcount_order, **fields).build()
            os.pwrite(fd, block, (layout["refblocks"] + i) * cs)
        os.pwrite(fd, bytes(8 * o.l1_entries), layout["l1"] * cs)
        if o.encryption is not None and o.encryption.luks is not None:
            _write_luks(fd, o.encryption, layout["luks"] * cs)
            f.truncate(layout["total"] * cs)  # qemu zeroes the LUKS clusters whole
        os.fsync(fd)
    if o.preallocation == "off" and o.data_file_raw:
        o.preallocation = "metadata"  # as qemu: a raw data file is mapped 1:1 from the start
    if o.preallocation != "off":
        _preallocate(path, o)


def _write_luks(fd: int, encryption: Encryption, offset: int) -> None:
    """The LUKS header and key slot 0's material at ``offset`` (the rest stays zero)."""
    params = encryption.luks
    assert params is not None
    header, material = luks_format(encryption.passphrase, params)
    os.pwrite(fd, header.build(), offset)
    os.pwrite(fd, material, offset + params.slot_sector(0) * SECTOR_SIZE)


def _refcount_code(order: int) -> str:
    return {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: "I", 6: "Q"}[order]


def _preallocate(path: Path, o: Qcow2Options) -> None:
    """Allocate every L2 table and data cluster (metadata), then the space (falloc, full)."""
    from ..opener import open_image
    from .image import Qcow2Image

    key = o.encryption.passphrase if o.encryption is not None else None
    img = open_image(path, "r+", "qcow2", backing=o.data_file is not None, passphrase=key)
    assert isinstance(img, Qcow2Image)
    with img:
        img.preallocate(o.preallocation)
