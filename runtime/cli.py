"""The ``diskspec`` command line (a thin layer over the Python API, shaped like qemu-img)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import FormatError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"diskspec: error: {message}\n")
        raise SystemExit(1)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generator.pipeline import check, generate, repo_paths

    specs, out = repo_paths()
    specs = Path(args.specs) if args.specs else specs
    out = Path(args.output) if args.output else out
    if args.check:
        drifts = check(specs, out)
        for drift in drifts:
            sys.stdout.write(drift.diff or f"{drift.path}: differs\n")
        if drifts:
            names = ", ".join(d.path.name for d in drifts)
            sys.stderr.write(f"diskspec: error: generated code is out of date: {names}\n")
            return 1
        sys.stdout.write(f"generated code in {out} matches {specs}\n")
        return 0
    for path in generate(specs, out):
        sys.stdout.write(f"{path}\n")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diskspec", description="qcow, qcow2 and FVD disk image toolkit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="regenerate diskspec.generated from specs/*.ksy")
    gen.add_argument("--check", action="store_true", help="fail and print a diff on drift")
    gen.add_argument("--specs", help="folder of .ksy files (default: the package's specs/)")
    gen.add_argument("--output", help="output folder (default: the package's generated/)")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except FormatError as exc:
        sys.stderr.write(f"diskspec: error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"diskspec: error: {exc.filename or ''}: {exc.strerror or exc}\n")
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
