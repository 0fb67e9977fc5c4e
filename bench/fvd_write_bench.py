#!/usr/bin/env python3
"""Write-speed benchmark: random 4 KiB writes into FVD against qcow2, both through diskspec.

One run, same machine, same offsets and bytes: a 1 GiB raw base (a sparse file with 64 MiB
of data scattered over it) under

* ``fvd``: ``diskspec.create(fvd, backing_file=base.raw)`` with the default block size
  (512 B for a 1 GiB base: copy-on-write never reads the base for 4 KiB-aligned writes),
* ``fvd-compact``: the same with ``compact_image=on`` (1 MiB chunks through the table),
* ``qcow2``: ``diskspec.create(qcow2, backing_file=base.raw)``, 64 KiB clusters (each first
  write to a cluster copies the rest of the cluster from the base).

Each timed run opens the new image, does the writes (4 KiB at random 4 KiB-aligned offsets,
fixed seed), flushes (every ``--flush-every`` writes and at the end) and closes it. Before
the figures are printed, every image is read back at every written offset and at as many
other random offsets and compared with what it must hold. The figure is the best of
``--repeat`` runs (a fresh image each); the ratio is qcow2 time / FVD time.

Run: ``python bench/fvd_write_bench.py [--writes N] [--flush-every N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import diskspec

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 1 * GiB
BLOCK = 4 * KiB
BASE_DATA = 64 * MiB
BASE_PIECE = 256 * KiB

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fvd": ("fvd", {}),
    "fvd-compact": ("fvd", {"compact_image": True}),
    "qcow2": ("qcow2", {}),
}


def make_base(folder: Path, rng: random.Random) -> tuple[Path, dict[int, bytes]]:
    """A sparse 1 GiB raw file with BASE_DATA bytes of random data in 256 KiB pieces."""
    path = folder / "base.raw"
    pieces: dict[int, bytes] = {}
    with path.open("wb") as f:
        f.truncate(SIZE)
        for _ in range(BASE_DATA // BASE_PIECE):
            at = rng.randrange(0, SIZE // BASE_PIECE) * BASE_PIECE
            data = rng.randbytes(BASE_PIECE)
            f.seek(at)
            f.write(data)
            pieces[at] = data
    return path, pieces


def base_bytes(pieces: dict[int, bytes], at: int, n: int) -> bytes:
    start = at - at % BASE_PIECE
    piece = pieces.get(start)
    return piece[at - start : at - start + n] if piece is not None else bytes(n)


def run_once(folder: Path, name: str, writes: list[tuple[int, bytes]], flush_every: int
             ) -> tuple[float, Path]:
    fmt, options = VARIANTS[name]
    path = folder / f"{name}.img"
    path.unlink(missing_ok=True)
    diskspec.create(path, fmt, SIZE, backing_file="base.raw", backing_fmt="raw", **options)
    os.sync()
    start = time.perf_counter()
    with diskspec.open(path, "r+") as img:
        for i, (at, data) in enumerate(writes, 1):
            img.pwrite(data, at)
            if flush_every and i % flush_every == 0:
                img.flush()
        img.flush()
    return time.perf_counter() - start, path


def verify(path: Path, writes: list[tuple[int, bytes]], pieces: dict[int, bytes],
           rng: random.Random) -> None:
    latest = dict(writes)
    probes = list(latest) + [rng.randrange(0, SIZE // BLOCK) * BLOCK for _ in latest]
    with diskspec.open(path) as img:
        for at in probes:
            want = latest.get(at) or base_bytes(pieces, at, BLOCK)
            if img.pread(BLOCK, at) != want:
                sys.stderr.write(f"fvd_write_bench: FAILED: {path.name} at {at:#x}\n")
                raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=5000)
    parser.add_argument("--flush-every", type=int, default=0,
                        help="also flush every N writes (0: only at the end)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = random.Random(2011)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fvd-bench-") as tmp:
        folder = Path(tmp)
        _, pieces = make_base(folder, rng)
        writes = [(rng.randrange(0, SIZE // BLOCK) * BLOCK, rng.randbytes(BLOCK))
                  for _ in range(args.writes)]
        for name in VARIANTS:
            best = float("inf")
            for _ in range(args.repeat):
                seconds, path = run_once(folder, name, writes, args.flush_every)
                best = min(best, seconds)
            verify(path, writes, pieces, rng)
            results[name] = best
            path.unlink()
    report = {
        "writes": args.writes,
        "flush_every": args.flush_every,
        "seconds": results,
        "writes_per_second": {k: args.writes / v for k, v in results.items()},
        "qcow2_over_fvd": results["qcow2"] / results["fvd"],
        "qcow2_over_fvd_compact": results["qcow2"] / results["fvd-compact"],
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    flush = f"flush every {args.flush_every} writes" if args.flush_every else "one flush"
    sys.stdout.write(f"{args.writes} random 4 KiB writes over a 1 GiB raw base ({flush}, "
                     f"close; best of {args.repeat})\n")
    for name, seconds in results.items():
        sys.stdout.write(f"  {name:<12} {seconds:8.3f} s  {args.writes / seconds:9.0f} writes/s\n")
    sys.stdout.write(f"  qcow2 / fvd         = {report['qcow2_over_fvd']:.2f}x\n")
    sys.stdout.write(f"  qcow2 / fvd-compact = {report['qcow2_over_fvd_compact']:.2f}x\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
