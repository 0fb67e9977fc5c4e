"""``check [-r leaks|all]`` for FVD (fvd.md rule 8 and 6.11-6.12).

The header's cross-field rules are validated when the image opens (a violation is an open
error, as qemu-img reports an image it cannot open). The check then reports, on top of a
journal replayed in memory for a dirty image: nonzero bitmap padding and bad table entries
(not a chunk index, past the data storage, shared by two virtual chunks) as corruptions, and
chunks below the highest one in use that no entry references as leaks. Repair persists the
replayed journal, moves the highest chunks into leaked holes (``leaks``), gives shared
chunks their own copy and drops unusable entries (``all``), clears the padding (``all``),
rewrites bitmap and table, zeroes the journal, and checks again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..image import UsageError
from ..qcow2.check import CheckResult
from .consts import EMPTY

if TYPE_CHECKING:
    from .image import FvdImage

__all__ = ["check_image"]


def _padding_set(img: FvdImage) -> int:
    """The number of set bitmap bits past the last block of the base range."""
    if not img.bitmap or img.h.all_data_in_fvd_img:
        return 0
    blocks = -(-img.base_size // img.block_size) if img.block_size else 0
    count = 0
    first_byte = blocks >> 3
    if blocks & 7 and first_byte < len(img.bitmap):
        count += bin(img.bitmap[first_byte] >> (blocks & 7)).count("1")
        first_byte += 1
    tail = bytes(img.bitmap[first_byte:])
    if tail.count(0) != len(tail):
        count += sum(bin(b).count("1") for b in tail)
    return count


def _leaked(img: FvdImage) -> list[int]:
    """Chunks below the highest one a usable entry references that no entry references
    (entries past the storage are corruptions, and do not make the chunks below leak)."""
    if img.table is None:
        return []
    used = {e for v, e in enumerate(img.table) if e != EMPTY and v not in img.bad_entries}
    return [k for k in range(max(used, default=-1) + 1) if k not in used]


def _scan(img: FvdImage, res: CheckResult) -> None:
    padding = _padding_set(img)
    if padding:
        res.corruptions += 1
        res.messages.append(f"ERROR bitmap: {padding} padding bits past the base range are set")
    for problem in (*img.bad_entries.values(), *img.shared_entries.values()):
        res.corruptions += 1
        res.messages.append(f"ERROR {problem}")
    leaked = _leaked(img)
    for k in leaked:
        res.messages.append(f"Leaked chunk {k} refcount=0 reference=0")
    res.leaks = len(leaked)
    if img.table is not None:
        res.total_clusters = len(img.table)
        res.allocated_clusters = sum(1 for e in img.table if e != EMPTY)


def _copy_chunk(img: FvdImage, src: int, dst: int) -> None:
    cs = img.chunk_size
    storage = img._storage()
    storage.write(storage.read(cs, img.data_start + src * cs), img.data_start + dst * cs)


def _repair(img: FvdImage, repair: str) -> tuple[int, int]:
    table = img.table
    leaks_fixed = corruptions_fixed = 0
    img._begin_write()
    if repair == "all":
        padding = _padding_set(img)
        if padding:
            blocks = -(-img.base_size // img.block_size)
            bits = img.bitmap
            for b in range(blocks, len(bits) * 8):
                bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF
            corruptions_fixed += 1
        if table is not None:
            for v in sorted(img.bad_entries):
                table[v] = EMPTY  # unreadable: it read as nothing, now it reads as zeros
                corruptions_fixed += 1
            for v in sorted(img.shared_entries):
                k = img._alloc()
                _copy_chunk(img, table[v], k)  # each entry gets its own copy of the data
                table[v] = k
                corruptions_fixed += 1
            img._scan_table()
    if table is not None and not img.bad_entries and not img.shared_entries:
        holes = _leaked(img)
        owners = sorted(((e, v) for v, e in enumerate(table) if e != EMPTY), reverse=True)
        for hole, (k, v) in zip(holes, owners, strict=False):
            if k < hole:
                break
            _copy_chunk(img, k, hole)
            table[v] = hole
            leaks_fixed += 1
        if leaks_fixed:
            img._storage().sync()
    # chunks were relocated: no stale journal record may point at an old place
    img._persist_metadata(zero_all=True)
    img._scan_table()
    if table is not None and not img.bad_entries and not img.shared_entries:
        end = img.data_start + img.used_chunks * img.chunk_size
        if img._storage().length() > end:
            img._storage().truncate(end)
    return leaks_fixed, corruptions_fixed


def check_image(img: FvdImage, repair: str | None = None) -> CheckResult:
    """Check (and with ``repair`` "leaks" or "all", repair) an open FVD image."""
    if repair not in (None, "leaks", "all"):
        raise UsageError(f"unknown repair mode {repair!r}")
    res = CheckResult(filename=str(img.path), format="fvd")
    if img.replayed:
        res.messages.append(
            f"The image was not closed cleanly: {img.replayed} journal records replayed"
        )
    _scan(img, res)
    if repair is None or not (res.corruptions or res.leaks or img.replayed):
        return res
    if not img.writable:
        raise UsageError(f"{img.path}: repairing needs the image open read-write")
    leaks_fixed, corruptions_fixed = _repair(img, repair)
    again = CheckResult(filename=str(img.path), format="fvd", messages=res.messages)
    _scan(img, again)
    again.leaks_fixed = leaks_fixed
    again.corruptions_fixed = corruptions_fixed
    again.repaired = (leaks_fixed, corruptions_fixed)
    return again
