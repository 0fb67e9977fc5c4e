"""Tests of the qemu-made image corpus (tests/corpus.py).

They build the real corpus (session fixture `corpus`, see conftest.py) and compare what
``qemu-img info`` reports about every image with the options of its recipe.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from diskspec.tests import corpus as corpus_module
from diskspec.tests.corpus import (
    RECIPES,
    CorpusError,
    CorpusImage,
    Io,
    Recipe,
    build_corpus,
    image_opts,
    main,
    recipe_hash,
    require_tool,
)

# Every feature the conformance tests rely on must be in the corpus at least once.
REQUIRED_TAGS = frozenset(
    {
        "snapshots",
        "luks",
        "aes",
        "bitmaps",
        "backing",
        "data_file",
        "data_file_raw",
        "zstd",
        "compressed",
        "extended_l2",
        "lazy_refcounts",
        "refcount_bits",
        "v2",
        "v3",
        "qcow1",
        "raw",
        "zero_writes",
        "discard",
        "ext_backing_format",
        "ext_feature_table",
        "ext_crypto",
        "ext_bitmaps",
        "ext_data_file",
    }
)


def _by_name(images: list[CorpusImage], name: str) -> CorpusImage:
    matches = [image for image in images if image.name == name]
    assert len(matches) == 1, f"{name}: {len(matches)} images"
    return matches[0]


def _info(image: CorpusImage) -> dict[str, Any]:
    cmd = [require_tool("qemu-img"), "info", "--output=json", *image_opts(image)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def test_corpus_builds(corpus: list[CorpusImage]) -> None:
    assert [image.name for image in corpus] == [recipe.name for recipe in RECIPES]
    assert len({image.name for image in corpus}) == len(corpus)
    for image in corpus:
        assert image.path.is_file(), image
        assert image.path.name.startswith(image.name)
        assert image.fmt in {"qcow2", "qcow", "raw"}
        assert ("encrypted" in image.tags) == (image.secret is not None), image.name
        if "data_file" in image.options:
            assert (image.path.parent / image.options["data_file"]).is_file()


def test_every_feature_is_covered(corpus: list[CorpusImage]) -> None:
    seen = frozenset().union(*(image.tags for image in corpus))
    assert seen >= REQUIRED_TAGS, f"missing tags: {sorted(REQUIRED_TAGS - seen)}"


def test_corpus_is_small(corpus: list[CorpusImage]) -> None:
    dest = corpus[0].path.parent
    used = sum(path.stat().st_blocks * 512 for path in dest.iterdir() if path.is_file())
    assert used < 200 * 1024 * 1024


@pytest.mark.parametrize("name", [recipe.name for recipe in RECIPES])
def test_info_matches_options(corpus: list[CorpusImage], name: str) -> None:
    image = _by_name(corpus, name)
    opts = image.options
    info = _info(image)
    data = info.get("format-specific", {}).get("data", {})

    assert info["format"] == image.fmt
    if "compat" in opts:
        assert data["compat"] == opts["compat"]
    if "cluster_size" in opts:
        assert info["cluster-size"] == int(opts["cluster_size"])
    if "refcount_bits" in opts:
        assert data["refcount-bits"] == int(opts["refcount_bits"])
    if image.fmt == "qcow2" and data.get("compat") == "1.1":
        assert data["compression-type"] == opts.get("compression_type", "zlib")
        assert data["extended-l2"] == (opts.get("extended_l2") == "on")
        assert data["lazy-refcounts"] == (opts.get("lazy_refcounts") == "on")
    if "data_file" in opts:
        assert data["data-file"] == opts["data_file"]
        assert data.get("data-file-raw", False) == (opts.get("data_file_raw") == "on")
    if "backing_file" in opts:
        assert info["backing-filename"] == opts["backing_file"]
        if image.fmt == "qcow2":  # qcow v1 cannot store the backing format
            assert info["backing-filename-format"] == opts["backing_fmt"]
    else:
        assert "backing-filename" not in info
    if "encrypt.format" in opts:
        assert info["encrypted"] is True
        if image.fmt == "qcow2":
            assert data["encrypt"]["format"] == opts["encrypt.format"]
    if "bitmaps" in image.tags:
        assert {b["name"] for b in data["bitmaps"]} == {"bitmap0", "bitmap1", "bitmap2"}
        assert {b["name"]: b["granularity"] for b in data["bitmaps"]}["bitmap2"] == 4096
    if "snapshots" in image.tags:
        assert [s["name"] for s in info["snapshots"]] == ["snap1", "snap2"]


def test_second_build_is_cached(corpus: list[CorpusImage]) -> None:
    dest = corpus[0].path.parent
    before = {path.name: path.stat().st_mtime_ns for path in dest.iterdir()}
    again = build_corpus(dest)
    assert again == corpus
    assert {path.name: path.stat().st_mtime_ns for path in dest.iterdir()} == before


def test_recipe_hash_follows_recipes_and_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    original = recipe_hash("qemu-img version 7.2.22")
    assert recipe_hash("qemu-img version 7.2.22") == original
    assert recipe_hash("qemu-img version 8.0.0") != original
    changed = (dataclasses.replace(RECIPES[0], size=RECIPES[0].size + 512), *RECIPES[1:])
    monkeypatch.setattr(corpus_module, "RECIPES", changed)
    assert recipe_hash("qemu-img version 7.2.22") != original


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        # qemu-img refuses the cluster size: the create command and its stderr are reported.
        (
            Recipe("bad-cluster", "qcow2", options=(("cluster_size", "1000"),)),
            r"qemu-img create(.|\n)*Cluster size must be a power of two",
        ),
        # qemu compresses only into unallocated clusters: the second write fails.
        (
            Recipe("bad-write", "qcow2", steps=(Io(("write -c -P 1 0 65536",) * 2),)),
            r"qemu-io(.|\n)*write failed: Input/output error",
        ),
    ],
)
def test_broken_recipe_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: Recipe, expected: str
) -> None:
    monkeypatch.setattr(corpus_module, "RECIPES", (recipe,))
    with pytest.raises(CorpusError, match=expected):
        build_corpus(tmp_path)
    assert not list(tmp_path.glob(".complete-*"))


def test_require_tool() -> None:
    assert Path(require_tool("qemu-img")).name == "qemu-img"
    with pytest.raises(RuntimeError, match="no-such-qemu-tool"):
        require_tool("no-such-qemu-tool")


def test_main_lists_images(corpus: list[CorpusImage], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(corpus[0].path.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(corpus)
    for line, image in zip(lines, corpus, strict=True):
        name, fmt, path, tags = line.split("\t")
        assert (name, fmt, Path(path)) == (image.name, image.fmt, image.path)
        assert set(tags.split(",")) == image.tags
