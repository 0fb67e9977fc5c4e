#!/usr/bin/env python3
"""Read-speed benchmark of diskspec's qcow2 reader against qemu and two other readers.

Measures, in one run, as ratios:

1. ``sequential``: a fully allocated 1 GiB qcow2 (64 KiB clusters) read from start to end
   with ``Image.pread`` in 1, 2 and 4 MiB calls and written to a raw file, against
   ``qemu-img convert -O raw IMG OUT``; wall time, best of 3, page cache warm.  Each diskspec
   run is timed inside a fresh Python process, as each qemu-img run is a fresh process.
2. ``random``: 20,000 reads of 4 KiB at random 4 KiB-aligned offsets (fixed seed) through
   ``Image.pread``, against ``dissect.hypervisor``'s ``QCow2`` stream and, when it installs,
   libyal's libqcow (``pyqcow``).  Every reader's bytes are checked first.
3. ``open``: a 4 TiB image with 4 KiB clusters (an L1 of 2 Mi entries): ``diskspec.open``,
   one 512-byte ``pread`` and ``close``, best of 5; ``qemu-io -r -c 'read OFS 512'`` for
   context.

The peers are listed in ``bench/requirements-bench.txt``; missing ones are installed with
pip into the running Python.  Run: ``python bench/qcow2_read_bench.py [--json]``.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import importlib
import json
import os
import platform
import pstats
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import diskspec

BENCH_DIR = Path(__file__).resolve().parent
REQUIREMENTS = BENCH_DIR / "requirements-bench.txt"

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

SEQ_SIZE = 1 * GiB
SEQ_CLUSTER = 64 * KiB
PATTERN = 0x5A  # every byte of the image is this, except an 8-byte tag per 4 KiB block
TAG_EVERY = 4 * KiB
DEFAULT_CHUNKS_MIB = (1, 2, 4)

RANDOM_READS = 20_000
READ_SIZE = 4 * KiB
SEED = 20240601

BIG_SIZE = 4 * TiB
BIG_CLUSTER = 4 * KiB
BIG_OFFSET = 3 * TiB + 7 * 512  # an L1 entry near the end of the table, unallocated
SECTOR = 512

TARGET_SEQ_MAX = 1.1  # diskspec time / qemu-img convert time
TARGET_DISSECT_MIN = 3.0  # dissect time / diskspec time
TARGET_LIBQCOW_MIN = 1.0  # libqcow time / diskspec time
TARGET_OPEN_MAX_S = 0.020


class BenchError(RuntimeError):
    """The benchmark cannot run, or a reader returned wrong bytes."""


def log(message: str) -> None:
    """Progress and set-up messages; stderr, so that --json output stays clean."""
    print(f"qcow2_read_bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def _need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} not found on PATH; `make qemu` installs qemu-utils")
    return path


def _run(command: Sequence[str]) -> str:
    proc = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(command)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


# --------------------------------------------------------------------------- peers


@dataclasses.dataclass(frozen=True, slots=True)
class PeerSpec:
    """How to find one peer once pip has it."""

    key: str
    label: str
    module: str


KNOWN_PEERS = {
    "dissect-hypervisor": PeerSpec(
        "dissect", "dissect.hypervisor", "dissect.hypervisor.disk.qcow2"
    ),
    "libqcow-python": PeerSpec("libqcow", "libqcow (pyqcow)", "pyqcow"),
}


@dataclasses.dataclass(slots=True)
class Peer:
    """A peer reader: what the requirements file asks for and what we got."""

    spec: PeerSpec
    requirement: str
    distribution: str
    status: str = "missing"  # present, installed, failed, missing
    version: str | None = None
    module: Any = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.module is not None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> list[tuple[str, str]]:
    """(distribution name, requirement line) for each requirement of the file."""
    if not path.is_file():
        raise BenchError(f"{path} is missing")
    out: list[tuple[str, str]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match is None:
            raise BenchError(f"{path}: cannot read the requirement {line!r}")
        out.append((match.group(0), line))
    return out


def _installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _pip_install(requirement: str) -> tuple[bool, str]:
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
    ]
    log(f"installing {requirement} into {sys.prefix}: {' '.join(command)}")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return False, "pip did not finish within 300 s"
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [line.strip() for line in lines if line.startswith("ERROR")] or lines[-3:]
        return False, f"pip exited with status {proc.returncode}: {' | '.join(errors)}"
    return True, "installed with pip"


def ensure_peers(install: bool, notes: list[str]) -> dict[str, Peer]:
    """Import each peer of the requirements file, installing it with pip when missing."""
    peers: dict[str, Peer] = {}
    for distribution, requirement in read_requirements(REQUIREMENTS):
        spec = KNOWN_PEERS.get(_canonical(distribution))
        if spec is None:
            notes.append(f"{REQUIREMENTS.name} lists {requirement!r}, which no comparison uses")
            continue
        peer = Peer(spec, requirement, distribution)
        peers[spec.key] = peer
        version = _installed_version(distribution)
        if version is not None:
            peer.status, peer.message = "present", "already installed"
        elif not install:
            peer.status, peer.message = "missing", "not installed, and --no-install was given"
            continue
        else:
            ok, peer.message = _pip_install(requirement)
            peer.status = "installed" if ok else "failed"
            if not ok:
                log(f"{requirement} could not be installed: {peer.message}")
                continue
            importlib.invalidate_caches()
            version = _installed_version(distribution)
        peer.version = version
        try:
            peer.module = importlib.import_module(spec.module)
        except Exception as exc:  # a broken install is reported, not fatal
            peer.status = "failed"
            peer.message = f"import {spec.module} failed: {type(exc).__name__}: {exc}"
            log(f"{distribution}: {peer.message}")
            continue
        pinned = requirement.partition("==")[2].strip()
        if pinned and version != pinned:
            notes.append(
                f"{distribution} {version} is installed; {REQUIREMENTS.name} pins {pinned}"
            )
    for key in ("dissect", "libqcow"):
        if key not in peers:
            spec = next(s for s in KNOWN_PEERS.values() if s.key == key)
            peers[key] = Peer(spec, "", spec.label, "missing", None, None, "not listed")
    return peers


# --------------------------------------------------------------------------- timing


@contextmanager
def no_gc() -> Iterator[None]:
    """The collector off while a run is timed, as timeit does, for every reader alike."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_runs(
    fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None
) -> list[float]:
    """Wall time of ``repeat`` calls of ``fn``; ``before`` runs untimed ahead of each."""
    runs: list[float] = []
    for _ in range(repeat):
        if before is not None:
            before()
        with no_gc():
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
    return runs


PROFILE_TOP = 15


def profile(fn: Callable[[], object], what: str, top: int = PROFILE_TOP) -> dict[str, Any]:
    """cProfile one call of ``fn`` in this process; see summarise_stats."""
    profiler = cProfile.Profile()
    with no_gc():
        profiler.enable()
        fn()
        profiler.disable()
    return {"what": what, **summarise_stats(pstats.Stats(profiler), top)}


def summarise_stats(stats: pstats.Stats, top: int) -> dict[str, Any]:
    """The functions with the most own time, in % of the profiled total."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    table = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in table.values()) or 1e-12
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in sorted(
        table.items(), key=lambda item: item[1][2], reverse=True
    )[:top]:
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append(
            {
                "function": f"{func} ({where})" if where != "~" else func,
                "ncalls": ncalls,
                "tottime_s": tottime,
                "tottime_pct": 100.0 * tottime / total,
                "cumtime_s": cumtime,
                "cumtime_pct": 100.0 * cumtime / total,
            }
        )
    return {"total_s": total, "top": rows}


# --------------------------------------------------------------------------- images


def write_source(path: Path) -> None:
    """A 1 GiB raw file: 0x5a everywhere, each 4 KiB block starting with its offset + 1."""
    block = bytearray([PATTERN]) * MiB
    pack = struct.Struct(">Q").pack_into
    with path.open("wb") as f:
        for base in range(0, SEQ_SIZE, MiB):
            for at in range(0, MiB, TAG_EVERY):
                pack(block, at, base + at + 1)
            f.write(block)


def make_sequential_image(folder: Path) -> tuple[Path, Path]:
    """The raw source and the qcow2 qemu-img convert makes of it (fully allocated)."""
    source = folder / "source.raw"
    image = folder / "seq.qcow2"
    write_source(source)
    qemu_img = _need_tool("qemu-img")
    _run(
        [
            qemu_img,
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            f"cluster_size={SEQ_CLUSTER}",
            str(source),
            str(image),
        ]
    )
    extents = json.loads(_run([qemu_img, "map", "--output=json", str(image)]))
    covered = sum(e["length"] for e in extents if e.get("data") and not e.get("zero"))
    if covered != SEQ_SIZE:
        raise BenchError(f"{image}: only {covered} of {SEQ_SIZE} bytes are allocated data")
    return source, image


def make_big_image(folder: Path) -> Path:
    image = folder / "big.qcow2"
    _run(
        [
            _need_tool("qemu-img"),
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={BIG_CLUSTER}",
            str(image),
            str(BIG_SIZE),
        ]
    )
    return image


def warm(path: Path) -> None:
    """Read a file once so that its pages are in the page cache."""
    buf = bytearray(4 * MiB)
    with path.open("rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def same_file(a: Path, b: Path) -> str | None:
    """None when both files hold the same bytes, else where they first differ."""
    if a.stat().st_size != b.stat().st_size:
        return f"sizes {a.stat().st_size} and {b.stat().st_size}"
    with a.open("rb") as fa, b.open("rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                at = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
                return f"first difference at byte {offset + at:#x}"
            if not x:
                return None
            offset += len(x)


# --------------------------------------------------------------------------- (1) sequential


def diskspec_copy(image: Path, out: Path, chunk: int) -> None:
    """What the benchmark times: open, pread the whole disk chunk by chunk, write, close."""
    img = diskspec.open(image)
    try:
        size = img.size
        pread = img.pread
        with out.open("wb") as f:
            write = f.write
            for offset in range(0, size, chunk):
                write(pread(min(chunk, size - offset), offset))
    finally:
        img.close()


def floor_copy(image: Path, out: Path, chunk: int, reuse: bool) -> None:
    """Context only: the image file's bytes copied as is, with no qcow2 mapping at all."""
    fd = os.open(image, os.O_RDONLY)
    try:
        size = min(SEQ_SIZE, os.fstat(fd).st_size)
        with out.open("wb") as f:
            if reuse:
                view = memoryview(bytearray(chunk))
                for offset in range(0, size, chunk):
                    got = os.preadv(fd, [view], offset)
                    f.write(view[:got])
            else:
                for offset in range(0, size, chunk):
                    f.write(os.pread(fd, chunk, offset))
    finally:
        os.close(fd)


def qemu_convert_run(qemu_img: str, image: Path, out: Path) -> dict[str, Any]:
    """One timed qemu-img convert: its process's wall time and its rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _run([qemu_img, "convert", "-O", "raw", str(image), str(out)])
    seconds = time.perf_counter() - start
    return _usage(seconds, before, resource.getrusage(resource.RUSAGE_CHILDREN))


def _usage(seconds: float, before: Any, after: Any) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = min(runs, key=lambda r: float(r["seconds"]))
    return {**best, "runs_s": [r["seconds"] for r in runs]}


def bench_sequential(
    args: argparse.Namespace, folder: Path, source: Path, image: Path
) -> tuple[list[dict[str, Any]], Callable[[], dict[str, Any]]]:
    qemu_img = _need_tool("qemu-img")
    out = folder / "out.raw"

    def fresh() -> None:
        out.unlink(missing_ok=True)
        os.sync()  # no write-back of an earlier run's output during this one

    def diskspec_run(mib: int, profile_to: Path | None = None) -> dict[str, Any]:
        fresh()
        return run_child("copy", str(image), str(out), str(mib * MiB), profile_to=profile_to)

    # Warm the page cache, then check both tools make the source's bytes.
    log("sequential: warming the page cache and checking both outputs")
    warm(image)
    fresh()
    qemu_convert_run(qemu_img, image, out)
    if (diff := same_file(out, source)) is not None:
        raise BenchError(f"qemu-img convert output differs from the source: {diff}")
    diskspec_run(2)
    if (diff := same_file(out, source)) is not None:
        raise BenchError(f"diskspec output differs from the source: {diff}")

    log(f"sequential: qemu-img convert, best of {args.repeat_seq}")
    qemu_runs = []
    for _ in range(args.repeat_seq):
        fresh()
        qemu_runs.append(qemu_convert_run(qemu_img, image, out))

    variants: list[dict[str, Any]] = []
    for mib in args.chunks:
        log(f"sequential: diskspec, {mib} MiB preads, best of {args.repeat_seq} fresh processes")
        runs = [diskspec_run(mib) for _ in range(args.repeat_seq)]
        if (diff := same_file(out, source)) is not None:
            raise BenchError(f"diskspec output ({mib} MiB preads) differs from the source: {diff}")
        variants.append({"chunk_mib": mib, **_best(runs)})
    best = min(variants, key=lambda v: float(v["seconds"]))

    log("sequential: context runs")
    context: dict[str, Any] = {}
    for reuse, key in ((False, "os.pread"), (True, "os.preadv")):
        runs = []
        for _ in range(args.repeat_seq):
            fresh()
            runs.append(run_child("floor", str(image), str(out), str(2 * MiB), str(int(reuse))))
        context[key] = {"chunk_mib": 2, **_best(runs)}
    # The same diskspec code in this process, where glibc's malloc has already been made to
    # keep large blocks (an 8 MiB object allocated and freed): what page faults cost.
    grown = bytes(8 * MiB)
    del grown
    runs = []
    for _ in range(args.repeat_seq):
        fresh()
        before = resource.getrusage(resource.RUSAGE_SELF)
        with no_gc():
            start = time.perf_counter()
            diskspec_copy(image, out, best["chunk_mib"] * MiB)
            seconds = time.perf_counter() - start
        runs.append(_usage(seconds, before, resource.getrusage(resource.RUSAGE_SELF)))
    context["diskspec_in_bench_process"] = {"chunk_mib": best["chunk_mib"], **_best(runs)}
    out.unlink(missing_ok=True)

    q = _best(qemu_runs)
    ratio = best["seconds"] / q["seconds"]
    result = {
        "id": "sequential",
        "title": f"(1) sequential {SEQ_SIZE // GiB} GiB -> raw file",
        "diskspec": {
            **best,
            "variant": f"{best['chunk_mib']} MiB preads",
            "mib_per_s": SEQ_SIZE / MiB / best["seconds"],
        },
        "other": {
            "name": "qemu-img convert -O raw",
            **q,
            "mib_per_s": SEQ_SIZE / MiB / q["seconds"],
        },
        "all_variants": variants,
        "context": context,
        "ratio": {"name": "diskspec/qemu-img", "value": ratio},
        "target": {"text": f"<= {TARGET_SEQ_MAX:g}x", "met": ratio <= TARGET_SEQ_MAX},
    }

    def profile_fn() -> dict[str, Any]:
        stats_file = folder / "sequential.prof"
        diskspec_run(best["chunk_mib"], stats_file)
        out.unlink(missing_ok=True)
        return {
            "what": f"one fresh-process run, {best['chunk_mib']} MiB preads",
            **summarise_stats(pstats.Stats(str(stats_file)), PROFILE_TOP),
        }

    return [result], profile_fn


# --------------------------------------------------------------------------- child processes


CHILD = "__child__"


def run_child(task: str, *params: str, profile_to: Path | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it prints its result as a JSON line.

    With ``profile_to`` the child runs the task under cProfile and dumps the stats there.
    """
    where = str(profile_to) if profile_to is not None else "-"
    output = _run([sys.executable, str(Path(__file__).resolve()), CHILD, task, where, *params])
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def child_main(argv: Sequence[str]) -> int:
    """The measuring side of run_child: time one task from a fresh start, print JSON."""
    import diskspec.qcow2.image  # noqa: F401  (diskspec.open imports it lazily: not timed)

    task, where, *params = argv
    profile_to = None if where == "-" else where
    fn: Callable[[], object]
    if task == "copy":
        image, out, chunk = params
        fn = partial(diskspec_copy, Path(image), Path(out), int(chunk))
    elif task == "floor":
        image, out, chunk, reuse = params
        fn = partial(floor_copy, Path(image), Path(out), int(chunk), reuse == "1")
    elif task == "open":
        image, offset = params
        fn = partial(open_read_close, Path(image), int(offset))
    else:
        raise SystemExit(f"unknown child task {task!r}")
    profiler = cProfile.Profile() if profile_to else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    with no_gc():
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        fn()
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - start
    result = _usage(seconds, before, resource.getrusage(resource.RUSAGE_SELF))
    if profiler is not None and profile_to is not None:
        profiler.dump_stats(profile_to)
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- (2) random


def bench_random(
    args: argparse.Namespace, source: Path, image: Path, peers: dict[str, Peer], notes: list[str]
) -> tuple[list[dict[str, Any]], Callable[[], dict[str, Any]]]:
    rng = random.Random(SEED)
    blocks = SEQ_SIZE // READ_SIZE
    offsets = [rng.randrange(blocks) * READ_SIZE for _ in range(args.reads)]
    fd = os.open(source, os.O_RDONLY)
    try:
        expected = [os.pread(fd, READ_SIZE, o) for o in offsets]
    finally:
        os.close(fd)

    readers: dict[str, Callable[[], list[bytes]]] = {}
    labels: dict[str, str] = {}
    closers: list[Callable[[], object]] = []

    img = diskspec.open(image)
    closers.append(img.close)

    def ds_reads() -> list[bytes]:
        pread = img.pread
        return [pread(READ_SIZE, o) for o in offsets]

    readers["diskspec"] = ds_reads
    labels["diskspec"] = "Image.pread"

    dissect = peers["dissect"]
    if dissect.ok:
        fh = image.open("rb")
        closers.append(fh.close)
        stream = dissect.module.QCow2(fh).open()

        def dissect_reads() -> list[bytes]:
            seek, read = stream.seek, stream.read
            out = []
            for o in offsets:
                seek(o)
                out.append(read(READ_SIZE))
            return out

        readers["dissect"] = dissect_reads
        labels["dissect"] = "QCow2(fileobj).open(): seek + read"

    libqcow = peers["libqcow"]
    if libqcow.ok:
        pyqcow = libqcow.module
        by_path = pyqcow.file()
        by_path.open(str(image))
        closers.append(by_path.close)
        fobj = image.open("rb")
        by_fobj = pyqcow.file()
        by_fobj.open_file_object(fobj)
        closers += [by_fobj.close, fobj.close]

        def libqcow_path_reads() -> list[bytes]:
            read = by_path.read_buffer_at_offset
            return [read(READ_SIZE, o) for o in offsets]

        def libqcow_fobj_reads() -> list[bytes]:
            read = by_fobj.read_buffer_at_offset
            return [read(READ_SIZE, o) for o in offsets]

        readers["libqcow/path"] = libqcow_path_reads
        labels["libqcow/path"] = "file.open(path): read_buffer_at_offset"
        readers["libqcow/fileobj"] = libqcow_fobj_reads
        labels["libqcow/fileobj"] = "file.open_file_object(f): read_buffer_at_offset"

    try:
        # Verification, before any timing: every read of every reader against the source.
        log(f"random: checking all {len(offsets)} reads of {', '.join(readers)}")
        for name, fn in readers.items():
            got = fn()
            for o, want, have in zip(offsets, expected, got, strict=True):
                if have != want:
                    raise BenchError(
                        f"{name}: {READ_SIZE} bytes at {o:#x} differ from the source "
                        f"(got {have[:16].hex()}..., want {want[:16].hex()}...)"
                    )
        timings: dict[str, list[float]] = {}
        for name, fn in readers.items():
            log(f"random: {name}, best of {args.repeat_random}")
            timings[name] = time_runs(fn, args.repeat_random)
    finally:
        for close in reversed(closers):
            close()

    n = len(offsets)
    ds = min(timings["diskspec"])
    ds_entry = {
        "seconds": ds,
        "us_per_read": ds / n * 1e6,
        "variant": labels["diskspec"],
        "runs_s": timings["diskspec"],
    }
    results: list[dict[str, Any]] = []

    def entry(key: str, title: str, names: list[str], target: float) -> None:
        peer = peers[key]
        row: dict[str, Any] = {"id": f"random_{key}", "title": title, "diskspec": ds_entry}
        if not peer.ok:
            row.update(
                other={"name": peer.spec.label, "version": peer.version},
                skipped=f"{peer.spec.label}: {peer.status}: {peer.message}",
                ratio={"name": f"{key}/diskspec", "value": None},
                target={"text": f">= {target:g}x", "met": None},
            )
            results.append(row)
            return
        variants: list[dict[str, Any]] = [
            {
                "variant": labels[name],
                "seconds": min(timings[name]),
                "us_per_read": min(timings[name]) / n * 1e6,
                "runs_s": timings[name],
            }
            for name in names
        ]
        best = min(variants, key=lambda v: v["seconds"])
        ratio = best["seconds"] / ds
        row.update(
            other={"name": peer.spec.label, "version": peer.version, **best},
            all_variants=variants,
            ratio={"name": f"{key}/diskspec", "value": ratio},
            target={"text": f">= {target:g}x", "met": ratio >= target},
        )
        results.append(row)

    title = f"(2) {n} random {READ_SIZE // KiB} KiB reads"
    entry("dissect", title, ["dissect"], TARGET_DISSECT_MIN)
    entry("libqcow", title, ["libqcow/path", "libqcow/fileobj"], TARGET_LIBQCOW_MIN)
    if dissect.ok:
        notes.append(
            "dissect's QCow2Stream is an AlignedStream aligned to the cluster size: each 4 KiB "
            "read fetches and keeps the whole 64 KiB cluster (that is how the package reads)"
        )

    def profiled() -> object:
        with diskspec.open(image) as again:
            pread = again.pread
            for o in offsets[:200]:
                pread(READ_SIZE, o)  # L2 tables loaded, as in the timed runs
            return [pread(READ_SIZE, o) for o in offsets]

    return results, partial(profile, profiled, f"{len(offsets)} reads after 200 warm-up reads")


# --------------------------------------------------------------------------- (3) open


def open_read_close(image: Path, offset: int) -> bytes:
    """What (3) times: open, one 512-byte pread, close."""
    img = diskspec.open(image)
    try:
        return img.pread(SECTOR, offset)
    finally:
        img.close()


def bench_open(
    args: argparse.Namespace, image: Path
) -> tuple[list[dict[str, Any]], Callable[[], dict[str, Any]]]:
    qemu_io = _need_tool("qemu-io")
    once = partial(open_read_close, image, BIG_OFFSET)

    warm(image)
    with diskspec.open(image) as img:
        if img.size != BIG_SIZE:
            raise BenchError(f"{image}: diskspec reads a size of {img.size}, want {BIG_SIZE}")
    if once() != bytes(SECTOR):
        raise BenchError(f"diskspec: the sector at {BIG_OFFSET:#x} of an empty image is not zero")
    check = _run([qemu_io, "-r", "-c", f"read -P 0 {BIG_OFFSET} {SECTOR}", str(image)])
    if "failed" in check.lower():
        raise BenchError(f"qemu-io pattern check failed: {check.strip()}")

    log(f"open: diskspec, best of {args.repeat_open}")
    runs = time_runs(once, args.repeat_open)
    qemu_cmd = [qemu_io, "-r", "-c", f"read {BIG_OFFSET} {SECTOR}", str(image)]
    qemu_runs = time_runs(partial(_run, qemu_cmd), args.repeat_open)

    # Context: the first open of a fresh interpreter (diskspec already imported), and the
    # whole process (start, import, open, read, close) as qemu-io's time is.
    log("open: context runs in fresh processes")
    first = [run_child("open", str(image), str(BIG_OFFSET)) for _ in range(args.repeat_open)]
    code = (
        "import sys, diskspec\n"
        "img = diskspec.open(sys.argv[1])\n"
        "data = img.pread(512, int(sys.argv[2]))\n"
        "img.close()\n"
        "sys.exit(data != bytes(512))\n"
    )
    process_cmd = [sys.executable, "-c", code, str(image), str(BIG_OFFSET)]
    process_runs = time_runs(partial(_run, process_cmd), args.repeat_open)
    bare_runs = time_runs(partial(_run, [sys.executable, "-c", "pass"]), args.repeat_open)

    best = min(runs)
    l1_entries = -(-BIG_SIZE // (BIG_CLUSTER * (BIG_CLUSTER // 8)))
    first_best = _best(first)
    result = {
        "id": "open",
        "title": f"(3) open {BIG_SIZE // TiB} TiB/{BIG_CLUSTER // KiB} KiB + pread 512 + close",
        "diskspec": {"seconds": best, "variant": "in process", "runs_s": runs},
        "other": {
            "name": "qemu-io -r (process)",
            "seconds": min(qemu_runs),
            "runs_s": qemu_runs,
            "command": f"qemu-io -r -c 'read {BIG_OFFSET} {SECTOR}' IMG",
        },
        "context": {
            "diskspec_first_open_fresh_process": {
                **first_best,
                "met": first_best["seconds"] < TARGET_OPEN_MAX_S,
            },
            "diskspec_whole_process": {"seconds": min(process_runs), "runs_s": process_runs},
            "python_startup_only": {"seconds": min(bare_runs), "runs_s": bare_runs},
        },
        "l1_entries": l1_entries,
        "ratio": {"name": "diskspec/qemu-io", "value": best / min(qemu_runs)},
        "target": {"text": f"< {TARGET_OPEN_MAX_S * 1e3:g} ms", "met": best < TARGET_OPEN_MAX_S},
    }

    def profile_fn() -> dict[str, Any]:
        stats_file = image.with_suffix(".prof")
        run_child("open", str(image), str(BIG_OFFSET), profile_to=stats_file)
        return {
            "what": "the first open of a fresh process (diskspec already imported)",
            **summarise_stats(pstats.Stats(str(stats_file)), PROFILE_TOP),
        }

    return [result], profile_fn


# --------------------------------------------------------------------------- output


def environment(peers: dict[str, Peer], load_at_start: list[float]) -> dict[str, Any]:
    qemu_img = _run([_need_tool("qemu-img"), "--version"]).splitlines()
    qemu_io = _run([_need_tool("qemu-io"), "--version"]).splitlines()
    return {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "packages": {
            "diskspec": metadata.version("diskspec"),
            **{p.spec.label: p.version for p in peers.values()},
        },
        "qemu_img": qemu_img[0] if qemu_img else "?",
        "qemu_io": qemu_io[0] if qemu_io else "?",
    }


def fmt_time(seconds: float | None) -> str:
    """Seconds in the largest unit that keeps the figure at or above 1."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def _faults(run: dict[str, Any]) -> str:
    """The rusage figures of a best run."""
    return (
        f"best run: {run['minor_faults']} minor page faults, user {run['user_s']:.2f} s, "
        f"sys {run['sys_s']:.2f} s"
    )


def _runs(runs: Sequence[float]) -> str:
    return ", ".join(fmt_time(r) for r in runs)


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    pk = env["packages"]
    peers = report["peers"]
    lines = [
        "diskspec qcow2 read benchmark: diskspec vs qemu-img/qemu-io, dissect.hypervisor, libqcow",
        f"python {env['python']['version']} ({env['python']['implementation']}, "
        f"{env['platform']['system']} {env['platform']['machine']}, {env['cpus']} cpus, "
        f"load {env['load_average_at_start'][0]})  "
        + "  ".join(f"{name} {version or '-'}" for name, version in pk.items()),
        f"{env['qemu_img']}; {env['qemu_io']}",
    ]
    for p in peers.values():
        lines.append(f"peer {p['label']}: {p['status']} ({p['message']})")
    img = report["images"]
    lines += [
        f"image (1)(2): qcow2 v3, {img['sequential']['virtual_size'] // GiB} GiB, "
        f"{img['sequential']['cluster_size'] // KiB} KiB clusters, every cluster allocated "
        f"(qemu-img convert of a raw file of {PATTERN:#x} with a tag per 4 KiB), "
        f"{img['sequential']['file_size'] / MiB:.0f} MiB file",
        f"image (3): qcow2 v3, {img['open']['virtual_size'] // TiB} TiB, "
        f"{img['open']['cluster_size'] // KiB} KiB clusters, {img['open']['l1_entries']} L1 "
        f"entries, nothing allocated, {img['open']['file_size'] / MiB:.0f} MiB file",
        f"timing: wall time, best of {report['timing']['repeat_seq']} (1), "
        f"{report['timing']['repeat_random']} (2), {report['timing']['repeat_open']} (3); "
        "page cache warm; results verified before timing",
        "",
    ]
    head = ["benchmark", "diskspec", "compared with", "other", "ratio", "target", "result"]
    rows = [head]
    for b in report["benchmarks"]:
        ratio = b["ratio"]["value"]
        met = b["target"]["met"]
        other = b.get("other", {})
        name = other.get("name", "")
        if other.get("variant"):
            name += f" [{other['variant'].split(':')[0]}]"
        rows.append(
            [
                b["title"],
                f"{fmt_time(b['diskspec']['seconds'])} [{b['diskspec']['variant']}]",
                name,
                fmt_time(other.get("seconds")),
                f"{b['ratio']['name']} {ratio:.2f}x" if ratio is not None else "-",
                b["target"]["text"] if b["id"] != "open" else f"diskspec {b['target']['text']}",
                "SKIPPED" if "skipped" in b else ("met" if met else "NOT met"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)]
        cells += [c.ljust(w) for c, w in zip(row[4:], widths[4:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for b in report["benchmarks"]:
        d = b["diskspec"]
        if b["id"] == "sequential":
            o = b["other"]
            lines.append(
                f"(1) diskspec {d['mib_per_s']:.0f} MiB/s, qemu-img convert {o['mib_per_s']:.0f} "
                f"MiB/s; qemu-img runs {_runs(o['runs_s'])}; {_faults(o)}"
            )
            for v in b["all_variants"]:
                lines.append(
                    f"    diskspec {v['chunk_mib']} MiB preads (fresh process each): "
                    f"{_runs(v['runs_s'])}; {_faults(v)}"
                )
            c = b["context"]
            for key, text in (
                ("os.pread", "os.pread of the image file into new bytes + write"),
                ("os.preadv", "os.preadv of the image file into one reused buffer + write"),
            ):
                lines.append(
                    f"    context, no qcow2 mapping, fresh process: {text}, {c[key]['chunk_mib']} "
                    f"MiB: best {fmt_time(c[key]['seconds'])} ({_runs(c[key]['runs_s'])}); "
                    f"{_faults(c[key])}"
                )
            g = c["diskspec_in_bench_process"]
            lines.append(
                f"    context, diskspec in the bench process after an 8 MiB object was freed "
                f"(malloc keeps big blocks), {g['chunk_mib']} MiB preads: best "
                f"{fmt_time(g['seconds'])} ({_runs(g['runs_s'])}); {_faults(g)}"
            )
        elif b["id"].startswith("random") and "skipped" not in b:
            lines.append(
                f"(2) diskspec {d['us_per_read']:.2f} us/read ({_runs(d['runs_s'])}); "
                f"{b['other']['name']}:"
            )
            for v in b["all_variants"]:
                lines.append(
                    f"    {v['variant']}: {v['us_per_read']:.2f} us/read ({_runs(v['runs_s'])})"
                )
        elif b["id"] == "open":
            c = b["context"]
            first = c["diskspec_first_open_fresh_process"]
            lines.append(
                f"(3) diskspec in process: {_runs(d['runs_s'])}; qemu-io process: "
                f"{_runs(b['other']['runs_s'])} ({b['other']['command']})"
            )
            lines.append(
                "    context: first open + pread + close of a fresh python process (diskspec "
                f"imported before): best {fmt_time(first['seconds'])} ({_runs(first['runs_s'])}; "
                f"{_faults(first)}), {'under' if first['met'] else 'NOT under'} the target"
            )
            lines.append(
                "    context: a whole python process (start, import, open, read, close) best "
                f"{fmt_time(c['diskspec_whole_process']['seconds'])}; `python -c pass` alone "
                f"{fmt_time(c['python_startup_only']['seconds'])}"
            )
    for b in report["benchmarks"]:
        if "skipped" in b:
            lines.append(f"SKIPPED {b['id']}: {b['skipped']}")
    missed = [key for key, met in report["target_met"].items() if met is False]
    skipped = [key for key, met in report["target_met"].items() if met is None]
    verdict = "NOT met in " + ", ".join(missed) if missed else "met in every benchmark run"
    if skipped:
        verdict += f" (skipped: {', '.join(skipped)})"
    lines.append(f"targets: {verdict}")
    for key, prof in report.get("profiles", {}).items():
        lines.append(
            f"profile of diskspec in {key}, {prof['what']} (cProfile; % of the "
            f"{prof['total_s']:.3f} s profiled; own = in the function itself, cum = with callees):"
        )
        for row in prof["top"]:
            lines.append(
                f"    {row['tottime_pct']:5.1f}% own  {row['cumtime_pct']:5.1f}% cum  "
                f"{row['ncalls']:>7} calls  {row['function']}"
            )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"total run time {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _chunks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MiB counts: {text!r}") from None
    if not values or any(not 1 <= v <= 4 for v in values):
        raise argparse.ArgumentTypeError("chunk sizes are 1 to 4 MiB")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--chunks",
        type=_chunks,
        default=DEFAULT_CHUNKS_MIB,
        help="pread sizes in MiB for (1), comma-separated (default 1,2,4); the best is compared",
    )
    parser.add_argument("--repeat-seq", type=int, default=3, help="runs of (1) (default 3)")
    parser.add_argument("--repeat-random", type=int, default=5, help="runs of (2) (default 5)")
    parser.add_argument("--repeat-open", type=int, default=5, help="runs of (3) (default 5)")
    parser.add_argument(
        "--reads", type=int, default=RANDOM_READS, help=f"reads in (2) (default {RANDOM_READS})"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not pip install missing peers; skip them"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile diskspec in every benchmark that misses its target and print where "
        "the time goes",
    )
    parser.add_argument(
        "--tmpdir", type=Path, default=None, help="where the temporary images go (default: TMPDIR)"
    )
    args = parser.parse_args(argv)
    for name in ("repeat_seq", "repeat_random", "repeat_open", "reads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    notes: list[str] = []
    load = [round(x, 2) for x in os.getloadavg()]
    if load[0] > 0.5:
        notes.append(
            f"the load average was {load[0]} when the run started: other processes share the "
            "cpus, so the figures are noisier than on an idle machine"
        )
    _need_tool("qemu-img")
    _need_tool("qemu-io")
    peers = ensure_peers(not args.no_install, notes)
    benchmarks: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="diskspec-read-bench-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        log(f"making the images in {folder}")
        source, seq_image = make_sequential_image(folder)
        big_image = make_big_image(folder)

        seq, seq_profile = bench_sequential(args, folder, source, seq_image)
        rnd, rnd_profile = bench_random(args, source, seq_image, peers, notes)
        opened, open_profile = bench_open(args, big_image)
        benchmarks = seq + rnd + opened
        images = {
            "sequential": {
                "virtual_size": SEQ_SIZE,
                "cluster_size": SEQ_CLUSTER,
                "file_size": seq_image.stat().st_size,
                "made_with": "qemu-img convert -f raw -O qcow2 -o cluster_size=65536 SRC IMG",
            },
            "open": {
                "virtual_size": BIG_SIZE,
                "cluster_size": BIG_CLUSTER,
                "file_size": big_image.stat().st_size,
                "l1_entries": opened[0]["l1_entries"],
                "made_with": "qemu-img create -f qcow2 -o cluster_size=4096 IMG 4T",
                "read_offset": BIG_OFFSET,
            },
        }
        if args.profile:
            fns: dict[str, Callable[[], dict[str, Any]]] = {
                "sequential": seq_profile,
                "random": rnd_profile,
                "open": open_profile,
            }
            for b in benchmarks:
                group = b["id"].split("_")[0]
                first = b.get("context", {}).get("diskspec_first_open_fresh_process", {})
                missed = b["target"]["met"] is False or first.get("met") is False
                if missed and group not in profiles:
                    log(f"profiling diskspec in {group}")
                    profiles[group] = fns[group]()
    notes.append(
        "(1) each run starts with the output file removed and os.sync(), untimed. qemu-img's "
        "time is the wall time of its process (start-up included, about 10-20 ms); diskspec's "
        "is open + preads + writes + close, timed inside a fresh python process of its own "
        "(interpreter start and imports not counted), so that the benchmark's own big buffers "
        "do not change how malloc behaves for diskspec. qemu-img convert does not fsync its "
        "output (its default target cache mode is unsafe), and diskspec does not either"
    )
    return {
        "environment": environment(peers, load),
        "peers": {
            key: {
                "label": p.spec.label,
                "requirement": p.requirement,
                "status": p.status,
                "version": p.version,
                "message": p.message,
            }
            for key, p in peers.items()
        },
        "images": images,
        "timing": {
            "method": "time.perf_counter wall time per run, garbage collector off while timing, "
            "best of the runs",
            "repeat_seq": args.repeat_seq,
            "repeat_random": args.repeat_random,
            "repeat_open": args.repeat_open,
            "reads": args.reads,
            "seed": SEED,
        },
        "benchmarks": benchmarks,
        "target_met": {b["id"]: b["target"]["met"] for b in benchmarks},
        "profiles": profiles,
        "notes": notes,
        "elapsed_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"qcow2_read_bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
