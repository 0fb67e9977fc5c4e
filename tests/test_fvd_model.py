"""FVD against a bytearray model: writes (unaligned, crossing blocks and chunks), zeroes,
copy-on-read reads, prefetch, flush, reopen and reopen after a crash, over every kind of
image (plain, compact, raw and qcow2 bases, based + compact, data files) and block sizes
512 B to 64 KiB.

A crash drops the process between the data fsync and the journal write ("data"), right
after the journal fsync ("journal"), or in a journal recycle: the image is abandoned with
no close protocol, opened read-only (the journal is replayed in memory; the file must not
change), then read-write. A write whose journal was synced must be all there; one cut off
before its journal may read old or new per sector, never anything else; every other byte
is as the model says. Examples per kind: DISKSPEC_FVD_EXAMPLES (default 10).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import diskspec
from diskspec.fvd import FvdImage
from diskspec.tests.fvd_support import KINDS, KiB, MiB, build, digest, read_all

EXAMPLES = int(os.environ.get("DISKSPEC_FVD_EXAMPLES", "10"))
SIZE = 1 * MiB


class _Crash(Exception):
    pass


class FvdMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="fvd-model-"))
        self.img: FvdImage | None = None
        self.model = bytearray()
        self.prefetched = False
        self.base: Path | None = None
        self.kind = ""

    KIND = "plain"

    @initialize(
        block_exp=st.integers(9, 16),
        journal=st.sampled_from([4096, 4096, 8192, 64 * KiB]),
        seed=st.integers(0, 2**16),
    )
    def setup(self, block_exp: int, journal: int, seed: int) -> None:
        kind = self.kind = self.KIND
        built = build(self.folder, kind, size=SIZE, block_size=1 << block_exp, seed=seed,
                      journal_size=journal)
        self.path, self.model, self.base = built.path, built.model, built.base
        self.img = self._open()

    def _open(self, mode: str = "r+") -> FvdImage:
        img = diskspec.open(self.path, mode)
        assert isinstance(img, FvdImage)
        return img

    def teardown(self) -> None:
        try:
            if self.img is not None and not self.img.closed:
                self.img.close()
                with self._open("r") as img:
                    assert read_all(img) == bytes(self.model)
                    assert img.check().exit_code() == 0
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    @rule(
        at=st.integers(0, SIZE - 1),
        n=st.integers(1, 150 * KiB),
        seed=st.integers(0, 2**16),
        flush=st.booleans(),
    )
    def write(self, at: int, n: int, seed: int, flush: bool) -> None:
        assert self.img is not None
        at %= len(self.model)
        n = min(n, len(self.model) - at)
        data = random.Random(seed).randbytes(n)
        self.img.pwrite(data, at)
        self.model[at : at + n] = data
        if flush:
            self.img.flush()

    @rule(seed=st.integers(0, 2**16))
    def burst(self, seed: int) -> None:
        """Small writes, each flushed: journal sectors fill up and the journal recycles."""
        assert self.img is not None
        rng = random.Random(seed)
        for _ in range(6):
            at = rng.randrange(0, len(self.model) - 2048)
            data = rng.randbytes(rng.randrange(1, 2048))
            self.img.pwrite(data, at)
            self.model[at : at + len(data)] = data
            self.img.flush()

    @rule(at=st.integers(0, SIZE - 1), n=st.integers(1, 200 * KiB))
    def zeroes(self, at: int, n: int) -> None:
        assert self.img is not None
        at %= len(self.model)
        n = min(n, len(self.model) - at)
        self.img.write_zeroes(at, n)
        self.model[at : at + n] = bytes(n)

    @rule(at=st.integers(0, SIZE - 1), n=st.integers(1, 200 * KiB), cor=st.booleans())
    def read(self, at: int, n: int, cor: bool) -> None:
        assert self.img is not None
        at %= len(self.model)
        n = min(n, len(self.model) - at)
        self.img.copy_on_read = cor
        assert self.img.pread(n, at) == bytes(self.model[at : at + n])

    @rule(sectors=st.integers(512, 3072))
    def resize(self, sectors: int) -> None:
        """Grow (the new part reads as zeros) or shrink (--shrink: clamps the base range)."""
        assert self.img is not None
        new = sectors * 512
        self.img.resize(new, shrink=True)
        old = len(self.model)
        self.model[new:] = b""
        self.model += bytes(max(0, new - old))
        assert self.img.size == new
        assert read_all(self.img) == bytes(self.model)
        result = self.img.check()  # chunks past a shrunk end leak; repairing moves chunks
        assert result.exit_code() in (0, 3) and not result.corruptions
        if result.leaks:
            event("leaks after a shrink, repaired")
            assert self.img.check(repair="leaks").exit_code() == 0
            assert read_all(self.img) == bytes(self.model)

    @rule()
    def flush(self) -> None:
        assert self.img is not None
        self.img.flush()

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        before = digest(*self._files())
        with self._open("r") as ro:
            assert read_all(ro) == bytes(self.model)
        assert digest(*self._files()) == before
        self.img = self._open()

    @precondition(lambda self: not self.prefetched)
    @rule()
    def prefetch(self) -> None:
        assert self.img is not None
        self.img.prefetch()
        event("prefetch")
        self.prefetched = True
        self.img.close()
        if self.base is not None:  # the base is no longer needed
            self.base.rename(self.base.with_suffix(".gone"))
        self.img = self._open()
        assert self.img.backing is None
        assert read_all(self.img) == bytes(self.model)

    @rule(
        point=st.sampled_from(["data", "journal", "recycle", "none"]),
        at=st.integers(0, SIZE - 1),
        n=st.integers(1, 150 * KiB),
        seed=st.integers(0, 2**16),
        fill=st.booleans(),
    )
    def crash(self, point: str, at: int, n: int, seed: int, fill: bool) -> None:
        assert self.img is not None
        rng = random.Random(seed)
        writes = []
        for _ in range(20 if fill else 0):  # small writes first: the journal fills, recycles
            w_at = rng.randrange(0, len(self.model) - 2048)
            writes.append((w_at, rng.randbytes(rng.randrange(1, 2048))))
        at %= len(self.model)
        n = min(n, len(self.model) - at)
        writes.append((at, rng.randbytes(n)))
        self.img.flush()  # what came before is done; only these writes are in the window

        def hook(where: str) -> None:
            if where == point:
                raise _Crash(where)

        self.img.crash_hook = hook
        crashed = None
        for at, data in writes:
            old = bytes(self.model[at : at + len(data)])
            self.img.pwrite(data, at)
            try:
                self.img.flush()
            except _Crash as exc:
                crashed = str(exc)
                break
            self.model[at : at + len(data)] = data
        event(f"crash at {point}: {'cut' if crashed else 'after a complete flush'}")
        self.img.abandon()
        self.img = None
        before = digest(*self._files())
        n = len(data)
        with self._open("r") as ro:
            got = ro.pread(n, at)
            if crashed == "data":  # cut off before its journal: old or new, per sector
                edges = sorted({0, n, *range(512 - at % 512, n, 512)})
                for s, e in pairwise(edges):
                    assert got[s:e] in (old[s:e], data[s:e]), (at + s, point)
            else:  # the journal (or a recycle's bitmap and table) made it durable
                assert got == data
            self.model[at : at + n] = got
            assert read_all(ro) == bytes(self.model)
        assert digest(*self._files()) == before, "a read-only open wrote"
        self.img = self._open()
        assert read_all(self.img) == bytes(self.model)
        result = self.img.check()
        if result.leaks:  # copy-on-read chunks are not journaled: lost in a crash (fvd.md 4.3)
            event("leaks after a crash, repaired")
            assert result.exit_code() == 3 and not result.corruptions
            assert self.img.check(repair="leaks").exit_code() == 0
            assert read_all(self.img) == bytes(self.model)
        assert result.exit_code() in (0, 3)

    @invariant()
    def open_image(self) -> None:
        assert self.img is None or not self.img.closed


@pytest.mark.parametrize("kind", [k[0] for k in KINDS])
def test_fvd_against_model(kind: str) -> None:
    machine = type(f"Fvd_{kind.replace('-', '_')}", (FvdMachine,), {"KIND": kind})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
