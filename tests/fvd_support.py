"""Building FVD test images of every kind, with the bytes a guest must read from them."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import diskspec

KiB = 1024
MiB = 1024 * KiB

#: every layout the runtime has: (name, base format or None, compact, data file)
#: (name, base format, compact, data file format)
KINDS: list[tuple[str, str | None, bool, str | None]] = [
    ("plain", None, False, None),
    ("compact", None, True, None),
    ("raw-base", "raw", False, None),
    ("qcow2-base", "qcow2", False, None),
    ("raw-base-compact", "raw", True, None),
    ("qcow2-base-compact", "qcow2", True, None),
    ("data-file", None, False, "raw"),
    ("raw-base-data-file", "raw", False, "raw"),
    ("qcow2-data-file", None, False, "qcow2"),
    ("raw-base-compact-qcow2-data-file", "raw", True, "qcow2"),
]


@dataclass
class Built:
    path: Path
    model: bytearray
    base: Path | None


def base_content(rng: random.Random, n: int) -> bytes:
    """Random bytes with zero stretches (so sparse and zero paths are taken too)."""
    out = bytearray(rng.randbytes(n))
    for _ in range(4):
        at = rng.randrange(0, n)
        out[at : at + rng.randrange(1, n // 4)] = bytes(min(n - at, n // 4))
    return bytes(out[:n])


def make_base(folder: Path, fmt: str, content: bytes) -> Path:
    if fmt == "raw":
        path = folder / "base.raw"
        path.write_bytes(content)
        return path
    path = folder / f"base.{fmt}"
    diskspec.create(path, fmt, -(-len(content) // 512) * 512)
    with diskspec.open(path, "r+") as img:
        img.pwrite(content + bytes(img.size - len(content)), 0)
    return path


def build(
    folder: Path,
    kind: str,
    size: int = 1 * MiB,
    base_size: int = 600 * KiB + 1000,
    block_size: int = 4096,
    seed: int = 0,
    **extra: object,
) -> Built:
    """An FVD image of ``kind`` (see KINDS), and what it reads as."""
    _, base_fmt, compact, data_file = next(k for k in KINDS if k[0] == kind)
    rng = random.Random(seed)
    options: dict[str, object] = dict(extra)
    model = bytearray(size)
    base: Path | None = None
    if base_fmt is not None:
        content = base_content(rng, base_size)
        base = make_base(folder, base_fmt, content)
        model[: len(content)] = content[:size]
        options |= {"backing_file": base.name, "backing_fmt": base_fmt,
                    "block_size": block_size}
    if compact:
        options.setdefault("compact_image", True)
        options.setdefault("chunk_size", 64 * KiB)
        options.setdefault("storage_grow_unit", 256 * KiB)
    if data_file == "raw":
        options["data_file"] = "data.raw"
    elif data_file is not None:
        options |= {"data_file": f"data.{data_file}", "data_file_fmt": data_file}
    path = folder / f"{kind}.fvd"
    diskspec.create(path, "fvd", size, **options)
    return Built(path, model, base)


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def read_all(img: diskspec.Image) -> bytes:
    return img.pread(img.size, 0)


def random_writes(img: diskspec.Image, model: bytearray, rng: random.Random, count: int,
                  longest: int, flush: bool = False) -> None:
    """``count`` writes of random bytes (1 to ``longest``) at random offsets, in the model
    too; with ``flush`` each is flushed."""
    for _ in range(count):
        at = rng.randrange(0, img.size - longest)
        data = rng.randbytes(rng.randrange(1, longest))
        img.pwrite(data, at)
        model[at : at + len(data)] = data
        if flush:
            img.flush()
