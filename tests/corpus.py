"""A corpus of small qcow v1, qcow2 and raw disk images made by qemu-img and qemu-io.

The conformance tests compare diskspec against images written by the real QEMU tools. This
module describes those images as a table of recipes (`RECIPES`) and builds them into a folder:

    from diskspec.tests.corpus import build_corpus
    images = build_corpus(Path(".cache/corpus"))

or from the shell: ``python -m diskspec.tests.corpus DEST``.

A build is cached: when ``DEST/.complete-<hash>`` exists, where <hash> covers the recipe table,
the builder version and the qemu-img version, `build_corpus` returns at once. Any change to a
recipe gives a new hash and so a rebuild. Every qcow2 image is checked with ``qemu-img check``
after the build, and every image is opened with ``qemu-img info``, so a broken recipe fails
loudly instead of producing a silently different corpus.

The qemu tools are required: `require_tool` raises, it never skips, so that CI fails when
qemu-utils is missing.

All images are opened with ``--image-opts driver=FMT,file.filename=...`` so that no format is
ever probed. The only exception is the backing file of a qcow v1 image, which qemu probes
because qcow v1 cannot record a backing format.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB

#: id of the ``--object secret`` that carries the passphrase of encrypted images.
SECRET_ID = "sec0"

# Bump when the builder changes how a recipe turns into commands (the table is hashed anyway).
_BUILDER_VERSION = 1
_MARKER_PREFIX = ".complete-"
_LOCK_NAME = ".lock"
_COMMAND_TIMEOUT = 120.0
_PBKDF_FLAKE = "Unable to get accurate CPU usage"
_PBKDF_ATTEMPTS = 10  # about 1 in 5 creations fails: 10 in a row is ~1e-7
_EXTENSIONS = {"qcow2": "qcow2", "qcow": "qcow", "raw": "raw"}
# qemu-io reports a failed command on stdout, e.g. "write failed: Invalid argument".
_QEMU_IO_FAILURE = re.compile(r"^\w+ failed: .*$", re.MULTILINE)


# --------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class CorpusImage:
    """One image of the corpus, as returned by `build_corpus`."""

    name: str  # unique, filesystem-safe, e.g. "qcow2-v3-c64k-r16"
    path: Path
    fmt: str  # "qcow2" | "qcow" | "raw"
    options: dict[str, str]  # the -o options used, e.g. {"compat": "1.1"}
    tags: frozenset[str]  # e.g. {"snapshots", "luks", "backing"}
    secret: str | None = None  # passphrase for encrypted images (LUKS or AES), else None


class CorpusError(RuntimeError):
    """A qemu command failed, or a built image did not pass verification."""


def require_tool(name: str) -> str:
    """Return the path of the program `name`; raise RuntimeError if it is not on PATH.

    This never skips: the conformance tests must fail, not pass vacuously, without qemu.
    """
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"required tool {name!r} was not found on PATH. The diskspec image corpus is built "
            "with QEMU's qemu-img and qemu-io (Debian/Ubuntu package: qemu-utils); install them "
            "to run the conformance tests."
        )
    return path


def image_opts(image: CorpusImage) -> list[str]:
    """Arguments that make qemu-img or qemu-io open `image` without probing.

    The last element is the positional image argument, so append the list after the other
    options of the command: ``[qemu_img, "info", "--output=json", *image_opts(image)]``.
    """
    return _open_args(image.fmt, str(image.path), image.secret)


def build_corpus(dest: Path) -> list[CorpusImage]:
    """Build every image of `RECIPES` into `dest` (unless already built) and return them."""
    tools = _Tools(qemu_img=require_tool("qemu-img"), qemu_io=require_tool("qemu-io"))
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    digest = recipe_hash(tools.qemu_img_version())
    images = [_corpus_image(recipe, dest) for recipe in RECIPES]
    marker = dest / f"{_MARKER_PREFIX}{digest}"
    if _is_complete(marker):
        return images
    with _locked(dest / _LOCK_NAME):
        if _is_complete(marker):  # another process built it while we waited
            return images
        _remove_previous_build(dest)
        _Builder(tools, dest, RECIPES).build()
        manifest = {"hash": digest, "files": sorted(_all_outputs(RECIPES))}
        # settle the files' block allocation (delayed allocation): qemu-img map guesses
        # "preallocated metadata" from st_blocks, so the guess must not change mid-test
        os.sync()
        marker.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return images


def recipe_hash(qemu_img_version: str) -> str:
    """Hash of everything that determines the corpus: recipes, builder and qemu-img version."""
    state = {
        "builder": _BUILDER_VERSION,
        "qemu_img": qemu_img_version,
        "recipes": [_canonical(recipe) for recipe in RECIPES],
    }
    blob = json.dumps(state, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Io:
    """One qemu-io process running these commands (``-c``) in order."""

    commands: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    """``qemu-img snapshot -c NAME``: an internal snapshot of the current state."""

    name: str


@dataclass(frozen=True)
class Bitmap:
    """``qemu-img bitmap FLAGS... IMAGE NAME``, e.g. flags ("--add", "--granularity", "4096")."""

    name: str
    flags: tuple[str, ...]


Step = Io | Snapshot | Bitmap


@dataclass(frozen=True)
class Recipe:
    """How to make one image.

    The image is created with ``qemu-img create -f FMT -o OPTIONS NAME SIZE``, or, when
    `convert_from` names a raw recipe, with ``qemu-img convert -c -O FMT -o OPTIONS SRC NAME``;
    then the steps run in order. A backing file is given by the options ``backing_file`` (the
    file name of another recipe: always relative) and ``backing_fmt``.
    """

    name: str
    fmt: str
    size: int = 32 * MiB  # virtual size; unused when converting
    options: tuple[tuple[str, str], ...] = ()
    steps: tuple[Step, ...] = ()
    secret: str | None = None
    convert_from: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}.{_EXTENSIONS[self.fmt]}"

    @property
    def opts(self) -> dict[str, str]:
        return dict(self.options)


# (compat option, name part, is version 3)
_VERSIONS = (("1.1", "v3", True), ("0.10", "v2", False))


def _label(cluster_size: int) -> str:
    """512 -> "c512", 65536 -> "c64k", 2097152 -> "c2m"."""
    if cluster_size % MiB == 0:
        return f"c{cluster_size // MiB}m"
    if cluster_size % KiB == 0:
        return f"c{cluster_size // KiB}k"
    return f"c{cluster_size}"


def _size_for(cluster_size: int) -> int:
    """Virtual size: 16 MiB for tiny clusters, 64 MiB for 2 MiB clusters, else 32 MiB."""
    if cluster_size >= 2 * MiB:
        return 64 * MiB
    return 16 * MiB if cluster_size <= 512 else 32 * MiB


def _data_writes(cs: int, size: int, *, zeroes: bool) -> tuple[str, ...]:
    """Scattered writes: whole cluster, unaligned, cluster-crossing, last bytes of the disk.

    With `zeroes` (qcow2 v3) also zero writes, in part of an allocated cluster and over a
    whole unallocated cluster, and a discard of an allocated cluster.
    """
    cmds = [
        f"write -P 0x11 0 {cs}",
        f"write -P 0x22 {cs + 1234} {min(cs, 64 * KiB) + 1000}",
        f"write -P 0x44 {size - 5000} 5000",
    ]
    if cs < MiB:  # each 2 MiB cluster costs 2 MiB on disk: keep those images small
        cmds.insert(2, f"write -P 0x33 {size // 2 + 777} 4096")
    if zeroes:
        base = max(size // 4 // cs, 2) * cs
        cmds += [
            f"write -P 0x55 {base} {2 * cs}",
            f"write -z {base + cs // 4} {cs // 2}",
            f"write -z {base + 2 * cs} {cs}",
            f"discard {base + cs} {cs}",
        ]
    return tuple(cmds)


def _compressed_writes(cs: int, size: int, *, last: bool = False) -> tuple[str, ...]:
    """Compressed clusters from 5/8 of the disk on, a normal write into a compressed cluster
    (decompress + COW) and, with `last`, the final cluster of the disk compressed.

    Constant patterns compress well (qemu stores incompressible clusters uncompressed). qemu
    compresses only into unallocated clusters ("write failed: Input/output error" otherwise),
    so these offsets avoid the ones of `_data_writes`.
    """
    base = size * 5 // 8 // cs * cs
    cmds = [
        f"write -c -P 0x61 {base} {cs}",
        f"write -c -P 0x62 {base + 4 * cs} {cs}",
        f"write -c -P 0x63 {base + 5 * cs} {cs}",
        f"write -P 0x64 {base + 4 * cs + 100} 200",
        f"write -P 0x65 {base + 8 * cs + 3000} 5000",
    ]
    if last:
        cmds.append(f"write -c -P 0x66 {size - cs} {cs}")
    return tuple(cmds)


def _subcluster_writes(cs: int) -> tuple[str, ...]:
    """Extended L2 (32 subclusters per cluster): writes of exactly one subcluster, unaligned
    writes across subcluster boundaries, zero writes over part of a cluster (qemu ignores a
    discard of part of a cluster, but ``write -z -u`` sets the subclusters' zero bits)."""
    sub = cs // 32
    return (
        f"write -P 0x71 {16 * cs + 3 * sub} {sub}",
        f"write -P 0x72 {17 * cs + 1000} {2 * sub + 3000}",
        f"write -P 0x73 {18 * cs} {cs}",
        f"write -z {18 * cs} {cs // 2}",
        f"write -z {19 * cs + 5 * sub} {3 * sub}",
        f"write -P 0x74 {20 * cs} {cs}",
        f"write -z -u {20 * cs + 8 * sub} {8 * sub}",
    )


def _luks() -> dict[str, str]:
    """LUKS options; the passphrase itself goes into the --object secret, not the options."""
    return {
        "encrypt.format": "luks",
        "encrypt.key-secret": SECRET_ID,
        "encrypt.iter-time": "10",  # milliseconds of PBKDF: keeps create and open fast
    }


def _aes() -> dict[str, str]:
    return {"encrypt.format": "aes", "encrypt.key-secret": SECRET_ID}


def _backed_by(base: Recipe) -> dict[str, str]:
    return {"backing_file": base.filename, "backing_fmt": base.fmt}


def _qcow2(
    name: str,
    steps: Sequence[Step],
    options: Mapping[str, str] | None = None,
    *,
    size: int = 32 * MiB,
    secret: str | None = None,
    convert_from: str | None = None,
) -> Recipe:
    """A qcow2 recipe; compat defaults to 1.1 and is always recorded explicitly."""
    opts = {"compat": "1.1", **(options or {})}
    return Recipe(
        name,
        "qcow2",
        size=size,
        options=tuple(opts.items()),
        steps=tuple(steps),
        secret=secret,
        convert_from=convert_from,
    )


def _qcow1(
    name: str,
    steps: Sequence[Step],
    options: Mapping[str, str] | None = None,
    *,
    secret: str | None = None,
    convert_from: str | None = None,
) -> Recipe:
    opts = tuple((options or {}).items())
    return Recipe(
        name, "qcow", options=opts, steps=tuple(steps), secret=secret, convert_from=convert_from
    )


def _build_recipes() -> tuple[Recipe, ...]:
    recipes: dict[str, Recipe] = {}

    def add(recipe: Recipe) -> Recipe:
        # Two loops may both produce one image (qcow2-v3-c64k-r16); they must agree on it.
        known = recipes.setdefault(recipe.name, recipe)
        if known != recipe:
            raise CorpusError(f"two different recipes are named {recipe.name}")
        return recipe

    c64k = 64 * KiB
    m32 = 32 * MiB

    def plain(cs: int = c64k, size: int = m32, *, v3: bool = True) -> tuple[Step, ...]:
        return (Io(_data_writes(cs, size, zeroes=v3)),)

    # Raw images: the base of the backing chains, and compressible data to convert.
    base_writes = (
        "write -P 0xa1 0 65536",
        "write -P 0xa2 5000000 3333",
        "write -P 0xa3 20971520 131072",
        f"write -P 0xa4 {m32 - 4096} 4096",
    )
    raw_base = add(Recipe("raw-base", "raw", size=m32, steps=(Io(base_writes),)))
    compressible = tuple(
        f"write -P {0x81 + i:#04x} {i * 1310720 + i * 777} {4096 + i * 20000}" for i in range(12)
    )
    raw_src = add(Recipe("raw-compressible", "raw", size=16 * MiB, steps=(Io(compressible),)))

    # qcow2 v3 and v2 at each cluster size (v3 with the default 16-bit refcounts).
    for compat, version, v3 in _VERSIONS:
        for cs in (512, 4 * KiB, c64k, 2 * MiB):
            size = _size_for(cs)
            opts = {"compat": compat, "cluster_size": str(cs)}
            name = f"qcow2-{version}-{_label(cs)}"
            if v3:
                opts["refcount_bits"] = "16"
                name += "-r16"
            add(_qcow2(name, plain(cs, size, v3=v3), opts, size=size))

    # qcow2 v3 with every refcount width (r16 is the one above).
    for bits in (1, 2, 4, 8, 16, 32, 64):
        opts = {"cluster_size": str(c64k), "refcount_bits": str(bits)}
        add(_qcow2(f"qcow2-v3-c64k-r{bits}", plain(), opts))

    # Extended L2 entries (subclusters), with compressed clusters too at 64 KiB.
    for cs in (c64k, 2 * MiB):
        size = _size_for(cs)
        cmds = _data_writes(cs, size, zeroes=True) + _subcluster_writes(cs)
        if cs == c64k:
            cmds += _compressed_writes(cs, size)
        opts = {"cluster_size": str(cs), "extended_l2": "on"}
        add(_qcow2(f"qcow2-v3-{_label(cs)}-el2", (Io(cmds),), opts, size=size))

    # Compressed clusters, written by qemu-io and made by qemu-img convert -c.
    for compat, version, v3 in _VERSIONS:
        cmds = _data_writes(c64k, m32, zeroes=v3) + _compressed_writes(c64k, m32)
        kinds = ("zlib", "zstd") if v3 else ("zlib",)  # v2 has no compression_type field
        for kind in kinds:
            opts = {"compat": compat} | ({"compression_type": kind} if v3 else {})
            add(_qcow2(f"qcow2-{version}-{kind}-compressed", (Io(cmds),), opts))
            name = f"qcow2-{version}-{kind}-convert-compressed"
            add(_qcow2(name, (), opts, convert_from=raw_src.name))

    add(_qcow2("qcow2-v3-lazy-refcounts", plain(), {"lazy_refcounts": "on"}))
    add(_qcow2("qcow2-v3-prealloc-metadata", plain(), {"preallocation": "metadata"}))

    # Backing chain raw <- qcow2 <- qcow2; writes in every layer, partly over lower data.
    mid_writes = (
        "write -P 0xb1 4096 8192",
        "write -P 0xb2 5001000 100000",
        "write -z 20971520 4096",
        f"write -P 0xb3 {m32 - 700} 700",
    )
    mid = add(
        _qcow2(
            "qcow2-chain-mid",
            (Io(mid_writes),),
            {"cluster_size": str(4 * KiB), **_backed_by(raw_base)},
        )
    )
    top_writes = (
        "write -P 0xc1 100 1000",
        "write -P 0xc2 4000 2000",
        "write -P 0xc3 20971520 65536",
        "write -z 5000000 65536",
        "discard 21037056 65536",
        "write -P 0xc4 9437184 4096",
    )
    add(_qcow2("qcow2-chain-top", (Io(top_writes),), _backed_by(mid)))
    add(_qcow2("qcow2-v2-backing", plain(v3=False), {"compat": "0.10", **_backed_by(raw_base)}))
    # 2 MiB clusters over a shorter (32 MiB) raw base: reads past the base's end are zeros.
    m64 = 64 * MiB
    opts = {"cluster_size": str(2 * MiB), **_backed_by(raw_base)}
    add(_qcow2("qcow2-v3-c2m-backing", plain(2 * MiB, m64), opts, size=m64))

    # Internal snapshots: data, snap1, overwrite shared clusters and add new ones, snap2, more.
    for compat, version, v3 in _VERSIONS:
        after: tuple[str, ...] = ("write -P 0xd3 70000 70000",)
        if v3:
            after += ("write -z 8388608 65536", "discard 0 65536")
        steps = (
            *plain(v3=False),
            Snapshot("snap1"),
            Io(("write -P 0xd1 1000 3000", "write -P 0xd2 8388608 65536")),
            Snapshot("snap2"),
            Io(after),
        )
        add(_qcow2(f"qcow2-{version}-snapshots", steps, {"compat": compat}))

    # Encryption: LUKS in qcow2 v3 and v2, and legacy AES.
    for compat, version, v3 in _VERSIONS:
        secret = f"diskspec-luks-{version}-passphrase"
        opts = {"compat": compat, **_luks()}
        add(_qcow2(f"qcow2-{version}-luks", plain(v3=v3), opts, secret=secret))
    # A passphrase shorter than 16 bytes: the AES key is the passphrase zero-padded.
    add(_qcow2("qcow2-v3-aes", plain(), _aes(), secret="short-aes-pw"))

    # Persistent dirty bitmaps with several granularities and enabled/disabled states.
    bitmap_steps = (
        *plain(v3=False),
        Bitmap("bitmap0", ("--add",)),
        Bitmap("bitmap1", ("--add", "--granularity", "65536", "--disable")),
        Bitmap("bitmap2", ("--add", "--granularity", "4096")),
        Io(("write -P 0xe1 1048576 8192", "write -P 0xe2 9000000 70000")),
        Bitmap("bitmap2", ("--disable",)),
        Bitmap("bitmap1", ("--enable",)),
        Io(("write -P 0xe3 20000000 4096",)),
    )
    add(_qcow2("qcow2-v3-bitmaps", bitmap_steps))

    # External data files (relative names), plain and data_file_raw.
    for suffix, extra in (("", {}), ("-raw", {"data_file_raw": "on"})):
        name = f"qcow2-v3-data-file{suffix}"
        add(_qcow2(name, plain(), {"data_file": f"{name}.data", **extra}))

    # qcow version 1: 4 KiB clusters, or 512 B ones when there is a backing file.
    v1_writes = plain(4 * KiB, v3=False)
    add(_qcow1("qcow1-plain", v1_writes))
    v1_backed = (
        "write -P 0xf1 100 1000",
        "write -P 0xf2 4999000 5000",
        "write -P 0xf3 8388608 65536",
    )
    add(_qcow1("qcow1-backing", (Io(v1_backed),), _backed_by(raw_base)))
    add(_qcow1("qcow1-compressed", (Io(_compressed_writes(4 * KiB, m32, last=True)),)))
    add(_qcow1("qcow1-convert-compressed", (), convert_from=raw_src.name))
    # A passphrase longer than 16 bytes: the AES key is its first 16 bytes.
    add(_qcow1("qcow1-aes", v1_writes, _aes(), secret="diskspec-qcow1-aes-passphrase"))

    return tuple(recipes.values())


def _tags(recipe: Recipe) -> frozenset[str]:
    """Tags follow from the recipe, so they cannot disagree with what was built."""
    opts = recipe.opts
    tags: set[str] = set()
    cmds = [c for s in recipe.steps if isinstance(s, Io) for c in s.commands]
    if recipe.fmt == "qcow2":
        v3 = opts.get("compat", "1.1") != "0.10"
        tags.add("v3" if v3 else "v2")
        if v3 and int(opts.get("cluster_size", "65536")) > 4096:
            tags.add("ext_feature_table")
        if "backing_file" in opts:
            tags.add("ext_backing_format")
        if int(opts.get("refcount_bits", "16")) != 16:
            tags.add("refcount_bits")
        if "cluster_size" in opts and int(opts["cluster_size"]) != 65536:
            tags.add("cluster_size")
    elif recipe.fmt == "qcow":
        tags.add("qcow1")
    else:
        tags.add("raw")
    if "backing_file" in opts:
        tags.add("backing")
    if "data_file" in opts:
        tags.update({"data_file", "ext_data_file"})
    if opts.get("data_file_raw") == "on":
        tags.add("data_file_raw")
    if opts.get("extended_l2") == "on":
        tags.add("extended_l2")
    if opts.get("lazy_refcounts") == "on":
        tags.add("lazy_refcounts")
    if "preallocation" in opts:
        tags.add("preallocation")
    compression = opts.get("compression_type")
    if compression is not None:
        tags.add(compression)  # "zlib" or "zstd"
    encryption = opts.get("encrypt.format")
    if encryption is not None:
        tags.update({"encrypted", encryption})
        if encryption == "luks":
            tags.add("ext_crypto")
    if recipe.convert_from is not None:
        tags.update({"converted", "compressed"})
    if any(c.startswith("write -c") for c in cmds):
        tags.add("compressed")
    if any(c.startswith("write -z") for c in cmds):
        tags.add("zero_writes")
    if any(c.startswith("discard") for c in cmds):
        tags.add("discard")
    if any(isinstance(s, Snapshot) for s in recipe.steps):
        tags.add("snapshots")
    if any(isinstance(s, Bitmap) for s in recipe.steps):
        tags.update({"bitmaps", "ext_bitmaps"})
    return frozenset(tags)


RECIPES: tuple[Recipe, ...] = _build_recipes()


# --------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class _Tools:
    qemu_img: str
    qemu_io: str

    def qemu_img_version(self) -> str:
        out = _run([self.qemu_img, "--version"], Path("/")).stdout
        return out.splitlines()[0] if out else ""


def _run(cmd: Sequence[str], cwd: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CorpusError(f"timed out after {_COMMAND_TIMEOUT:.0f}s: {shlex.join(cmd)}") from exc
    failed = proc.returncode != 0
    if not failed and Path(cmd[0]).name == "qemu-io":
        failed = _QEMU_IO_FAILURE.search(proc.stdout) is not None
    if check and failed:
        raise CorpusError(_describe_failure(cmd, cwd, proc))
    return proc


def _describe_failure(cmd: Sequence[str], cwd: Path, proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"command failed with exit status {proc.returncode} (in {cwd}):\n"
        f"  {shlex.join(cmd)}\n"
        f"stderr:\n{proc.stderr.rstrip() or '  (empty)'}\n"
        f"stdout:\n{proc.stdout.rstrip() or '  (empty)'}"
    )


def _escape_opt(value: str) -> str:
    """QemuOpts syntax: a comma inside a value is written as two commas."""
    return value.replace(",", ",,")


def _secret_object(secret: str) -> str:
    return f"secret,id={SECRET_ID},data={_escape_opt(secret)}"


def _open_args(fmt: str, filename: str, secret: str | None) -> list[str]:
    spec = f"driver={fmt},file.filename={_escape_opt(filename)}"
    if secret is None:
        return ["--image-opts", spec]
    spec += f",encrypt.key-secret={SECRET_ID}"
    return ["--object", _secret_object(secret), "--image-opts", spec]


def _option_string(options: Mapping[str, str]) -> str:
    return ",".join(f"{key}={_escape_opt(value)}" for key, value in options.items())


def _outputs(recipe: Recipe) -> list[str]:
    files = [recipe.filename]
    data_file = recipe.opts.get("data_file")
    if data_file is not None:
        files.append(data_file)
    return files


def _all_outputs(recipes: Sequence[Recipe]) -> set[str]:
    return {name for recipe in recipes for name in _outputs(recipe)}


def _corpus_image(recipe: Recipe, dest: Path) -> CorpusImage:
    return CorpusImage(
        name=recipe.name,
        path=dest / recipe.filename,
        fmt=recipe.fmt,
        options=recipe.opts,
        tags=_tags(recipe),
        secret=recipe.secret,
    )


def _canonical(recipe: Recipe) -> dict[str, Any]:
    """A JSON-able, order-stable form of a recipe, with the kind of each step named."""
    return {
        "name": recipe.name,
        "fmt": recipe.fmt,
        "size": recipe.size,
        "options": [list(pair) for pair in recipe.options],
        "steps": [[type(step).__name__, dataclasses.asdict(step)] for step in recipe.steps],
        "secret": recipe.secret,
        "convert_from": recipe.convert_from,
    }


def _is_complete(marker: Path) -> bool:
    dest = marker.parent
    return marker.is_file() and all((dest / name).is_file() for name in _all_outputs(RECIPES))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, so that parallel test sessions do not build together."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _plain_name(name: str) -> bool:
    """A bare file name such as every corpus output has: no folder part, no leading dot."""
    return bool(name) and name == Path(name).name and not name.startswith(".")


def _remove_previous_build(dest: Path) -> None:
    """Delete the files of earlier builds (listed in their markers) and of this recipe table.

    Only plain file names listed by a marker, inside `dest`, are removed: nothing else.
    """
    stale = set(_all_outputs(RECIPES))
    for marker in dest.glob(f"{_MARKER_PREFIX}*"):
        try:
            listed = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError):
            listed = []
        stale.update(name for name in listed if isinstance(name, str) and _plain_name(name))
        marker.unlink()
    for name in stale:
        (dest / name).unlink(missing_ok=True)


class _Builder:
    """Runs the recipes: independent images concurrently, each after the ones it needs."""

    def __init__(self, tools: _Tools, dest: Path, recipes: Sequence[Recipe]) -> None:
        self.tools = tools
        self.dest = dest
        self.recipes = tuple(recipes)
        self.by_name = {recipe.name: recipe for recipe in recipes}

    def build(self) -> None:
        # The work is in the qemu processes, so threads are enough; a few per core.
        workers = max(2, min(6, 2 * (os.cpu_count() or 1)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for level in _levels(self.recipes):
                _wait_all(pool.submit(self._make, self.by_name[name]) for name in level)
            _wait_all(pool.submit(self._verify, recipe) for recipe in self.recipes)

    # -- making ------------------------------------------------------------------------------

    def _make(self, recipe: Recipe) -> None:
        if recipe.convert_from is None:
            self._create(recipe)
        else:
            self._convert(recipe, self.by_name[recipe.convert_from])
        for step in recipe.steps:
            self._step(recipe, step)

    def _create(self, recipe: Recipe) -> None:
        cmd = [self.tools.qemu_img, "create", "-q", "-f", recipe.fmt]
        if recipe.secret is not None:
            cmd += ["--object", _secret_object(recipe.secret)]
        if recipe.options:
            cmd += ["-o", _option_string(recipe.opts)]
        cmd += [recipe.filename, str(recipe.size)]
        for _ in range(_PBKDF_ATTEMPTS - 1):
            proc = _run(cmd, self.dest, check=False)
            if proc.returncode == 0:
                return
            # Debian's qemu-img 7.2 fails LUKS creation now and then with "Unable to get accurate
            # CPU usage": its PBKDF2 benchmark can read 0 ms of thread CPU time (a known QEMU
            # bug, fixed upstream in 2025). It does not depend on the image: try again.
            if _PBKDF_FLAKE not in proc.stderr:
                raise CorpusError(_describe_failure(cmd, self.dest, proc))
        _run(cmd, self.dest)

    def _convert(self, recipe: Recipe, source: Recipe) -> None:
        cmd = [self.tools.qemu_img, "convert", "-c", "-f", source.fmt, "-O", recipe.fmt]
        if recipe.options:
            cmd += ["-o", _option_string(recipe.opts)]
        cmd += [source.filename, recipe.filename]
        proc = _run(cmd, self.dest, check=False)
        if proc.returncode == 0:
            return
        # qemu-img 7.2 quirk: `convert -c -O qcow` writes the whole image but then exits with
        # status 1 and prints nothing. Accept exactly that case, and only once qemu-img compare
        # confirms that the output holds the same data as the source.
        silent = not proc.stderr.strip() and not proc.stdout.strip()
        if not (recipe.fmt == "qcow" and proc.returncode == 1 and silent):
            raise CorpusError(_describe_failure(cmd, self.dest, proc))
        compare = [
            self.tools.qemu_img,
            "compare",
            "-q",
            "-f",
            source.fmt,
            "-F",
            recipe.fmt,
            source.filename,
            recipe.filename,
        ]
        if _run(compare, self.dest, check=False).returncode != 0:
            raise CorpusError(
                _describe_failure(cmd, self.dest, proc)
                + f"\nand the output differs from the source ({shlex.join(compare)})"
            )

    def _step(self, recipe: Recipe, step: Step) -> None:
        opened = _open_args(recipe.fmt, recipe.filename, recipe.secret)
        cmd: list[str]
        if isinstance(step, Io):
            cmd = [self.tools.qemu_io]
            for command in step.commands:
                cmd += ["-c", command]
            cmd += opened
        elif isinstance(step, Snapshot):
            # `qemu-img snapshot` has no -f option in 7.2; --image-opts avoids probing.
            cmd = [self.tools.qemu_img, "snapshot", "-q", "-c", step.name, *opened]
        else:
            cmd = [self.tools.qemu_img, "bitmap", *step.flags, *opened, step.name]
        _run(cmd, self.dest)

    # -- verifying ---------------------------------------------------------------------------

    def _verify(self, recipe: Recipe) -> None:
        opened = _open_args(recipe.fmt, recipe.filename, recipe.secret)
        problems: list[str] = []
        tags = _tags(recipe)
        if recipe.fmt == "qcow2":  # qcow v1 and raw do not support checks (exit status 63)
            check_cmd = [self.tools.qemu_img, "check", "--output=json", *opened]
            check = json.loads(_run(check_cmd, self.dest).stdout)
            # qemu silently stores a cluster uncompressed when compressing does not pay off.
            if "compressed" in tags and not check.get("compressed-clusters"):
                problems.append("no compressed clusters")
        if recipe.convert_from is not None:
            source = self.by_name[recipe.convert_from]
            compare = [self.tools.qemu_img, "compare", "-q", "-f", source.fmt, "-F", recipe.fmt]
            _run([*compare, source.filename, recipe.filename], self.dest)
        info_cmd = [self.tools.qemu_img, "info", "--output=json", *opened]
        info = json.loads(_run(info_cmd, self.dest).stdout)
        if info.get("format") != recipe.fmt:
            problems.append(f"format is {info.get('format')!r}, expected {recipe.fmt!r}")
        specific = info.get("format-specific", {}).get("data", {})
        wanted_bitmaps = {s.name for s in recipe.steps if isinstance(s, Bitmap)}
        bitmaps = {b.get("name") for b in specific.get("bitmaps", [])}
        if not wanted_bitmaps <= bitmaps:
            problems.append(f"bitmaps {sorted(wanted_bitmaps - bitmaps)} missing")
        wanted_snapshots = {s.name for s in recipe.steps if isinstance(s, Snapshot)}
        snapshots = {s.get("name") for s in info.get("snapshots", [])}
        if not wanted_snapshots <= snapshots:
            problems.append(f"snapshots {sorted(wanted_snapshots - snapshots)} missing")
        if problems:
            raise CorpusError(
                f"image {recipe.name} ({self.dest / recipe.filename}) is not as its recipe says: "
                + "; ".join(problems)
            )


def _dependencies(recipe: Recipe, by_file: Mapping[str, Recipe]) -> set[str]:
    deps: set[str] = set()
    if recipe.convert_from is not None:
        deps.add(recipe.convert_from)
    backing = recipe.opts.get("backing_file")
    if backing is not None:
        if backing not in by_file:
            raise CorpusError(f"recipe {recipe.name}: backing file {backing!r} is not a recipe")
        deps.add(by_file[backing].name)
    return deps


def _levels(recipes: Sequence[Recipe]) -> list[list[str]]:
    """Group recipes so that each one comes after the images it is made from."""
    by_name = {recipe.name: recipe for recipe in recipes}
    by_file = {recipe.filename: recipe for recipe in recipes}
    deps = {recipe.name: _dependencies(recipe, by_file) for recipe in recipes}
    for name, needed in deps.items():
        unknown = needed - by_name.keys()
        if unknown:
            raise CorpusError(f"recipe {name} depends on unknown recipes {sorted(unknown)}")
    levels: list[list[str]] = []
    done: set[str] = set()
    while len(done) < len(recipes):
        ready = [name for name in by_name if name not in done and deps[name] <= done]
        if not ready:
            raise CorpusError(f"dependency cycle among {sorted(by_name.keys() - done)}")
        levels.append(ready)
        done.update(ready)
    return levels


def _wait_all(futures: Iterator[concurrent.futures.Future[None]]) -> None:
    """Wait for all, then raise the first failure (after the others finished)."""
    pending = list(futures)
    concurrent.futures.wait(pending)
    for future in pending:
        future.result()


def _validate(recipes: Sequence[Recipe]) -> None:
    names = [recipe.name for recipe in recipes]
    if len(set(names)) != len(names):
        raise CorpusError("duplicate recipe names")
    for recipe in recipes:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", recipe.name):
            raise CorpusError(f"recipe name {recipe.name!r} is not filesystem-safe")
        if recipe.fmt not in _EXTENSIONS:
            raise CorpusError(f"recipe {recipe.name}: unknown format {recipe.fmt!r}")
        if not all(_plain_name(name) for name in _outputs(recipe)):
            raise CorpusError(f"recipe {recipe.name}: output files must be bare file names")
        if recipe.opts.get("encrypt.format") and recipe.secret is None:
            raise CorpusError(f"recipe {recipe.name}: encrypted but no secret")
    _levels(recipes)


_validate(RECIPES)


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diskspec.tests.corpus",
        description="Build the qemu-made image corpus and list it: name, fmt, path, tags.",
    )
    parser.add_argument("dest", type=Path, help="folder to build the images into")
    args = parser.parse_args(argv)
    try:
        images = build_corpus(args.dest)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for image in images:
        print(f"{image.name}\t{image.fmt}\t{image.path}\t{','.join(sorted(image.tags))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
