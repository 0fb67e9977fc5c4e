"""The ``diskspec`` command line: qemu-img's subcommands, flags, JSON and exit codes.

A thin layer over the Python API (diskspec.open, diskspec.create, the image methods). Errors
are one line, ``diskspec: error: ...``, with qemu-img's exit code; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import FormatError
from .image import Image, UsageError

__all__ = ["main"]

EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"diskspec: error: {message}\n")
        raise SystemExit(EXIT_ERROR)


class CliError(Exception):
    """A failure to report as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------
# shared helpers


def _secrets(args: argparse.Namespace) -> dict[str, bytes]:
    """``--object secret,id=ID,data=...|file=...`` as qemu-img takes them."""
    found: dict[str, bytes] = {}
    for spec in getattr(args, "object", None) or []:
        fields = _options(spec)
        if not spec.startswith("secret,") or "id" not in fields:
            raise CliError(f"unsupported --object '{spec}' (only secret objects are known)")
        if "data" in fields:
            found[fields["id"]] = fields["data"].encode("utf-8")
        elif "file" in fields:
            found[fields["id"]] = Path(fields["file"]).read_bytes()
        else:
            raise CliError(f"secret '{fields['id']}' needs data= or file=")
    return found


def _passphrase_file(args: argparse.Namespace) -> bytes | None:
    """``--passphrase-file FILE``: the file's bytes, one trailing newline stripped."""
    name: str | None = getattr(args, "passphrase_file", None)
    if name is None:
        return None
    data = Path(name).read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def _passphrase(args: argparse.Namespace) -> bytes | None:
    """The key to open encrypted images with: --passphrase-file, else the only secret."""
    given = _passphrase_file(args)
    if given is not None:
        return given
    secrets = _secrets(args)
    if len(secrets) == 1:
        return next(iter(secrets.values()))
    return None


def _new_image_keys(args: argparse.Namespace, fmt: str, options: dict[str, Any]) -> None:
    """Give create (qcow, qcow2) the secrets that encrypt.key-secret=ID names, and the
    --passphrase-file key for encrypt.format without encrypt.key-secret."""
    if fmt not in ("qcow", "qcow2"):
        return
    options["secrets"] = _secrets(args)
    given = _passphrase_file(args)
    if given is not None:
        options["passphrase"] = given


def _new_image_passphrase(args: argparse.Namespace, options: dict[str, Any]) -> bytes | None:
    """The key a just created image opens with: its encrypt.key-secret, else the
    --passphrase-file key, else the only secret; None when it is not encrypted."""
    legacy = str(options.get("encryption", "off")).lower()
    if options.get("encrypt.format") is None and legacy in ("off", "false", "no", "0"):
        return None
    secret = options.get("encrypt.key-secret")
    if secret is not None:
        secrets = _secrets(args)
        if secret not in secrets:
            raise CliError(f"No secret with id '{secret}'")
        return secrets[secret]
    return _passphrase(args)


class _ImageOpts:
    """``--image-opts driver=FMT,file.filename=PATH[,encrypt.key-secret=ID]``."""

    def __init__(self, args: argparse.Namespace, spec: str) -> None:
        opts = _options(spec)
        self.fmt = opts.pop("driver", None)
        path = opts.pop("file.filename", None) or opts.pop("filename", None)
        if path is None:
            raise CliError(f"The 'file' block driver requires a file name ({spec})")
        self.path = path
        self.secret_id = opts.pop("encrypt.key-secret", None)
        opts.pop("file.driver", None)
        if opts:
            raise CliError(f"Block format '{self.fmt}' does not support the option "
                           f"'{sorted(opts)[0]}'")
        self.passphrase: bytes | None = None
        if self.secret_id is not None:
            secrets = _secrets(args)
            if self.secret_id not in secrets:
                raise CliError(f"No secret with id '{self.secret_id}'")
            self.passphrase = secrets[self.secret_id]

    def display_name(self) -> str:
        """The pseudo file name qemu reports for such an image (``json:{...}``)."""
        from .qcow2.info import qdict_order

        items: list[tuple[str, Any]] = [("driver", self.fmt)] if self.fmt else []
        items.append(("file", qdict_order([("driver", "file"), ("filename", self.path)])))
        if self.secret_id is not None:
            items.append(("encrypt.key-secret", self.secret_id))
        return "json:" + json.dumps(qdict_order(items), separators=(", ", ": "))


def _open(args: argparse.Namespace, filename: str, mode: str = "r", fmt: str | None = None,
          backing: bool = True) -> Image:
    from . import open as open_image

    if getattr(args, "image_opts", False):
        opts = _ImageOpts(args, filename)
        return open_image(opts.path, mode, opts.fmt, backing=backing,
                          passphrase=opts.passphrase)
    img = open_image(filename, mode, fmt if fmt is not None else getattr(args, "f", None),
                     backing=backing)
    return _unlocked(img, _passphrase(args))


def _unlocked(img: Image, key: bytes | None) -> Image:
    """The image with its key given when it is encrypted: as qemu-img, a secret (or the
    --passphrase-file) that an image does not need is ignored."""
    from .opener import unlock_image

    return unlock_image(img, key, needed=True)


def _shown_name(args: argparse.Namespace, filename: str) -> str:
    """The name info reports: the file name, or qemu's json: name for --image-opts."""
    if getattr(args, "image_opts", False):
        return _ImageOpts(args, filename).display_name()
    return filename


def _options(text: str | None) -> dict[str, str]:
    """``-o key=value,key=value`` (qemu doubles commas inside values)."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in text.replace(",,", "\0").split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        out[key.strip()] = value.replace("\0", ",") if _ else "on"
    return out


class _Progress:
    """``-p``: a progress bar on stderr (tqdm), counting guest bytes."""

    def __init__(self, enabled: bool, total: int, what: str) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=what, file=sys.stderr, leave=True, dynamic_ncols=True)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _size(text: str) -> int:
    from .qcow2.create import parse_size

    return parse_size(text)


# ------------------------------------------------------------------------------------------------
# info, map, check


def _cmd_info(args: argparse.Namespace) -> int:
    from .qcow2.info import format_info_human, format_info_json, layer_info

    with _open(args, args.filename) as img:
        chain: Callable[[], list[dict[str, Any]]] | None = getattr(img, "info_chain", None)
        if chain is not None:
            # formats with their own info (qcow2, qcow, FVD) report their whole chain
            info: Any = chain() if args.backing_chain else img.info()
        else:
            info = layer_info(img, args.filename)
            if args.backing_chain:
                info = [info]
        if getattr(args, "image_opts", False):
            top = info[0] if isinstance(info, list) else info
            top["filename"] = _shown_name(args, args.filename)
        if args.output == "json":
            sys.stdout.write(format_info_json(info))
        else:
            sys.stdout.write(format_info_human(info))
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from .qcow2.mapping import MapFormatError, format_map_human, format_map_json

    if args.picture:
        from .explain.command import write_picture

        return write_picture(args.filename, args.picture)
    with _open(args, args.filename) as img:
        extents = img.map()
        if args.output == "json":
            sys.stdout.write(format_map_json(extents))
            return 0
        try:
            sys.stdout.write(format_map_human(extents))
        except MapFormatError as exc:
            sys.stdout.write(exc.output)  # what qemu-img prints before it gives up
            raise CliError(str(exc)) from exc
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .qcow2.check import CheckResult

    mode = "r+" if args.r else "r"
    with _open(args, args.filename, mode) as img:
        check: Callable[..., CheckResult] | None = getattr(img, "check", None)
        if check is None:
            sys.stderr.write(
                "diskspec: error: This image format does not support checks\n"
            )
            return 63
        result = check(repair=args.r)
    for line in result.messages:
        sys.stderr.write(line + "\n")
    if result.failed is not None:
        sys.stderr.write(f"diskspec: error: {result.failed}\n")
        return result.exit_code()
    if args.output == "json":
        from .qcow2.info import format_info_json, qdict_order

        report = qdict_order(list(result.to_json_dict(args.filename).items()))
        sys.stdout.write(format_info_json(report))
    else:
        sys.stdout.write(result.human(args.filename))
    return result.exit_code()


# ------------------------------------------------------------------------------------------------
# create, resize, snapshot


def _cmd_create(args: argparse.Namespace) -> int:
    from . import create

    options: dict[str, Any] = _options(args.o)
    if args.b:
        options["backing_file"] = args.b
    if args.F:
        options["backing_fmt"] = args.F
    size: int | str | None = args.size
    if size is None and "size" not in options:
        if not args.b:
            raise CliError("Image creation needs a size parameter")
        with _open(args, _backing_path(args.filename, args.b), fmt=args.F) as base:
            size = base.size
    fmt = args.f or "raw"
    size = size if size is not None else options.pop("size")
    if not args.q:
        sys.stdout.write(_formatting_line(args.filename, fmt, _size(str(size)), options))
    _new_image_keys(args, fmt, options)
    create(args.filename, fmt, size, **options)
    return 0


def _formatting_line(filename: str, fmt: str, size: int, options: dict[str, Any]) -> str:
    """qemu-img create's "Formatting ..." line: its options, defaults filled in, its order."""
    if fmt == "raw":
        order: list[tuple[str, Any]] = [("size", size), ("preallocation", None)]
    elif fmt == "qcow":
        order = [("size", size), ("backing_file", None), ("backing_fmt", None),
                 ("encryption", None), ("encrypt.format", None), ("encrypt.key-secret", None)]
    elif fmt == "fvd":
        order = [("size", size), *((key, None) for key in options)]
    else:
        from .qcow2.create import ENCRYPT_OPTIONS

        order = [
            *((key, None) for key in ENCRYPT_OPTIONS),
            ("cluster_size", 65536), ("extended_l2", "off"), ("preallocation", None),
            ("compression_type", "zlib"), ("size", size), ("backing_file", None),
            ("backing_fmt", None), ("compat", None), ("data_file", None),
            ("data_file_raw", None), ("lazy_refcounts", "off"), ("refcount_bits", 16),
        ]
    parts = []
    for key, default in order:
        value = size if key == "size" else options.get(key, default)
        if key == "cluster_size" and key in options:
            value = _size(str(value))
        if key == "encrypt.iter-time" and key in options and str(value).isdigit():
            value = int(str(value))  # a number: qemu prints its value
        if value is not None:
            parts.append(f"{key}={value}")
    return f"Formatting '{filename}', fmt={fmt} {' '.join(parts)}\n"


def _backing_path(image: str, backing: str) -> str:
    return backing if os.path.isabs(backing) else os.path.join(os.path.dirname(image), backing)


def _cmd_resize(args: argparse.Namespace) -> int:
    text: str = args.size
    with _open(args, args.filename, "r+") as img:
        if text.startswith(("+", "-")):
            delta = _size(text[1:])
            new = img.size + delta if text[0] == "+" else img.size - delta
        else:
            new = _size(text)
        if new < 0:
            raise CliError("New image size must be positive")
        resize: Callable[..., None] | None = getattr(img, "resize", None)
        if resize is None:
            raise CliError("Image format driver does not support resize")
        resize(new, shrink=args.shrink)
    sys.stdout.write("Image resized.\n")
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from .qcow2.image import Qcow2Image

    write = args.c or args.a or args.d
    with _open(args, args.filename, "r+" if write else "r") as img:
        if not isinstance(img, Qcow2Image):
            # formats without internal snapshots, in qemu-img's words
            if args.c:
                raise CliError(f"Could not create snapshot '{args.c}': -95 "
                               "(Operation not supported)")
            if args.a:
                raise CliError(f"Could not apply snapshot '{args.a}': Block driver does not "
                               "support snapshots")
            if args.d:
                raise CliError(f"Could not delete snapshot '{args.d}': snapshot not found")
            return 0
        if args.c:
            img.create_snapshot(args.c)
        elif args.a:
            img.apply_snapshot(args.a)
        elif args.d:
            img.delete_snapshot(args.d)
        else:
            sys.stdout.write(_snapshot_table(img))
    return 0


def _snapshot_table(img: Any) -> str:
    from .qcow2.info import format_snapshot_list

    return format_snapshot_list(img)


def _cmd_amend(args: argparse.Namespace) -> int:
    options = _options(args.o)
    if not options:
        raise CliError("Must specify options (-o)")
    with _open(args, args.filename, "r+") as img:
        amend: Callable[..., None] | None = getattr(img, "amend", None)
        if amend is None:
            raise CliError(f"Format driver '{img.fmt}' does not support option amendment")
        amend(**options)
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from .measure import measure
    from .qcow2.info import format_info_json

    fmt = args.O or "raw"
    options: dict[str, Any] = _options(args.o)
    _new_image_keys(args, fmt, options)
    if args.size is not None:
        result = measure(fmt, options, _size(args.size), None)
    elif args.filename:
        with _open(args, args.filename) as img:
            result = measure(fmt, options, None, img)
    else:
        raise CliError("Either --size N or one filename must be specified.")
    if args.output == "json":
        sys.stdout.write(format_info_json(result.to_json_dict()))
    else:
        sys.stdout.write(result.human())
    return 0


# ------------------------------------------------------------------------------------------------
# rebase and commit


def _guest_runs(img: Image) -> list[tuple[int, int, int, int]]:
    """(kind, guest, host, length) of the whole image; kind 2 reads the backing file."""
    plan: Callable[[int, int], list[tuple[int, int, int, int]]] | None = getattr(
        img, "_plan", None
    )
    if plan is None:
        return [(0, 0, 0, img.size)]
    return plan(0, img.size) if img.size else []


def _cmd_rebase(args: argparse.Namespace) -> int:
    from .opener import open_image
    from .qcow2.image import _BACKING

    new_name: str | None = args.b or None
    new_fmt = args.F or ("raw" if new_name else None)
    with _open(args, args.filename, "r+", backing=not args.u) as img:
        set_backing: Callable[[str | None, str | None], None] | None = getattr(
            img, "set_backing", None)
        if set_backing is None:
            raise CliError(f"Could not change the backing file to '{new_name or ''}': "
                           "Operation not supported")
        if not args.u:
            new = None
            if new_name:
                base = Path(args.filename).parent / new_name
                new = open_image(new_name if os.path.isabs(new_name) else base, "r", new_fmt)
            bar = _Progress(args.p, img.size, "rebase")
            try:
                old: Image | None = getattr(img, "backing", None)
                step = 1 << 20
                for kind, guest, _, length in _guest_runs(img):
                    if kind != _BACKING:
                        bar.add(length)
                        continue
                    for off in range(guest, guest + length, step):
                        n = min(step, guest + length - off)
                        was = _read_or_zeros(old, n, off)
                        now = _read_or_zeros(new, n, off)
                        if was != now:
                            img.pwrite(was, off)
                        bar.add(n)
            finally:
                bar.close()
                if new is not None:
                    new.close()
        set_backing(new_name, new_fmt)
    return 0


def _read_or_zeros(img: Image | None, n: int, offset: int) -> bytes:
    if img is None or offset >= img.size:
        return bytes(n)
    got = img.pread(min(n, img.size - offset), offset)
    return got + bytes(n - len(got))


def _cmd_commit(args: argparse.Namespace) -> int:
    from .opener import open_image
    from .qcow2.image import _BACKING, _ZERO

    with _open(args, args.filename, "r+") as img:
        old: Image | None = getattr(img, "backing", None)
        make_empty: Callable[[], None] | None = getattr(img, "make_empty", None)
        if old is None or make_empty is None:
            raise CliError("Image does not have a backing file")
        base_fmt = old.fmt  # the format the backing file was opened with
        old.close()
        base = open_image(old.path, "r+", base_fmt)
        setattr(img, "backing", base)  # noqa: B010 - every format with a backing file has it
        if img.size > base.size:
            resize: Callable[..., None] = base.resize
            resize(img.size)
        runs = [r for r in _guest_runs(img) if r[0] != _BACKING]
        bar = _Progress(args.p, sum(r[3] for r in runs), "commit")
        step = 1 << 20
        for kind, guest, _, length in runs:
            for off in range(guest, guest + length, step):
                n = min(step, guest + length - off)
                if kind == _ZERO:
                    base.write_zeroes(off, n)
                else:
                    base.pwrite(img.pread(n, off), off)
                bar.add(n)
        bar.close()
        base.flush()
        if not args.d:
            make_empty()
    sys.stdout.write("Image committed.\n")
    return 0


# ------------------------------------------------------------------------------------------------
# compare and convert


def _cmd_compare(args: argparse.Namespace) -> int:
    try:
        a = _open(args, args.filename1, fmt=args.f)
        b = _open(args, args.filename2, fmt=args.F)
    except (FormatError, UsageError, OSError) as exc:
        sys.stderr.write(f"diskspec: error: {exc}\n")
        return 2
    with a, b:
        if args.s and a.size != b.size:
            sys.stdout.write("Strict mode: Image size mismatch!\n")
            return 1
        step = 1 << 20
        for off in range(0, max(a.size, b.size), step):
            n = min(step, max(a.size, b.size) - off)
            x = a.pread(min(n, max(0, a.size - off)), off) if off < a.size else b""
            y = b.pread(min(n, max(0, b.size - off)), off) if off < b.size else b""
            x, y = x.ljust(n, b"\0"), y.ljust(n, b"\0")
            if x != y:
                at = off + next(i for i in range(n) if x[i] != y[i])
                sys.stdout.write(f"Content mismatch at offset {at}!\n")
                return 1
    sys.stdout.write("Images are identical.\n")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from . import create
    from . import open as open_image
    from .qcow2.image import Qcow2Image

    *sources, target = args.filenames
    if not sources:
        raise CliError("Expecting image file name")
    opened: list[Image] = []
    try:
        for name in sources:
            img = _open(args, name)
            if args.l:
                snap = args.l.split("snapshot.name=", 1)[-1].split(",")[0]
                if not isinstance(img, Qcow2Image):
                    raise CliError("Failed to load snapshot: Operation not supported")
                img = img.open_snapshot(snap)
            opened.append(img)
        total = sum(i.size for i in opened)
        fmt = args.O or "raw"
        options: dict[str, Any] = _options(args.o)
        if args.B:
            options |= {"backing_file": args.B, "backing_fmt": args.F or "raw"}
        key = _passphrase(args) if args.n else _new_image_passphrase(args, options)
        _new_image_keys(args, fmt, options)  # encrypt.key-secret=ID names one of them
        if not args.n:
            create(target, fmt, total, **options)
        sparse = _size(args.S) if args.S else 4096
        with _unlocked(open_image(target, "r+", fmt), key) as out:
            _copy(opened, out, sparse, args.c, args.p)
    finally:
        for img in opened:
            img.close()
    return 0


def _copy(sources: list[Image], out: Image, sparse: int, compress: bool, progress: bool) -> None:
    """Copy guest data, skipping zero ranges (-S) and writing whole clusters compressed (-c)."""
    total = sum(s.size for s in sources)
    step = getattr(out, "cluster_size", 0) if compress else 1 << 20
    step = max(step, sparse or 512) if not compress else step
    base = 0
    bar = _Progress(progress, total, "convert")
    write_compressed = getattr(out, "write_compressed", None)
    if compress and write_compressed is None:
        raise CliError("Compression not supported for this file format")
    # over a backing file (-B) a skipped range would read the backing data: write zeros there
    backed = getattr(out, "backing", None) is not None
    for src in sources:
        for off in range(0, src.size, step):
            n = min(step, src.size - off)
            data = src.pread(n, off)
            if compress:
                if data.count(0) != len(data):
                    assert write_compressed is not None
                    write_compressed(data, base + off)
                elif backed:
                    out.write_zeroes(base + off, n)
            elif sparse:
                for at in range(0, n, sparse):
                    piece = data[at : at + sparse]
                    if piece.count(0) != len(piece):
                        out.pwrite(piece, base + off + at)
                    elif backed:
                        out.write_zeroes(base + off + at, len(piece))
            else:
                out.pwrite(data, base + off)
            bar.add(n)
        base += src.size
    bar.close()


# ------------------------------------------------------------------------------------------------
# explain (runtime/explain/)


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain.command import run

    return run(args)


# ------------------------------------------------------------------------------------------------
# fvd (format-specific commands; the logic lives in diskspec.fvd.tool)


def _cmd_fvd(args: argparse.Namespace) -> int:
    from .fvd.tool import run

    bars: list[_Progress] = []

    def progress(total: int) -> Callable[[int], None]:
        bars.append(_Progress(args.p, total, args.fvd_command))
        return bars[-1].add

    try:
        return run(args.fvd_command, args.filename, progress, sys.stdout)
    finally:
        for bar in bars:
            bar.close()


# ------------------------------------------------------------------------------------------------
# generate


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generator.pipeline import (
        check,
        check_docs,
        docs_path,
        generate,
        generate_docs,
        repo_paths,
    )

    specs, out = repo_paths()
    specs = Path(args.specs) if args.specs else specs
    out = Path(args.output) if args.output else out
    docs = Path(args.docs) if args.docs else docs_path()
    if args.check:
        drifts = check(specs, out)
        doc_drifts = check_docs(specs, docs)
        for drift in drifts + doc_drifts:
            sys.stdout.write(drift.diff or f"{drift.path}: differs\n")
        if drifts or doc_drifts:
            names = ", ".join([d.path.name for d in drifts] + [
                f"{docs.name}/{d.path.relative_to(docs).as_posix()}" for d in doc_drifts])
            sys.stderr.write(f"diskspec: error: generated code is out of date: {names}\n")
            return 1
        sys.stdout.write(f"generated code in {out} and pages in {docs} match {specs}\n")
        return 0
    for path in generate(specs, out) + generate_docs(specs, docs):
        sys.stdout.write(f"{path}\n")
    return 0


# ------------------------------------------------------------------------------------------------
# the parser


def _common(p: argparse.ArgumentParser, fmt: bool = True) -> None:
    p.add_argument("--object", action="append", help="secret,id=ID,data=PASS (passphrase)")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="passphrase of encrypted images (one trailing newline stripped); in "
                        "create and convert also the key of encrypt.format without "
                        "encrypt.key-secret")
    p.add_argument("--image-opts", action="store_true",
                   help="file names are option strings: driver=FMT,file.filename=PATH,...")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted, no effect")
    if fmt:
        p.add_argument("-f", help="image format (default: from the magic, raw otherwise)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diskspec", description="qcow, qcow2 and FVD disk image toolkit "
                     "(subcommands and flags as qemu-img)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="show an image's format and metadata")
    _common(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("map", help="show where the guest data lives")
    _common(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--picture", metavar="OUT", help="draw the host clusters (.svg or .png)")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_map)

    p = sub.add_parser("check", help="check (and repair) an image's consistency")
    _common(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-r", choices=["leaks", "all"])
    p.add_argument("-q", action="store_true")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("create", help="create an image")
    _common(p)
    p.add_argument("-o", help="options, key=value,...")
    p.add_argument("-b", help="backing file")
    p.add_argument("-F", help="backing file format")
    p.add_argument("-q", action="store_true")
    p.add_argument("-u", action="store_true", help="do not open the backing file")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("resize", help="change the virtual size")
    _common(p)
    p.add_argument("--shrink", action="store_true")
    p.add_argument("-q", action="store_true")
    p.add_argument("filename")
    p.add_argument("size")
    p.set_defaults(func=_cmd_resize)

    p = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    _common(p, fmt=False)
    group = p.add_mutually_exclusive_group()
    group.add_argument("-l", action="store_true")
    group.add_argument("-c", metavar="NAME")
    group.add_argument("-a", metavar="NAME")
    group.add_argument("-d", metavar="NAME")
    p.add_argument("-q", action="store_true")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_snapshot)

    p = sub.add_parser("amend", help="change options of an existing image")
    _common(p)
    p.add_argument("-o", help="options: compat, lazy_refcounts, backing_file, backing_fmt")
    p.add_argument("-p", action="store_true")
    p.add_argument("-q", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_amend)

    p = sub.add_parser("measure", help="the file size an image needs")
    _common(p)
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-O", help="format of the new image (default raw)")
    p.add_argument("-o", help="options of the new image")
    p.add_argument("--size")
    p.add_argument("-l", help="snapshot.name=NAME")
    p.add_argument("filename", nargs="?")
    p.set_defaults(func=_cmd_measure)

    p = sub.add_parser("rebase", help="change the backing file (safe: copies what changes)")
    _common(p)
    p.add_argument("-u", action="store_true", help="unsafe: only rewrite the name")
    p.add_argument("-b", required=True, help="new backing file ('' for none)")
    p.add_argument("-F", help="format of the new backing file")
    p.add_argument("-p", action="store_true")
    p.add_argument("-q", action="store_true")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_rebase)

    p = sub.add_parser("commit", help="write an image's data into its backing file")
    _common(p)
    p.add_argument("-d", action="store_true", help="do not empty the image afterwards")
    p.add_argument("-p", action="store_true")
    p.add_argument("-q", action="store_true")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_commit)

    p = sub.add_parser("compare", help="compare the guest content of two images")
    _common(p)
    p.add_argument("-F", help="format of the second image")
    p.add_argument("-s", action="store_true", help="strict: sizes must match")
    p.add_argument("-p", action="store_true")
    p.add_argument("-q", action="store_true")
    p.add_argument("filename1")
    p.add_argument("filename2")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("convert", help="copy images, changing format")
    _common(p)
    p.add_argument("-O", help="output format (default raw)")
    p.add_argument("-o", help="output options")
    p.add_argument("-c", action="store_true", help="compress the output")
    p.add_argument("-l", help="snapshot.name=NAME of the source")
    p.add_argument("-B", help="backing file of the output")
    p.add_argument("-F", help="format of that backing file")
    p.add_argument("-n", action="store_true", help="do not create the output")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true")
    p.add_argument("-S", help="sparse size (default 4k)")
    p.add_argument("filenames", nargs="+")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("explain", help="lay out an image's structures, field by field")
    from .explain.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("fvd", help="FVD commands (prefetch: copy the whole base image in)")
    p.add_argument("fvd_command", choices=["prefetch"])
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_fvd)

    gen = sub.add_parser("generate", help="regenerate diskspec.generated from specs/*.ksy")
    gen.add_argument("--check", action="store_true", help="fail and print a diff on drift")
    gen.add_argument("--specs", help="folder of .ksy files (default: the package's specs/)")
    gen.add_argument("--output", help="output folder (default: the package's generated/)")
    gen.add_argument("--docs", help="reference pages folder (default: docs/formats/)")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        sys.stderr.write(f"diskspec: error: {exc}\n")
        return exc.code
    except (FormatError, UsageError) as exc:
        sys.stderr.write(f"diskspec: error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"diskspec: error: {where}{exc.strerror or exc}\n")
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    raise SystemExit(main())
