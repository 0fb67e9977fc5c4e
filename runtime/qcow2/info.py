"""``qemu-img info`` for qcow2 images, as qemu 7.2 prints it (qcow.md C.7).

`qcow2_info` gives the same keys, values and nesting as ``qemu-img info --output=json``, in
the order qemu prints them: qemu builds a QDict, whose iteration order is that of its hash
buckets (and, within a bucket, the reverse of insertion), not the QAPI schema's. The dicts
returned here are built in that order, so `format_info_json` and `format_info_human` print
the same bytes as qemu-img.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Literal, overload

from ..generated import qcow2 as q
from ..image import Image, ImageError, RawImage
from .image import Qcow2Image

__all__ = [
    "format_info_human",
    "format_info_json",
    "format_snapshot_list",
    "image_items",
    "layer_info",
    "qcow2_info",
    "qdict_order",
]

SECTOR = 512
QDICT_BUCKETS = 512

# LUKS names -> QAPI enum names of qemu's crypto layer
_LUKS_CIPHERS = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
    "cast5": {16: "cast5-128"},
}
_LUKS_MODES = ("ecb", "cbc", "xts", "ctr")
_LUKS_IVGENS = ("plain", "plain64", "essiv")
_LUKS_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
_LUKS_SECTOR = 512


# QDict order ----------------------------------------------------------------------------------


def _qdict_bucket(key: str) -> int:
    """The bucket of ``key`` in a qemu QDict: the gdbm hash qemu uses, modulo 512."""
    raw = key.encode("utf-8")
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % QDICT_BUCKETS


def qdict_order(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dict of ``items`` (given in QAPI visit order) in the order qemu prints a QDict."""
    buckets: dict[int, list[tuple[str, Any]]] = {}
    for key, value in items:
        buckets.setdefault(_qdict_bucket(key), []).insert(0, (key, value))
    return {key: value for b in sorted(buckets) for key, value in buckets[b]}


# pieces of the info ---------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    """A C string of an image, as qemu prints it."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _path_combine(base: str, name: str) -> str:
    """qemu's path_combine: ``name`` relative to the folder of ``base``, not normalized."""
    if name.startswith("/"):
        return name
    return base[: base.rfind("/") + 1] + name


def _actual_size(img: Image) -> int:
    return os.fstat(img._f.fileno()).st_blocks * 512


def _snapshots(img: Qcow2Image) -> list[dict[str, Any]]:
    out = []
    for snap in img.snapshots():
        items: list[tuple[str, Any]] = [
            ("id", snap.id.split("\0", 1)[0]),
            ("name", snap.name.split("\0", 1)[0]),
            ("vm-state-size", snap.vm_state_size),
            ("date-sec", snap.date_sec),
            ("date-nsec", snap.date_nsec),
            ("vm-clock-sec", snap.vm_clock_nsec // 1_000_000_000),
            ("vm-clock-nsec", snap.vm_clock_nsec % 1_000_000_000),
        ]
        if snap.icount is not None:
            items.append(("icount", snap.icount))
        out.append(qdict_order(items))
    return out


def _bitmaps(img: Qcow2Image) -> list[dict[str, Any]] | None:
    """The bitmap list, or None where qemu has none (no extension, or not consistent)."""
    ext = img.head.bitmaps
    if ext is None or not img.head.autoclear & q.AutoclearFeature.BITMAPS:
        return None  # qemu ignores a bitmaps extension whose autoclear bit is clear
    if ext.num_bitmaps == 0:
        return None
    directory = ext.read_bitmap_directory(img._f)
    out = []
    for entry in directory.entries:
        flags = []
        if entry.flags & q.BitmapFlag.IN_USE:
            flags.append("in-use")
        if entry.flags & q.BitmapFlag.AUTO:
            flags.append("auto")
        out.append(
            qdict_order(
                [
                    ("name", entry.name.decode("utf-8", "replace")),
                    ("granularity", 1 << entry.granularity_bits),
                    ("flags", flags),
                ]
            )
        )
    return out


def _lookup(kind: str, name: str, known: tuple[str, ...]) -> str:
    if name not in known:
        raise ImageError(f"LUKS header: unsupported {kind} '{name}'")
    return name


def _luks(img: Qcow2Image) -> list[tuple[str, Any]]:
    """The LUKS fields of the "encrypt" block (qemu's QCryptoBlockInfoLUKS)."""
    ext = img.head.encryption
    if ext is None:
        raise ImageError(f"{img.path}: Missing CRYPTO header for crypt method 2")
    luks = ext.read_encryption_header(img._f)
    mode_spec = _text(luks.cipher_mode)
    mode, sep, ivgen_spec = mode_spec.partition("-")
    if not sep:
        raise ImageError(f"LUKS header: Unexpected cipher mode string format '{mode_spec}'")
    ivgen, _, ivhash = ivgen_spec.partition(":")
    mode = _lookup("cipher mode", mode, _LUKS_MODES)
    key_bytes = luks.len_key // 2 if mode == "xts" else luks.len_key
    cipher_name = _text(luks.cipher_name)
    cipher = _LUKS_CIPHERS.get(cipher_name, {}).get(key_bytes)
    if cipher is None:
        raise ImageError(f"LUKS header: unsupported cipher '{cipher_name}' of {key_bytes} bytes")
    items: list[tuple[str, Any]] = [
        ("cipher-alg", cipher),
        ("cipher-mode", mode),
        ("ivgen-alg", _lookup("IV generator", ivgen, _LUKS_IVGENS)),
    ]
    if ivgen == "essiv":
        items.append(("ivgen-hash-alg", _lookup("hash", ivhash, _LUKS_HASHES)))
    slots = []
    for slot in luks.key_slots:
        active = slot.active == q.LuksKeySlotState.ACTIVE
        fields: list[tuple[str, Any]] = [("active", active)]
        if active:
            fields += [("iters", slot.iterations), ("stripes", slot.num_stripes)]
        fields.append(("key-offset", slot.ofs_key_material_sectors * _LUKS_SECTOR))
        slots.append(qdict_order(fields))
    items += [
        ("hash-alg", _lookup("hash", _text(luks.hash_spec), _LUKS_HASHES)),
        ("payload-offset", luks.ofs_payload_sectors * _LUKS_SECTOR),
        ("master-key-iters", luks.mk_digest_iterations),
        ("uuid", _text(luks.uuid)),
        ("slots", slots),
    ]
    return items


def _encrypt(img: Qcow2Image) -> dict[str, Any] | None:
    method = img.head.crypt_method
    if method == q.CryptMethod.AES:
        return qdict_order([("format", "aes")])
    if method == q.CryptMethod.LUKS:
        return qdict_order([("format", "luks"), *_luks(img)])
    return None


def _format_specific(img: Qcow2Image) -> dict[str, Any]:
    """ImageInfoSpecificQCow2 with qemu 7.2's presence rules."""
    head = img.head
    items: list[tuple[str, Any]]
    if head.version < 3:
        items = [("compat", "0.10"), ("refcount-bits", 1 << head.refcount_order)]
        bitmaps = None
    else:
        items = [("compat", "1.1")]
        if head.data_file is not None:  # the extension, even without the incompatible bit
            items.append(("data-file", _text(head.data_file)))
        if head.has_data_file:
            items.append(("data-file-raw", head.data_file_raw))
        items += [
            ("extended-l2", head.extended_l2),
            ("lazy-refcounts", head.lazy_refcounts),
            ("corrupt", head.corrupt),
            ("refcount-bits", 1 << head.refcount_order),
        ]
        bitmaps = _bitmaps(img)
    encrypt = _encrypt(img)
    if encrypt is not None:
        items.append(("encrypt", encrypt))
    if bitmaps is not None:
        items.append(("bitmaps", bitmaps))
    zstd = head.compression_type == q.CompressionType.ZSTD
    items.append(("compression-type", "zstd" if zstd else "zlib"))
    return qdict_order([("type", "qcow2"), ("data", qdict_order(items))])


def image_items(
    img: Image,
    filename: str,
    *,
    size: int,
    cluster_size: int,
    dirty: bool,
    encrypted: bool,
    backing_file: bytes | None,
    backing_format: str | None,
) -> list[tuple[str, Any]]:
    """The ImageInfo fields of qcow2 and qcow layers up to the backing file, in QAPI order."""
    items: list[tuple[str, Any]] = [
        ("filename", filename),
        ("format", img.fmt),
        ("dirty-flag", dirty),
        ("actual-size", _actual_size(img)),
        ("virtual-size", size),
        ("cluster-size", cluster_size),
    ]
    if encrypted:
        items.append(("encrypted", True))
    if backing_file:
        backing = _text(backing_file)
        items += [
            ("backing-filename", backing),
            ("full-backing-filename", _path_combine(filename, backing)),
        ]
        if backing_format:
            items.append(("backing-filename-format", backing_format))
    return items


def _qcow2_layer(img: Qcow2Image, filename: str) -> dict[str, Any]:
    head = img.head
    items = image_items(
        img, filename, size=head.size, cluster_size=head.cluster_size, dirty=head.dirty,
        encrypted=head.crypt_method != q.CryptMethod.NONE, backing_file=head.backing_file,
        backing_format=head.backing_format,
    )
    snapshots = _snapshots(img)
    if snapshots:
        items.append(("snapshots", snapshots))
    items.append(("format-specific", _format_specific(img)))
    return qdict_order(items)


def _layer(img: Image, filename: str) -> dict[str, Any]:
    from ..qcow.image import QcowImage

    if isinstance(img, Qcow2Image):
        return _qcow2_layer(img, filename)
    if isinstance(img, QcowImage):
        from ..qcow.info import qcow_layer

        return qcow_layer(img, filename)
    if isinstance(img, RawImage):
        return qdict_order(
            [
                ("filename", filename),
                ("format", "raw"),
                ("dirty-flag", False),
                ("actual-size", _actual_size(img)),
                ("virtual-size", -(-img.size // SECTOR) * SECTOR),
            ]
        )
    generic = {**img.info(), "filename": filename}
    return qdict_order(list(generic.items()))


@overload
def qcow2_info(img: Qcow2Image, backing_chain: Literal[False] = False) -> dict[str, Any]: ...


@overload
def qcow2_info(img: Qcow2Image, backing_chain: Literal[True]) -> list[dict[str, Any]]: ...


@overload
def qcow2_info(img: Qcow2Image, backing_chain: bool) -> dict[str, Any] | list[dict[str, Any]]: ...


def qcow2_info(
    img: Qcow2Image, backing_chain: bool = False
) -> dict[str, Any] | list[dict[str, Any]]:
    """``qemu-img info --output=json`` (7.2) of a qcow2 image.

    With ``backing_chain`` it is the list ``--backing-chain`` gives, one entry per layer that
    is open (an image opened with ``backing=False`` is a chain of one). The filename is the
    image's path as it was opened; each backing layer is named by the full backing file name
    of the layer above, as qemu opens it.
    """
    top = _qcow2_layer(img, str(img.path))
    if not backing_chain:
        return top
    chain = [top]
    layer: Image | None = img.backing
    info = top
    while layer is not None:
        # qemu opens each backing file by the full name the layer above reports
        info = _layer(layer, info.get("full-backing-filename", str(layer.path)))
        chain.append(info)
        layer = getattr(layer, "backing", None)  # qcow2 and qcow layers have one
    return chain


# text layouts -----------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    """qemu's JSON string: ASCII only, \\uXXXX (upper case) for the rest."""
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(value: Any, depth: int) -> str:
    """qemu's pretty JSON writer: 4 spaces per level, also around empty containers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    inner = "\n" + "    " * (depth + 1)
    close = "\n" + "    " * depth
    if isinstance(value, dict):
        body = ",".join(f"{inner}{_quoted(k)}: {_json(v, depth + 1)}" for k, v in value.items())
        return "{" + body + close + "}"
    if isinstance(value, list):
        body = ",".join(f"{inner}{_json(v, depth + 1)}" for v in value)
        return "[" + body + close + "]"
    raise TypeError(f"cannot print {type(value).__name__} as qemu JSON")


def format_info_json(info: dict[str, Any] | list[dict[str, Any]]) -> str:
    """The exact text of ``qemu-img info --output=json`` (7.2), final newline included."""
    return _json(info, 0) + "\n"


def _size_to_str(value: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit."""
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = int((exponent - 1) / 10)  # C division: truncates toward zero
    suffix = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[index]
    return f"{value / (1 << (index * 10)):0.3g} {suffix}B"


def _snapshot_line(snap: dict[str, Any] | None) -> str:
    if snap is None:
        return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["date-sec"]))
    nsec = snap["vm-clock-sec"] * 1_000_000_000 + snap["vm-clock-nsec"]
    secs = nsec // 1_000_000_000
    clock = (
        f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{nsec // 1_000_000 % 1000:03d}"
    )
    icount = str(snap["icount"]) if "icount" in snap else ""
    size = _size_to_str(snap["vm-state-size"])
    return f"{snap['id']:<9} {snap['name']:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}"


def _dump(value: Any, indent: int, out: list[str]) -> None:
    """qemu's dump_qobject of the format specific data: keys with spaces, lists as [i]."""
    pairs = (
        value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    )
    for key, item in pairs:
        label = key.replace("-", " ") if isinstance(value, dict) else key
        if isinstance(item, dict | list):
            out.append(f"{' ' * 4 * indent}{label}:\n")
            _dump(item, indent + 1, out)
        else:
            shown = ("true" if item else "false") if isinstance(item, bool) else str(item)
            out.append(f"{' ' * 4 * indent}{label}: {shown}\n")


def _human(info: dict[str, Any], out: list[str]) -> None:
    disk = _size_to_str(info["actual-size"]) if "actual-size" in info else "unavailable"
    out.append(
        f"image: {info['filename']}\n"
        f"file format: {info['format']}\n"
        f"virtual size: {_size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
        f"disk size: {disk}\n"
    )
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line + "\n")
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}\n")
    if "snapshots" in info:
        out.append("Snapshot list:\n" + _snapshot_line(None) + "\n")
        out.extend(_snapshot_line(snap) + "\n" for snap in info["snapshots"])
    if "format-specific" in info:
        out.append("Format specific information:\n")
        _dump(info["format-specific"]["data"], 1, out)


def format_info_human(info: dict[str, Any] | list[dict[str, Any]]) -> str:
    """The exact text of ``qemu-img info`` (7.2); a chain's layers are separated by a blank
    line, as with ``--backing-chain``."""
    layers = info if isinstance(info, list) else [info]
    out: list[str] = []
    for i, layer in enumerate(layers):
        if i:
            out.append("\n")
        _human(layer, out)
    return "".join(out)


def format_snapshot_list(img: Qcow2Image) -> str:
    """The exact text of ``qemu-img snapshot -l`` (7.2)."""
    snaps = _snapshots(img)
    if not snaps:
        return ""
    lines = ["Snapshot list:", _snapshot_line(None)]
    lines += [_snapshot_line(s) for s in snaps]
    return "\n".join(lines) + "\n"


def layer_info(img: Image, filename: str) -> dict[str, Any]:
    """``qemu-img info --output=json`` of an image of any format diskspec opens."""
    return _layer(img, filename)
