"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diskspec.tests.corpus import CorpusImage, build_corpus

_REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus() -> list[CorpusImage]:
    """The qemu-made image corpus, built once (and cached across sessions).

    It goes into $DISKSPEC_CORPUS_DIR, or <repo>/.cache/corpus. Without qemu-img and qemu-io
    this fails; it never skips.
    """
    dest = os.environ.get("DISKSPEC_CORPUS_DIR") or str(_REPO / ".cache" / "corpus")
    return build_corpus(Path(dest))
