"""The ``diskspec explain`` subcommand (the parser lines live in diskspec.cli)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import ExplainError, explain, format_text, translate
from .html import render_html

__all__ = ["add_arguments", "run", "write_picture"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", help="image format: qcow2, qcow or fvd (default: from the magic)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--at", metavar="OFFSET", help="follow one guest offset to the host")
    what.add_argument("--structure", metavar="NAME", help="only this structure (e.g. header, l1)")
    p.add_argument("--html", metavar="OUT", help="write a page: hex view beside the tree")
    p.add_argument("filename")


def _offset(text: str) -> int:
    from ..qcow2.create import parse_size

    try:
        value = int(text, 0)
    except ValueError:
        value = parse_size(text)
    if value < 0:
        raise ExplainError(f"--at {text}: a guest offset is not negative")
    return value


def run(args: argparse.Namespace) -> int:
    if args.at is not None:
        report = translate(args.filename, _offset(args.at), args.f)
    else:
        report = explain(args.filename, args.f, args.structure)
    if args.html:
        fd = os.open(args.filename, os.O_RDONLY)
        try:
            page = render_html(f"{Path(args.filename).name}: {report.fmt}", report.sections,
                               lambda offset, n: os.pread(fd, n, offset))
        finally:
            os.close(fd)
        Path(args.html).write_text(page, encoding="utf-8")
        sys.stdout.write(f"wrote {args.html}\n")
        return 0
    sys.stdout.write(format_text(report))
    return 0


def write_picture(filename: str, out: str) -> int:
    """``diskspec map --picture OUT.svg|OUT.png FILE``."""
    from .clustermap import cluster_map, render_png, render_svg

    suffix = Path(out).suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ExplainError(f"--picture {out}: the name must end in .svg or .png")
    m = cluster_map(filename)
    title = f"{Path(filename).name}: {m.fmt}, {len(m.roles)} host clusters"
    if suffix == ".svg":
        Path(out).write_text(render_svg(m, title), encoding="utf-8")
    else:
        Path(out).write_bytes(render_png(m, title))
    counts = ", ".join(f"{role} {n}" for role, n in m.counts().items())
    sys.stdout.write(f"wrote {out}: {counts}\n")
    return 0
