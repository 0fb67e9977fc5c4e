"""``map`` and ``info`` conformance: diskspec prints what qemu-img 7.2 prints.

Every qcow2 image of the corpus, and a few edge images made here, go through
``qemu-img map`` and ``qemu-img info`` (JSON and human) and through diskspec; the parsed
entries must agree one by one and the texts byte for byte.

Exceptions, each checked explicitly rather than skipped:

* ``filename`` of encrypted images: ``image_opts`` passes the secret in the open options, so
  qemu names the image with a ``json:{...}`` pseudo file name. ``qemu-img info`` needs no key,
  so the test also runs it without the secret and then the file name must match exactly.
* the File column of ``qemu-img map`` (human) for images with an external data file: qemu 7.2
  prints the recorded data-file name as it resolved it, against its working folder; diskspec
  resolves it against the image's folder and prints that path. The test runs qemu in the
  image's folder, so both name the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import diskspec
from diskspec import Extent
from diskspec.qcow2.image import Qcow2Image
from diskspec.qcow2.info import format_info_human, format_info_json, qcow2_info, qdict_order
from diskspec.qcow2.mapping import (
    MapFormatError,
    format_map_human,
    format_map_json,
    image_map,
    qcow2_map,
)
from diskspec.tests.corpus import CorpusImage, image_opts, require_tool

ENCRYPTED_FILENAME = "filename of encrypted images (qemu: json:{...} with the secret option)"


def _qemu_img(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # qemu 7.2 resolves a relative data-file name against its working folder
    return subprocess.run(
        [require_tool("qemu-img"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _qcow2_images(corpus: list[CorpusImage]) -> list[CorpusImage]:
    images = [i for i in corpus if i.fmt == "qcow2"]
    assert len(images) >= 30
    return images


def _open(path: Path) -> Qcow2Image:
    img = diskspec.open(path)
    assert isinstance(img, Qcow2Image)
    return img


def _entry(e: Extent) -> dict[str, Any]:
    """An extent as qemu's JSON entry (7.2 has no "compressed" key)."""
    d: dict[str, Any] = {
        "start": e.start,
        "length": e.length,
        "depth": e.depth,
        "present": e.present,
        "zero": e.zero,
        "data": e.data,
    }
    if e.offset is not None:
        d["offset"] = e.offset
    return d


# map --------------------------------------------------------------------------------------------


def _check_map_json(extents: list[Extent], qemu_text: str, what: str) -> None:
    want = json.loads(qemu_text)
    got = [_entry(e) for e in extents]
    if not extents:  # qemu 7.2 prints its initial empty entry for an empty image
        got = [_entry(Extent(0, 0, 0, False, False, False))]
    assert len(got) == len(want), what
    for i, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert mine == theirs, (what, i)
        assert list(mine) == list(theirs), (what, i)
    assert format_map_json(extents) == qemu_text, what


def _check_map_human(
    extents: list[Extent], proc: subprocess.CompletedProcess[str], what: str
) -> None:
    if proc.returncode:
        assert "File contains external, encrypted or compressed clusters." in proc.stderr
        with pytest.raises(MapFormatError) as failure:
            format_map_human(extents)
        assert failure.value.output == proc.stdout, what
    else:
        assert format_map_human(extents) == proc.stdout, what


def test_map_json_matches_qemu(corpus: list[CorpusImage]) -> None:
    kinds: set[str] = set()
    for image in _qcow2_images(corpus):
        text = _ok(_qemu_img("map", "--output=json", *image_opts(image), cwd=image.path.parent))
        with closing(_open(image.path)) as img:
            extents = qcow2_map(img)
        _check_map_json(extents, text, image.name)
        for e in extents:
            kinds.add(
                f"depth={e.depth} present={e.present} zero={e.zero} data={e.data} "
                f"offset={e.offset is not None}"
            )
    # every kind of entry occurs in the corpus
    for kind in (
        "depth=0 present=True zero=False data=True offset=True",  # data
        "depth=0 present=True zero=False data=True offset=False",  # compressed or encrypted
        "depth=0 present=True zero=True data=False offset=True",  # ZERO_ALLOC
        "depth=0 present=True zero=True data=False offset=False",  # zero cluster
        "depth=0 present=False zero=True data=False offset=False",  # unallocated
        "depth=0 present=False zero=True data=False offset=True",  # unallocated subcluster
        "depth=0 present=True zero=True data=True offset=True",  # preallocated, host hole
        "depth=1 present=True zero=False data=True offset=True",  # raw backing data
        "depth=1 present=True zero=True data=False offset=True",  # raw backing hole
        "depth=2 present=True zero=True data=False offset=True",  # two layers down
    ):
        assert kind in kinds, kind


def test_map_human_matches_qemu(corpus: list[CorpusImage]) -> None:
    failing = 0
    for image in _qcow2_images(corpus):
        proc = _qemu_img("map", *image_opts(image), cwd=image.path.parent)
        with closing(_open(image.path)) as img:
            extents = qcow2_map(img)
        failing += proc.returncode != 0
        data_file = image.options.get("data_file")
        if data_file is not None:
            # the one named exception: the File column of data-file images (module docstring)
            ours = str(image.path.parent / data_file)
            assert all(e.filename == ours for e in extents if e.offset is not None)
            assert data_file in proc.stdout
            extents = [replace(e, filename=data_file if e.filename else None) for e in extents]
        _check_map_human(extents, proc, image.name)
    assert failing >= 5  # compressed and encrypted images fail in the human layout, as in qemu


def test_map_reads_no_data_clusters(
    corpus: list[CorpusImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """map needs metadata only, so encrypted images map without their key."""

    def refuse(*args: object) -> bytes:
        raise AssertionError("map read guest data")

    for image in _qcow2_images(corpus):
        with closing(_open(image.path)) as img:
            layer: diskspec.Image | None = img
            while layer is not None:
                monkeypatch.setattr(layer, "_read", refuse)
                if isinstance(layer, Qcow2Image):
                    monkeypatch.setattr(layer, "_compressed", refuse)
                    layer = layer.backing
                else:
                    layer = None
            assert qcow2_map(img)
            monkeypatch.undo()


def test_raw_images_map_like_qemu(corpus: list[CorpusImage]) -> None:
    raws = [i for i in corpus if i.fmt == "raw"]
    assert raws
    for image in raws:
        text = _ok(_qemu_img("map", "--output=json", *image_opts(image), cwd=image.path.parent))
        human = _qemu_img("map", *image_opts(image), cwd=image.path.parent)
        with diskspec.open(image.path) as img:
            extents = image_map(img)
        _check_map_json(extents, text, image.name)
        _check_map_human(extents, human, image.name)


# info -------------------------------------------------------------------------------------------


def _check_info(mine: dict[str, Any], theirs: dict[str, Any], image: CorpusImage) -> None:
    assert list(mine) == list(theirs), image.name
    for key in theirs:
        if key == "filename" and "encrypted" in image.tags:
            assert theirs[key].startswith("json:{"), ENCRYPTED_FILENAME
            assert str(image.path) in theirs[key]
            continue
        assert mine[key] == theirs[key], (image.name, key)


def _without_secret(image: CorpusImage, *args: str) -> str:
    spec = f"driver=qcow2,file.filename={str(image.path).replace(',', ',,')}"
    return _ok(_qemu_img("info", *args, "--image-opts", spec, cwd=image.path.parent))


def _expected_text(image: CorpusImage, text: str, *args: str) -> str:
    """qemu's text; for encrypted images the run without the secret, which names the file."""
    if "encrypted" not in image.tags:
        return text
    plain = _without_secret(image, *args)

    def rest(t: str) -> list[str]:
        return [ln for ln in t.splitlines() if '"filename": ' not in ln and "image: " not in ln]

    assert rest(plain) == rest(text), ENCRYPTED_FILENAME  # the two runs differ in that only
    return plain


def test_info_json_matches_qemu(corpus: list[CorpusImage]) -> None:
    for image in _qcow2_images(corpus):
        args = ("info", "--output=json")
        text = _ok(_qemu_img(*args, *image_opts(image), cwd=image.path.parent))
        with closing(_open(image.path)) as img:
            info = qcow2_info(img)
        assert isinstance(info, dict)
        _check_info(info, json.loads(text), image)
        assert format_info_json(info) == _expected_text(image, text, "--output=json"), image.name


def test_info_backing_chain_matches_qemu(corpus: list[CorpusImage]) -> None:
    chains = 0
    for image in _qcow2_images(corpus):
        args = ("info", "--output=json", "--backing-chain")
        text = _ok(_qemu_img(*args, *image_opts(image), cwd=image.path.parent))
        with closing(_open(image.path)) as img:
            info = qcow2_info(img, backing_chain=True)
        want = json.loads(text)
        assert isinstance(info, list)
        assert len(info) == len(want), image.name
        for mine, theirs in zip(info, want, strict=True):
            _check_info(mine, theirs, image)
        chains += len(info) > 1
        expected = _expected_text(image, text, "--output=json", "--backing-chain")
        assert format_info_json(info) == expected, image.name
    assert chains >= 4


def test_info_human_matches_qemu(corpus: list[CorpusImage]) -> None:
    for image in _qcow2_images(corpus):
        for chain in (False, True):
            extra = ("--backing-chain",) if chain else ()
            text = _ok(_qemu_img("info", *extra, *image_opts(image), cwd=image.path.parent))
            with closing(_open(image.path)) as img:
                info = qcow2_info(img, backing_chain=chain)
            expected = _expected_text(image, text, *extra)
            assert format_info_human(info) == expected, (image.name, chain)


def test_encrypted_filename_is_the_only_info_exception(corpus: list[CorpusImage]) -> None:
    seen = 0
    for image in _qcow2_images(corpus):
        if "encrypted" not in image.tags:
            continue
        with closing(_open(image.path)) as img:
            info = qcow2_info(img)
        assert isinstance(info, dict)
        assert info == json.loads(_without_secret(image, "--output=json"))
        seen += 1
    assert seen >= 3


def test_qdict_order_matches_qemu() -> None:
    # qemu prints ImageInfo keys in hash-bucket order, not in the schema's order
    keys = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size"]
    ordered = qdict_order([(k, 0) for k in keys])
    assert list(ordered) == [
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "dirty-flag",
    ]


# edge images made here ---------------------------------------------------------------------------


def _qemu_io(*args: str, cwd: Path, killed: bool = False) -> None:
    proc = subprocess.run(
        [require_tool("qemu-io"), *args], capture_output=True, text=True, cwd=cwd, check=False
    )
    assert " failed: " not in proc.stdout, proc.stdout
    assert proc.returncode == (-9 if killed else 0), proc.stderr


def _check_all(path: Path) -> list[Extent]:
    """map (JSON and human) and info (JSON, human, chain) of one image against qemu."""
    os.sync()  # st_blocks settled first: qemu's preallocation guess reads it
    cwd = path.parent
    spec = ["--image-opts", f"driver=qcow2,file.filename={path}"]
    with closing(_open(path)) as img:
        extents = qcow2_map(img)
        info = qcow2_info(img)
        chain = qcow2_info(img, backing_chain=True)
    _check_map_json(extents, _ok(_qemu_img("map", "--output=json", *spec, cwd=cwd)), path.name)
    _check_map_human(extents, _qemu_img("map", *spec, cwd=cwd), path.name)
    assert format_info_json(info) == _ok(_qemu_img("info", "--output=json", *spec, cwd=cwd))
    assert format_info_human(info) == _ok(_qemu_img("info", *spec, cwd=cwd))
    args = ("info", "--backing-chain")
    assert format_info_json(chain) == _ok(_qemu_img(*args, "--output=json", *spec, cwd=cwd))
    assert format_info_human(chain) == _ok(_qemu_img(*args, *spec, cwd=cwd))
    return extents


def _create(*args: str, cwd: Path) -> None:
    _ok(_qemu_img("create", "-q", "-f", "qcow2", *args, cwd=cwd))


def test_empty_image(tmp_path: Path) -> None:
    _create("empty.qcow2", "0", cwd=tmp_path)
    with closing(_open(tmp_path / "empty.qcow2")) as img:
        assert qcow2_map(img) == []
    assert _check_all(tmp_path / "empty.qcow2") == []


def test_backing_shorter_than_a_sector(tmp_path: Path) -> None:
    """A 3-byte raw base: qemu rounds its length up to 512, and past it the top reads zero."""
    (tmp_path / "odd.raw").write_bytes(b"abc")
    _create("-b", "odd.raw", "-F", "raw", "top.qcow2", "64k", cwd=tmp_path)
    extents = _check_all(tmp_path / "top.qcow2")
    assert [(e.start, e.length, e.depth, e.data) for e in extents] == [
        (0, 3, 1, True),
        (3, 509, 1, False),
        (512, 65536 - 512, 0, False),
    ]


def test_sparse_raw_and_short_qcow2_backing(tmp_path: Path) -> None:
    """raw (sparse, 3 MiB) <- qcow2 (4 MiB, 4 KiB clusters) <- qcow2 (8 MiB, subclusters)."""
    with (tmp_path / "sparse.raw").open("wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"\x5a" * 70000)
        f.seek((3 << 20) - 1000)
        f.write(b"\x5b" * 1000)
    _create(
        "-o", "cluster_size=4096", "-b", "sparse.raw", "-F", "raw", "mid.qcow2", "4M", cwd=tmp_path
    )
    _qemu_io("-c", "write -P 1 4096 4096", "-c", "write -z 1048576 8192", "mid.qcow2", cwd=tmp_path)
    _create(
        "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "8M", cwd=tmp_path
    )
    writes = ("write -P 2 2048 2048", "write -P 3 3145728 100000", "write -z -u 1050624 2048")
    _qemu_io(*(a for w in writes for a in ("-c", w)), "top.qcow2", cwd=tmp_path)
    extents = _check_all(tmp_path / "top.qcow2")
    depths = {(e.depth, e.present, e.zero, e.data) for e in extents}
    assert (2, True, True, False) in depths  # holes of the sparse raw base
    assert (2, True, False, True) in depths  # its data
    assert (1, True, True, False) in depths  # zero clusters of the middle layer
    assert (1, False, True, False) in depths  # past the end of the raw base (3 MiB)
    assert (0, False, True, False) in depths  # past the end of the middle layer (4 MiB)


def test_dirty_image_and_bitmap_in_use(tmp_path: Path) -> None:
    _create("-o", "lazy_refcounts=on", "d.qcow2", "1M", cwd=tmp_path)
    _ok(_qemu_img("bitmap", "--add", "d.qcow2", "bm0", cwd=tmp_path))
    # killed while open: the dirty bit and the bitmap's in-use flag stay set
    _qemu_io("-c", "write 0 64k", "-c", "sigraise 9", "d.qcow2", cwd=tmp_path, killed=True)
    with closing(_open(tmp_path / "d.qcow2")) as img:
        info = qcow2_info(img)
    assert isinstance(info, dict)
    assert info["dirty-flag"] is True
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    _check_all(tmp_path / "d.qcow2")


_LUKS_VARIANTS = {
    "essiv": "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "serpent": "cipher-alg=serpent-192,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha512",
    "twofish": "cipher-alg=twofish-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha384",
}


def test_luks_variants(tmp_path: Path) -> None:
    """Other LUKS ciphers, modes, IV generators and hashes (ivgen-hash-alg only with essiv)."""
    for name, spec in _LUKS_VARIANTS.items():
        opts = ",".join(f"encrypt.{kv}" for kv in spec.split(","))
        opts += ",encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
        cmd = ("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o", opts)
        for _ in range(10):  # qemu 7.2's PBKDF benchmark fails now and then (see corpus.py)
            proc = _qemu_img(*cmd, f"{name}.qcow2", "1M", cwd=tmp_path)
            if proc.returncode == 0 or "Unable to get accurate CPU usage" not in proc.stderr:
                break
        _ok(proc)
        path = tmp_path / f"{name}.qcow2"
        _qemu_io(
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            "-c",
            "write 0 4k",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=s",
            cwd=tmp_path,
        )
        with closing(_open(path)) as img:
            info = qcow2_info(img)
            extents = qcow2_map(img)
        spec_opts = ["--image-opts", f"driver=qcow2,file.filename={path}"]
        assert format_info_json(info) == _ok(
            _qemu_img("info", "--output=json", *spec_opts, cwd=tmp_path)
        )
        assert format_info_human(info) == _ok(_qemu_img("info", *spec_opts, cwd=tmp_path))
        encrypt = info["format-specific"]["data"]["encrypt"]
        assert ("ivgen-hash-alg" in encrypt) == (name == "essiv")
        keyed = [
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=s",
        ]
        text = _ok(_qemu_img("map", "--output=json", *keyed, cwd=tmp_path))
        _check_map_json(extents, text, name)
