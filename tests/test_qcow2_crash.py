"""Crash consistency: a writer killed at any moment leaves at worst leaked clusters.

A child process writes, zeroes, discards and takes and deletes snapshots without end; the test
kills it (SIGKILL) at a random moment. qemu's invariant (qcow.md C.2) must hold: no reference
to a cluster whose refcount is too low, so qemu-img check reports only leaked clusters and, in
the window of a snapshot operation, stale COPIED flags (qemu has the same window; both are
what `check -r all` repairs without touching data). After the repair the image is clean.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import diskspec
from diskspec.tests.corpus import require_tool

WRITER = r"""
import random, sys
import diskspec
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
img = diskspec.open(path, "r+")
n = 0
while True:
    op = rng.random()
    size = img.size
    length = rng.choice([512, 4096, 70000, 300000])
    off = rng.randrange(0, size - length)
    if op < 0.6:
        img.pwrite(bytes([rng.randrange(1, 256)]) * length, off)
    elif op < 0.7:
        img.write_zeroes(off, length)
    elif op < 0.8:
        img.discard(off, length)
    elif op < 0.85 and img.head.refcount_order >= 3:
        n += 1
        img.create_snapshot(f"s{n}")
    elif op < 0.9 and img.snapshots():
        img.delete_snapshot(rng.choice(img.snapshots()).name)
    else:
        img.flush()
    print(".", end="", flush=True)
"""


def _check(path: Path) -> tuple[int, list[str]]:
    done = subprocess.run([require_tool("qemu-img"), "check", str(path)],
                          capture_output=True, text=True, check=False)
    return done.returncode, [line for line in done.stderr.splitlines() if line]


@pytest.mark.parametrize("options", [{"cluster_size": 512}, {"cluster_size": 4096},
                                     {"refcount_bits": 64, "cluster_size": 1024},
                                     {"extended_l2": "on", "cluster_size": 16384}])
def test_killed_writer_leaves_only_leaks(tmp_path: Path, options: dict[str, object]) -> None:
    rng = random.Random(str(options))
    path = tmp_path / "crash.qcow2"
    diskspec.create(path, "qcow2", "4M", **options)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    kinds: set[int] = set()
    for round_ in range(6):
        child = subprocess.Popen([sys.executable, str(script), str(path), str(round_)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout is not None
        child.stdout.read(rng.randrange(1, 40))  # let it run a while, then kill it mid-work
        time.sleep(rng.random() / 50)
        child.send_signal(signal.SIGKILL)
        child.wait()
        rc, lines = _check(path)
        bad = [line for line in lines
               if not line.startswith("Leaked cluster") and "OFLAG_COPIED" not in line]
        assert not bad, (round_, bad[:5])
        assert rc in (0, 2, 3), (round_, rc, lines[:5])
        kinds.add(rc)
        with diskspec.open(path, "r+") as img:  # the next round starts from a clean image
            img.check(repair="all")
        assert _check(path) == (0, []), round_
    assert kinds, "no round ran"
