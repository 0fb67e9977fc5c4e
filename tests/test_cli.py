"""The diskspec command line against qemu-img: same text, same JSON, same exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diskspec.tests.corpus import CorpusImage, require_tool


def ds(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diskspec.cli", *args], capture_output=True,
                          text=True, cwd=cwd, check=False)


def ds_inproc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same command run in this process (fast, for the long comparisons)."""
    import contextlib
    import io
    import os

    from diskspec.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def qi(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True,
                          cwd=cwd, check=False)


def _plain(corpus: list[CorpusImage]) -> list[CorpusImage]:
    return [i for i in corpus if i.fmt == "qcow2" and "encrypted" not in i.tags]


def test_info_and_map_print_what_qemu_img_prints(corpus: list[CorpusImage]) -> None:
    compared = 0
    for image in _plain(corpus):
        cwd, name = image.path.parent, image.path.name
        for args in (["info"], ["info", "--output=json"], ["info", "--backing-chain"],
                     ["map", "--output=json"], ["map"], ["snapshot", "-l"], ["check"],
                     ["check", "--output=json"]):
            ours, theirs = ds_inproc(*args, name, cwd=cwd), qi(*args, name, cwd=cwd)
            assert ours.returncode == theirs.returncode, (image.name, args, ours.stderr)
            assert ours.stdout == theirs.stdout, (image.name, args)
            compared += 1
    assert compared >= 200


def test_create_prints_what_qemu_img_prints(tmp_path: Path) -> None:
    cases = [
        ["-f", "qcow2", "-o", "cluster_size=4k", "{}.qcow2", "8M"],
        ["-f", "qcow2", "-o", "compat=0.10,preallocation=metadata", "{}.qcow2", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on,lazy_refcounts=on,"
         "refcount_bits=8,compression_type=zstd", "{}.qcow2", "1M"],
        ["-f", "raw", "-o", "preallocation=falloc", "{}.raw", "1M"],
    ]
    for i, case in enumerate(cases):
        ours = ds("create", *[a.format(f"o{i}") for a in case], cwd=tmp_path)
        theirs = qi("create", *[a.format(f"o{i}") for a in case], cwd=tmp_path)
        assert ours.returncode == theirs.returncode == 0
        assert ours.stdout == theirs.stdout, case


def test_create_resize_snapshot_like_qemu_img(tmp_path: Path) -> None:
    for tool, name in ((ds, "o.qcow2"), (qi, "q.qcow2")):
        assert tool("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", name, "10M",
                    cwd=tmp_path).returncode == 0
        assert tool("resize", name, "+6M", cwd=tmp_path).returncode == 0
        assert tool("snapshot", "-c", "first", name, cwd=tmp_path).returncode == 0
    assert (tmp_path / "o.qcow2").stat().st_size == (tmp_path / "q.qcow2").stat().st_size
    ours = json.loads(ds("info", "--output=json", "o.qcow2", cwd=tmp_path).stdout)
    theirs = json.loads(qi("info", "--output=json", "q.qcow2", cwd=tmp_path).stdout)
    for key in ("virtual-size", "cluster-size", "format-specific"):
        assert ours[key] == theirs[key], key
    assert [s["name"] for s in ours["snapshots"]] == [s["name"] for s in theirs["snapshots"]]
    assert qi("check", "o.qcow2", cwd=tmp_path).returncode == 0
    shrink = ds("resize", "o.qcow2", "-1M", cwd=tmp_path)
    assert shrink.returncode == 1 and shrink.stderr.startswith("diskspec: error: ")


@pytest.mark.parametrize(("out_fmt", "compress"),
                         [("raw", False), ("qcow2", False), ("qcow2", True)])
def test_convert_and_compare(corpus: list[CorpusImage], tmp_path: Path, out_fmt: str,
                             compress: bool) -> None:
    sources = [i for i in _plain(corpus) if "data_file" not in i.tags][:12]
    for image in sources:
        out = tmp_path / f"{image.name}.{out_fmt}"
        args = ["convert", "-O", out_fmt, *(["-c"] if compress else []), str(image.path),
                str(out)]
        done = ds(*args, cwd=image.path.parent)
        assert done.returncode == 0, (image.name, done.stderr)
        same = qi("compare", str(image.path), str(out), cwd=image.path.parent)
        assert same.returncode == 0, (image.name, same.stdout)
        assert ds("compare", str(image.path), str(out), cwd=tmp_path).returncode == 0
        if out_fmt == "qcow2":
            assert qi("check", str(out), cwd=tmp_path).returncode == 0, image.name


def test_compare_exit_codes(tmp_path: Path) -> None:
    for name in ("a.qcow2", "b.qcow2"):
        qi("create", "-q", "-f", "qcow2", name, "1M", cwd=tmp_path)
    assert ds("compare", "a.qcow2", "b.qcow2", cwd=tmp_path).returncode == 0
    subprocess.run([require_tool("qemu-io"), "-c", "write -P 1 4096 1", "b.qcow2"],
                   cwd=tmp_path, check=True, capture_output=True)
    ours, theirs = (ds("compare", "a.qcow2", "b.qcow2", cwd=tmp_path),
                    qi("compare", "a.qcow2", "b.qcow2", cwd=tmp_path))
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout
    missing = ds("compare", "a.qcow2", "nope.qcow2", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("diskspec: error:")


def test_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.qcow2").write_bytes(b"QFI\xfb\x00\x00\x00\x09" + bytes(200))
    done = ds("info", "-f", "qcow2", "junk.qcow2", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("diskspec: error: ")
    assert "Traceback" not in done.stderr
    done = ds("info", "missing.qcow2", cwd=tmp_path)
    assert done.returncode == 1 and "No such file" in done.stderr


def test_check_repairs_like_qemu_img(tmp_path: Path) -> None:
    """A refcount too high on a COPIED cluster: a leak plus a COPIED corruption (exit 2),
    as qemu-img says; -r all repairs it."""
    import struct

    from diskspec.generated import qcow2 as q

    qi("create", "-q", "-f", "qcow2", "l.qcow2", "1M", cwd=tmp_path)
    subprocess.run([require_tool("qemu-io"), "-c", "write -P 7 0 64k", "l.qcow2"],
                   cwd=tmp_path, check=True, capture_output=True)
    path = tmp_path / "l.qcow2"
    data = bytearray(path.read_bytes())
    head = q.Header.parse(data)
    table = struct.unpack_from(">Q", data, head.ofs_refcount_table)[0]
    struct.pack_into(">H", data, table + 2 * 5, 2)  # the data cluster: 2 for 1 reference
    path.write_bytes(bytes(data))
    ours, theirs = ds("check", "l.qcow2", cwd=tmp_path), qi("check", "l.qcow2", cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 2
    assert ours.stdout == theirs.stdout and ours.stderr == theirs.stderr
    fixed = ds("check", "-r", "all", "l.qcow2", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert qi("check", "l.qcow2", cwd=tmp_path).returncode == 0


def _chain_copy(corpus: list[CorpusImage], dest: Path) -> Path:
    import shutil

    dest.mkdir()
    for name in ("raw-base", "qcow2-chain-mid", "qcow2-chain-top"):
        image = next(i for i in corpus if i.name == name)
        shutil.copy(image.path, dest / image.path.name)
    return dest


@pytest.mark.parametrize("drop", [False, True])
def test_commit_like_qemu_img(corpus: list[CorpusImage], tmp_path: Path, drop: bool) -> None:
    ours, theirs = _chain_copy(corpus, tmp_path / "a"), _chain_copy(corpus, tmp_path / "b")
    flag = ["-d"] if drop else []
    assert ds("commit", *flag, "qcow2-chain-top.qcow2", cwd=ours).returncode == 0
    assert qi("commit", *flag, "qcow2-chain-top.qcow2", cwd=theirs).returncode == 0
    for name in ("qcow2-chain-mid.qcow2", "qcow2-chain-top.qcow2"):
        assert qi("compare", str(ours / name), str(theirs / name), cwd=tmp_path).returncode == 0
        assert qi("check", name, cwd=ours).returncode == 0, name
    for name in ("qcow2-chain-mid.qcow2", "qcow2-chain-top.qcow2"):
        # the same extents; host offsets differ with the order clusters were allocated in
        ours_map = _merged(qi("map", "--output=json", name, cwd=ours).stdout)
        theirs_map = _merged(qi("map", "--output=json", name, cwd=theirs).stdout)
        assert ours_map == theirs_map, name


def _merged(text: str) -> list[dict[str, object]]:
    """Map extents without host offsets, neighbours with equal flags merged."""
    out: list[dict[str, object]] = []
    for extent in json.loads(text):
        extent.pop("offset", None)
        if out and all(out[-1][k] == extent[k] for k in ("depth", "present", "zero", "data")):
            last = out[-1]
            last["length"] = int(str(last["length"])) + extent["length"]
        else:
            out.append(extent)
    return out


@pytest.mark.parametrize("unsafe", [False, True])
def test_rebase_like_qemu_img(corpus: list[CorpusImage], tmp_path: Path, unsafe: bool) -> None:
    ours, theirs = _chain_copy(corpus, tmp_path / "a"), _chain_copy(corpus, tmp_path / "b")
    flag = ["-u"] if unsafe else []
    args = ["rebase", *flag, "-b", "raw-base.raw", "-F", "raw", "qcow2-chain-top.qcow2"]
    assert ds(*args, cwd=ours).returncode == 0
    assert qi("rebase", "-f", "qcow2", *args[1:], cwd=theirs).returncode == 0
    top = "qcow2-chain-top.qcow2"
    assert qi("compare", str(ours / top), str(theirs / top), cwd=tmp_path).returncode == 0
    assert qi("check", top, cwd=ours).returncode == 0
    info_o = json.loads(qi("info", "--output=json", top, cwd=ours).stdout)
    info_t = json.loads(qi("info", "--output=json", top, cwd=theirs).stdout)
    for key in ("backing-filename", "backing-filename-format", "format-specific"):
        assert info_o[key] == info_t[key], key


def test_measure_like_qemu_img(corpus: list[CorpusImage], tmp_path: Path) -> None:
    checked = 0
    for image in _plain(corpus)[:20]:
        for opts in ([], ["-o", "cluster_size=4096,refcount_bits=1"], ["-o", "extended_l2=on"]):
            args = ["measure", "--output=json", "-O", "qcow2", *opts, image.path.name]
            ours = ds_inproc(*args, cwd=image.path.parent)
            theirs = qi(*args, cwd=image.path.parent)
            assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), image.name
            checked += 1
    for size in ("0", "512", "10G", "1T", "4097k"):
        for opts in ([], ["-o", "cluster_size=512"], ["-o", "preallocation=full"],
                     ["-o", "extended_l2=on,cluster_size=2M"]):
            args = ["measure", "-O", "qcow2", *opts, "--size", size]
            ours, theirs = ds_inproc(*args, cwd=tmp_path), qi(*args, cwd=tmp_path)
            assert ours.returncode == theirs.returncode, (size, opts)
            assert ours.stdout == theirs.stdout, (size, opts)
            checked += 1
    assert checked >= 70


def test_progress_bars(corpus: list[CorpusImage], tmp_path: Path) -> None:
    image = _plain(corpus)[0]
    done = ds("convert", "-p", "-O", "qcow2", str(image.path), str(tmp_path / "p.qcow2"),
              cwd=tmp_path)
    assert done.returncode == 0 and "100%" in done.stderr
    assert qi("compare", str(image.path), str(tmp_path / "p.qcow2"), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("create", "amend"),
    [
        ("compat=0.10", "compat=1.1"),
        ("compat=0.10,cluster_size=4096", "compat=1.1"),
        ("compat=1.1", "compat=0.10"),
        ("compat=1.1", "lazy_refcounts=on"),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"),
        ("compat=1.1", "backing_file=base.raw,backing_fmt=raw"),
    ],
)
def test_amend_like_qemu_img(tmp_path: Path, create: str, amend: str) -> None:
    qi("create", "-q", "-f", "raw", "base.raw", "4M", cwd=tmp_path)
    for name in ("o.qcow2", "q.qcow2"):
        assert qi("create", "-q", "-f", "qcow2", "-o", create, name, "4M",
                  cwd=tmp_path).returncode == 0
        subprocess.run([require_tool("qemu-io"), "-c", "write -P 9 65536 300000", name],
                       cwd=tmp_path, check=True, capture_output=True)
    ours = ds("amend", "-f", "qcow2", "-o", amend, "o.qcow2", cwd=tmp_path)
    if amend.startswith("backing_file"):
        # qemu-img 7.2 refuses to amend the backing file ("use qemu-img rebase"); diskspec
        # does it, and must end where rebase -u ends
        theirs = qi("rebase", "-u", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "q.qcow2",
                    cwd=tmp_path)
    else:
        theirs = qi("amend", "-f", "qcow2", "-o", amend, "q.qcow2", cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    info_o = json.loads(qi("info", "--output=json", "o.qcow2", cwd=tmp_path).stdout)
    info_q = json.loads(qi("info", "--output=json", "q.qcow2", cwd=tmp_path).stdout)
    for key in ("format-specific", "backing-filename", "backing-filename-format",
                "virtual-size", "cluster-size"):
        assert info_o.get(key) == info_q.get(key), key
    assert qi("check", "o.qcow2", cwd=tmp_path).returncode == 0
    assert qi("compare", "o.qcow2", "q.qcow2", cwd=tmp_path).returncode == 0



def test_encrypted_images_through_image_opts_and_secrets(corpus: list[CorpusImage]) -> None:
    """qemu-img needs ``--object secret`` and ``--image-opts`` for encrypted images; the same
    arguments give the same text, JSON (key by key) and exit codes here."""
    from diskspec.tests.corpus import _open_args

    compared = 0
    for image in corpus:
        if "encrypted" not in image.tags:
            continue
        cwd, name = image.path.parent, image.path.name
        opened = _open_args(image.fmt, name, image.secret)
        for args in (["info", "--output=json"], ["info"], ["map", "--output=json"],
                     ["check", "--output=json"], ["check"]):
            ours, theirs = ds_inproc(*args, *opened, cwd=cwd), qi(*args, *opened, cwd=cwd)
            assert ours.returncode == theirs.returncode, (image.name, args, ours.stderr)
            if "--output=json" in args and theirs.stdout:
                assert json.loads(ours.stdout) == json.loads(theirs.stdout), (image.name, args)
            assert ours.stdout == theirs.stdout, (image.name, args)
            compared += 1
        wrong = [a.replace(image.secret or "", "not-the-passphrase") for a in opened]
        ours, theirs = ds_inproc("map", *wrong, cwd=cwd), qi("map", *wrong, cwd=cwd)
        assert ours.returncode == theirs.returncode == 1, (image.name, ours.stderr)
    assert compared >= 15


UNSUPPORTED = [
    ["snapshot", "-l"], ["snapshot", "-c", "s"], ["snapshot", "-a", "s"], ["snapshot", "-d", "s"],
    ["amend", "-o", "size=1M"], ["rebase", "-u", "-b", "other.raw", "-F", "raw"],
    ["commit"], ["check"],
]


@pytest.mark.parametrize("fmt", ["raw", "qcow"])
def test_what_a_format_cannot_do_fails_as_in_qemu_img(tmp_path: Path, fmt: str) -> None:
    """Subcommands a format does not support: qemu-img's message and exit code."""
    qi("create", "-q", "-f", "raw", "other.raw", "1M", cwd=tmp_path)
    qi("create", "-q", "-f", fmt, f"a.{fmt}", "1M", cwd=tmp_path)
    for args in UNSUPPORTED:
        # qemu-img snapshot takes no -f (it probes)
        fmt_args = ["-f", fmt] if args[0] != "snapshot" else []
        full = [args[0], *fmt_args, *args[1:], f"a.{fmt}"]
        ours, theirs = ds_inproc(*full, cwd=tmp_path), qi(*full, cwd=tmp_path)
        assert ours.returncode == theirs.returncode, (full, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout, full
        err_o = ours.stderr.replace("diskspec: error: ", "qemu-img: ")
        err_q = "\n".join(line for line in theirs.stderr.splitlines()
                          if line.startswith("qemu-img:"))
        assert err_o.strip() == err_q.strip(), (full, ours.stderr, theirs.stderr)


@pytest.mark.parametrize("fmt", ["qcow"])
def test_measure_refuses_formats_qemu_cannot_measure(tmp_path: Path, fmt: str) -> None:
    ours = ds_inproc("measure", "-O", fmt, "--size", "1G", cwd=tmp_path)
    theirs = qi("measure", "-O", fmt, "--size", "1G", cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("diskspec: error: ", "qemu-img: ") == theirs.stderr
