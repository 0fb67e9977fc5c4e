#!/usr/bin/env python3
"""Parse-speed benchmark of the three qcow2 implementations, on a real qemu-made image.

Compares, in one run and on the same bytes:

* ``generated``: the typed dataclasses of ``diskspec.generated.qcow2``;
* ``construct``: the construct schemas of ``diskspec.generated.qcow2_construct``;
* ``ksc``: the Python module the official Kaitai Struct compiler makes of ``specs/qcow2.ksy``.

Benchmarks: (a) the 112-byte header, (b) the header cluster (header and extension area),
(c) one 64 KiB L2 table with every entry's host offset decoded.  Before timing, every
implementation's result is checked against the others; a mismatch aborts the run.

Run: ``python bench/parse_bench.py`` (table) or ``python bench/parse_bench.py --json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from array import array
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from construct import Computed, Struct
from kaitaistruct import KaitaiStream

from diskspec.generated import qcow2 as gen
from diskspec.generated import qcow2_construct as con
from diskspec.tests import ksc_support

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = REPO_ROOT / "specs" / "qcow2.ksy"

CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
VIRTUAL_SIZE = "1G"
PATTERN = 0x5A
DEFAULT_WRITE_MIB = 256
TARGET_RATIO = 10.0  # the goal: generated at least 10x faster than construct
IMPLS = ("generated", "construct", "ksc")
NATIVE = sys.byteorder

L2_MASK = gen.L2Entry.OFS_CLUSTER_DIV512_MASK
L2_SHIFT = gen.L2Entry.OFS_CLUSTER_DIV512_SHIFT


class BenchError(RuntimeError):
    """The benchmark cannot run, or the implementations disagree."""


# --------------------------------------------------------------------------- the image


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """The bytes every implementation parses, read from the image."""

    image: Path
    cluster0: bytes
    header: bytes
    ofs_l2_table: int
    l2_table: bytes
    write_bytes: int


def _run(command: Sequence[str]) -> str:
    proc = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(command)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} not found on PATH; `make qemu` installs qemu-utils")
    return path


def make_image(folder: Path, write_mib: int) -> Path:
    """qemu-img create a 1 GiB qcow2 with 64 KiB clusters, then qemu-io write a pattern."""
    image = folder / "bench.qcow2"
    qemu_img = _need_tool("qemu-img")
    qemu_io = _need_tool("qemu-io")
    options = f"cluster_size={CLUSTER_SIZE}"
    _run([qemu_img, "create", "-q", "-f", "qcow2", "-o", options, str(image), VIRTUAL_SIZE])
    _run([qemu_io, "-c", f"write -P {PATTERN:#x} 0 {write_mib}M", str(image)])
    return image


def read_sample(image: Path, write_mib: int) -> Sample:
    """Read cluster 0 and the L2 table the first L1 entry points at."""
    with image.open("rb") as f:
        cluster0 = f.read(CLUSTER_SIZE)
        root = gen.Qcow2.parse(cluster0)
        hdr = root.header
        if hdr.version != 3 or hdr.len_header != 112 or hdr.cluster_bits != CLUSTER_BITS:
            raise BenchError(
                f"unexpected image: version {hdr.version}, header_length {hdr.len_header}, "
                f"cluster_bits {hdr.cluster_bits} (want 3, 112, {CLUSTER_BITS})"
            )
        if hdr.incompatible_features and (
            hdr.incompatible_features & gen.IncompatibleFeature.EXTENDED_L2
        ):
            raise BenchError("the image has extended L2 entries; the benchmark wants standard ones")
        l1_table = root.read_l1_table(f)
        ofs_l2 = l1_table[0] & gen.L1Entry.OFS_L2_TABLE_DIV512_MASK
        if ofs_l2 == 0:
            raise BenchError("the first L1 entry is unallocated: qemu-io wrote nothing?")
        f.seek(ofs_l2)
        l2_table = f.read(CLUSTER_SIZE)
    if len(l2_table) != CLUSTER_SIZE:
        raise BenchError(f"short L2 table at {ofs_l2:#x}: {len(l2_table)} bytes")
    return Sample(
        image=image,
        cluster0=cluster0,
        header=cluster0[: hdr.len_header],
        ofs_l2_table=ofs_l2,
        l2_table=l2_table,
        write_bytes=write_mib << 20,
    )


# --------------------------------------------------------------------------- the parsers


@dataclasses.dataclass(slots=True)
class Variant:
    """One way one implementation does one benchmark."""

    impl: str
    label: str
    fn: Callable[[], object]


@dataclasses.dataclass(slots=True)
class Case:
    """One benchmark: a title and the variants timed for it."""

    key: str
    title: str
    variants: list[Variant]


def load_ksc(outdir: Path) -> tuple[Any, str]:
    """Compile specs/qcow2.ksy with the pinned official compiler; return (Qcow2 class, version)."""
    modules = ksc_support.ensure_compiler()
    ksc_support.compile_ksy([SPEC], outdir)
    module = ksc_support.load_compiled(outdir, "qcow2")
    package = modules / "kaitai-struct-compiler" / "package.json"
    version = str(json.loads(package.read_text(encoding="utf-8")).get("version", "?"))
    return module.Qcow2, version


def construct_root() -> Any:
    """construct's Qcow2 cut to its parsed fields (header, extension_area).

    The full construct Qcow2 also has the positioned tables (Pointer to the L1, refcount and
    snapshot tables), which it reads eagerly and which lie outside cluster 0; KSC makes them
    lazy instances and the dataclasses ``read_*`` methods, so neither reads them either.
    """
    subcons = con.Qcow2.subcons[:2]
    names = [sc.name for sc in subcons]
    if names != ["header", "extension_area"]:
        raise BenchError(f"construct Qcow2 starts with {names}, not header, extension_area")
    return Struct(*subcons)


def construct_l2_table(sample: Sample, notes: list[str]) -> Any:
    """construct's L2Table, called with parse(buf, cluster_bits=..., extended=...).

    construct puts parse() keyword arguments into the outermost context, which a Struct sees
    as ``ctx._`` / ``ctx._params`` and not as ``ctx.<name>``.  When the generated schema reads
    the parameters as ``ctx.<name>`` (it fails with AttributeError) the benchmark times the
    same fields inside a Struct that first copies the parameters into its own context.
    """
    try:
        con.L2Table.parse(sample.l2_table, cluster_bits=CLUSTER_BITS, extended=False)
    except AttributeError as exc:
        notes.append(
            "construct L2Table.parse(buf, cluster_bits=16, extended=False) fails with "
            f"AttributeError: {exc} (the schema reads ctx.{exc}, the keyword arguments are in "
            "ctx._params); timed as Struct(cluster_bits=Computed(ctx._params.cluster_bits), "
            "extended=Computed(ctx._params.extended), *L2Table.subcons), called the same way"
        )
        return Struct(
            "cluster_bits" / Computed(lambda ctx: ctx._params.cluster_bits),
            "extended" / Computed(lambda ctx: ctx._params.extended),
            *con.L2Table.subcons,
        )
    return con.L2Table


def build_cases(sample: Sample, ksc: Any, notes: list[str]) -> list[Case]:
    header = sample.header
    cluster0 = sample.cluster0
    table = sample.l2_table
    c_root = construct_root()
    c_l2 = construct_l2_table(sample, notes)
    g_header = gen.Header.parse
    g_root = gen.Qcow2.parse
    g_l2 = gen.L2Table.parse
    k_header = ksc.Header
    k_l2 = ksc.L2Table

    def g_entries() -> array[int]:
        entries = g_l2(table, cluster_bits=CLUSTER_BITS, extended=False).entries
        if entries is None:
            raise BenchError("generated L2Table has no standard entries")
        return entries

    def g_offsets_listcomp() -> list[int]:
        mask = L2_MASK
        return [e & mask for e in g_entries()]

    def g_offsets_map() -> list[int]:
        return list(map(L2_MASK.__and__, g_entries()))

    def g_offsets_bigint() -> list[int]:
        # One AND over the whole table as a single integer, then back to a list.
        entries = g_entries()
        raw = entries.tobytes()
        mask = int.from_bytes(L2_MASK.to_bytes(8, NATIVE) * len(entries), NATIVE)
        out = array("Q")
        out.frombytes((int.from_bytes(raw, NATIVE) & mask).to_bytes(len(raw), NATIVE))
        return out.tolist()

    def c_offsets() -> list[int]:
        parsed = c_l2.parse(table, cluster_bits=CLUSTER_BITS, extended=False)
        return [e.ofs_cluster_div512 << L2_SHIFT for e in parsed.entries]

    def k_offsets() -> list[int]:
        parsed = k_l2(CLUSTER_BITS, False, KaitaiStream(io.BytesIO(table)))
        return [e.ofs_cluster_div512 << L2_SHIFT for e in parsed.entries]

    return [
        Case(
            "header",
            f"(a) header ({len(header)} B)",
            [
                Variant("generated", "Header.parse", lambda: g_header(header)),
                Variant("construct", "Header.parse", lambda: con.Header.parse(header)),
                Variant("ksc", "Qcow2.Header", lambda: k_header(KaitaiStream(io.BytesIO(header)))),
            ],
        ),
        Case(
            "header_cluster",
            f"(b) header cluster ({len(cluster0) // 1024} KiB)",
            [
                Variant("generated", "Qcow2.parse", lambda: g_root(cluster0)),
                Variant("construct", "header+extension_area", lambda: c_root.parse(cluster0)),
                Variant("ksc", "Qcow2", lambda: ksc(KaitaiStream(io.BytesIO(cluster0)))),
            ],
        ),
        Case(
            "l2_table",
            f"(c) L2 table + offsets ({len(table) // 8} entries)",
            [
                Variant("generated", "listcomp", g_offsets_listcomp),
                Variant("generated", "map", g_offsets_map),
                Variant("generated", "bigint", g_offsets_bigint),
                Variant("construct", "L2Table.parse", c_offsets),
                Variant("ksc", "Qcow2.L2Table", k_offsets),
            ],
        ),
    ]


# --------------------------------------------------------------------------- verification


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):  # construct Container
        return obj.get(name)
    return getattr(obj, name, None)  # KSC leaves absent (if:) fields unset


def compare(ours: Any, theirs: Any, path: str) -> None:
    """Check ``theirs`` (construct or KSC) holds the values of ``ours`` (dataclasses), field
    by field; raise BenchError naming the first difference."""
    if dataclasses.is_dataclass(ours) and not isinstance(ours, type):
        for f in dataclasses.fields(ours):
            compare(getattr(ours, f.name), _field(theirs, f.name), f"{path}.{f.name}")
        return
    if isinstance(ours, (list, array)):
        if not isinstance(theirs, (list, array)) or len(theirs) != len(ours):
            raise BenchError(f"{path}: {len(ours)} items against {theirs!r:.200}")
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            compare(a, b, f"{path}[{i}]")
        return
    if ours is None or isinstance(ours, (bytes, bool)):
        same = theirs is None if ours is None else type(theirs) is type(ours) and theirs == ours
    elif isinstance(ours, int):  # also IntEnum and IntFlag members
        same = isinstance(theirs, int) and not isinstance(theirs, bool) and ours == theirs
    else:
        raise BenchError(f"{path}: cannot compare a {type(ours).__name__}")
    if not same:
        raise BenchError(f"{path}: generated {ours!r:.200}, other {theirs!r:.200}")


def verify(sample: Sample, cases: list[Case], ksc: Any) -> dict[str, Any]:
    """Run every variant once and check they agree; return facts about the data."""
    results: dict[str, dict[str, object]] = {
        case.key: {f"{v.impl}/{v.label}": v.fn() for v in case.variants} for case in cases
    }
    for key in ("header", "header_cluster"):
        (ours_name, ours_value), *others = results[key].items()
        for name, value in others:
            try:
                compare(ours_value, value, key)
            except BenchError as exc:
                raise BenchError(f"{name} disagrees with {ours_name}: {exc}") from None

    offsets = results["l2_table"]
    (first_name, first), *rest = offsets.items()
    for name, value in rest:
        if value != first:
            raise BenchError(f"L2 host offsets of {name} differ from those of {first_name}")
    if not isinstance(first, list):
        raise BenchError(f"{first_name} returned {type(first).__name__}, not a list")

    # Entry by entry, every field, not only the offsets.
    raw = gen.L2Table.parse(sample.l2_table, cluster_bits=CLUSTER_BITS, extended=False).entries
    if raw is None:
        raise BenchError("generated L2Table has no standard entries")
    ours = [gen.L2Entry.from_raw(word) for word in raw]
    c_table = construct_l2_table(sample, []).parse(
        sample.l2_table, cluster_bits=CLUSTER_BITS, extended=False
    )
    k_table = ksc.L2Table(CLUSTER_BITS, False, KaitaiStream(io.BytesIO(sample.l2_table)))
    compare(ours, c_table.entries, "construct L2Table.entries")
    compare(ours, k_table.entries, "ksc L2Table.entries")

    # The offsets are real: as many as qemu-io allocated, cluster-aligned, with the pattern.
    allocated = [o for o in first if o]
    want = min(sample.write_bytes, len(first) * CLUSTER_SIZE) // CLUSTER_SIZE
    if len(allocated) != want:
        raise BenchError(f"{len(allocated)} allocated L2 entries, want {want}")
    if any(o % CLUSTER_SIZE for o in allocated) or len(set(allocated)) != len(allocated):
        raise BenchError("L2 host offsets are not distinct cluster-aligned offsets")
    with sample.image.open("rb") as f:
        f.seek(allocated[0])
        if f.read(CLUSTER_SIZE) != bytes([PATTERN]) * CLUSTER_SIZE:
            raise BenchError(f"the cluster at {allocated[0]:#x} does not hold the pattern")
    return {"l2_entries": len(first), "l2_entries_allocated": len(allocated)}


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass(slots=True)
class Timing:
    impl: str
    label: str
    best_s: float
    loops: int
    runs_s: list[float]


def time_variant(variant: Variant, repeat: int) -> Timing:
    """timeit: auto-ranged loop count (>= 0.2 s per repeat), best of ``repeat``."""
    timer = timeit.Timer(variant.fn)
    loops, _ = timer.autorange()
    runs = [t / loops for t in timer.repeat(repeat=repeat, number=loops)]
    return Timing(variant.impl, variant.label, min(runs), loops, runs)


def summarise(case: Case, timings: list[Timing]) -> dict[str, Any]:
    best: dict[str, Timing] = {}
    for t in timings:
        if t.impl not in best or t.best_s < best[t.impl].best_s:
            best[t.impl] = t
    g = best["generated"].best_s
    ratio_c = best["construct"].best_s / g
    ratio_k = best["ksc"].best_s / g
    return {
        "id": case.key,
        "title": case.title,
        "seconds_per_call": {impl: best[impl].best_s for impl in IMPLS},
        "variant": {impl: best[impl].label for impl in IMPLS},
        "loops": {impl: best[impl].loops for impl in IMPLS},
        "all_variants": [
            {
                "impl": t.impl,
                "variant": t.label,
                "seconds_per_call": t.best_s,
                "loops": t.loops,
                "runs_seconds_per_call": t.runs_s,
            }
            for t in timings
        ],
        "ratio": {"construct_over_generated": ratio_c, "ksc_over_generated": ratio_k},
        "target": {"construct_over_generated_min": TARGET_RATIO, "met": ratio_c >= TARGET_RATIO},
    }


# --------------------------------------------------------------------------- output


def environment(ksc_version: str) -> dict[str, Any]:
    qemu = _run([_need_tool("qemu-img"), "--version"]).splitlines()
    return {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "packages": {
            name: metadata.version(name) for name in ("construct", "kaitaistruct", "diskspec")
        },
        "kaitai_struct_compiler": ksc_version,
        "qemu_img": qemu[0] if qemu else "?",
    }


def fmt_time(seconds: float) -> str:
    """Seconds in the largest unit that keeps the figure at or above 1."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    img = report["image"]
    pk = env["packages"]
    lines = [
        "diskspec qcow2 parse benchmark: generated dataclasses vs construct vs Kaitai (KSC)",
        f"python {env['python']['version']} ({env['python']['implementation']}, "
        f"{env['platform']['system']} {env['platform']['machine']})  construct {pk['construct']}"
        f"  kaitaistruct {pk['kaitaistruct']}  kaitai-struct-compiler "
        f"{env['kaitai_struct_compiler']}",
        f"{env['qemu_img']}",
        f"image: qcow2 v3, {VIRTUAL_SIZE} virtual, {CLUSTER_SIZE // 1024} KiB clusters, "
        f"{img['written_mib']} MiB written ({PATTERN:#x}); L2 table at "
        f"{img['ofs_l2_table']:#x}: {img['l2_entries_allocated']}/{img['l2_entries']} "
        "entries allocated",
        f"timing: timeit, best of {report['timing']['repeat']} repeats, loops auto-ranged "
        "(>= 0.2 s per repeat), time per call; results verified equal before timing",
        "",
    ]
    head = ["benchmark", "generated", "construct", "KSC", "construct/gen", "KSC/gen"]
    head.append(f"gen >= {TARGET_RATIO:g}x construct")
    rows = [head]
    for b in report["benchmarks"]:
        s = b["seconds_per_call"]
        r = b["ratio"]
        rows.append(
            [
                b["title"],
                fmt_time(s["generated"]),
                fmt_time(s["construct"]),
                fmt_time(s["ksc"]),
                f"{r['construct_over_generated']:.1f}x",
                f"{r['ksc_over_generated']:.1f}x",
                "met" if b["target"]["met"] else "NOT met",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for b in report["benchmarks"]:
        gens = [v for v in b["all_variants"] if v["impl"] == "generated"]
        if len(gens) > 1:
            parts = ", ".join(f"{v['variant']} {fmt_time(v['seconds_per_call'])}" for v in gens)
            lines.append(
                f"{b['title']}: generated variants {parts}; "
                f"table shows the fastest ({b['variant']['generated']})"
            )
    missed = [key for key, met in report["target_met"].items() if not met]
    verdict = "NOT met in " + ", ".join(missed) if missed else "met in every benchmark"
    lines.append(f"target generated >= {TARGET_RATIO:g}x construct: {verdict}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"total run time {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeat", type=int, default=5, help="timeit repeats (default 5)")
    parser.add_argument(
        "--write-mib",
        type=int,
        default=DEFAULT_WRITE_MIB,
        help=f"MiB qemu-io writes from offset 0 (default {DEFAULT_WRITE_MIB}; one L2 table "
        "maps 512 MiB, so 512 allocates all its entries)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 1 <= args.write_mib <= 1024:
        parser.error("--write-mib must be between 1 and 1024")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="diskspec-bench-") as tmp:
        folder = Path(tmp)
        ksc, ksc_version = load_ksc(folder / "ksc")
        image = make_image(folder, args.write_mib)
        sample = read_sample(image, args.write_mib)
        cases = build_cases(sample, ksc, notes)
        facts = verify(sample, cases, ksc)
        benchmarks = [
            summarise(case, [time_variant(v, args.repeat) for v in case.variants]) for case in cases
        ]
    notes.append(
        "construct Qcow2 is timed as a Struct of its first two fields (header, extension_area): "
        "its remaining fields are Pointers to tables outside cluster 0"
    )
    return {
        "environment": environment(ksc_version),
        "image": {
            "virtual_size": VIRTUAL_SIZE,
            "cluster_size": CLUSTER_SIZE,
            "written_mib": args.write_mib,
            "pattern": PATTERN,
            "ofs_l2_table": sample.ofs_l2_table,
            **facts,
        },
        "timing": {
            "method": "timeit.Timer.autorange loops, best of repeat runs, seconds per call",
            "repeat": args.repeat,
        },
        "benchmarks": benchmarks,
        "target_met": {b["id"]: b["target"]["met"] for b in benchmarks},
        "notes": notes,
        "elapsed_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (BenchError, ksc_support.KscError) as exc:
        print(f"parse_bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
