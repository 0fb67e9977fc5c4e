# Test helper: compile_ksy([spec.ksy], tmp_path), then load_compiled(tmp_path, "spec_id").
"""Compile .ksy specs with the official Kaitai Struct compiler 0.11 (npm build) in tests.

The compiler and js-yaml are pinned in ``tests/ksc/package.json`` (with its lock
file) and installed on first use into ``<repo>/.ksc/`` by :func:`ensure_compiler`;
``tests/ksc/compile.js`` drives the compiler's programmatic API.  The node_modules
folder can be overridden with the environment variable ``DISKSPEC_KSC_DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "KSC_VERSION",
    "KscError",
    "compile_ksy",
    "ensure_compiler",
    "load_compiled",
]

KSC_VERSION = "0.11.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
HARNESS_DIR = REPO_ROOT / "tests" / "ksc"
COMPILE_JS = HARNESS_DIR / "compile.js"
_ENV_KSC_DIR = "DISKSPEC_KSC_DIR"


class KscError(RuntimeError):
    """The Kaitai Struct compiler rejected a spec; the message is the compiler's stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _modules_dir() -> Path:
    override = os.environ.get(_ENV_KSC_DIR)
    if override:
        return Path(override).resolve()
    return REPO_ROOT / ".ksc" / "node_modules"


def _package_version(modules: Path, name: str) -> str | None:
    try:
        data = json.loads((modules / name / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def _pinned_versions() -> dict[str, str]:
    data = json.loads((HARNESS_DIR / "package.json").read_text(encoding="utf-8"))
    deps = data["dependencies"]
    return {str(name): str(version) for name, version in deps.items()}


def _is_installed(modules: Path) -> bool:
    if _package_version(modules, "kaitai-struct-compiler") != KSC_VERSION:
        return False
    return all(
        _package_version(modules, name) == version for name, version in _pinned_versions().items()
    )


@contextlib.contextmanager
def _install_lock(install_dir: Path) -> Iterator[None]:
    """Serialise installs between concurrent test processes (e.g. pytest-xdist)."""
    install_dir.mkdir(parents=True, exist_ok=True)
    with (install_dir / ".install.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_compiler() -> Path:
    """Install the pinned compiler into ``<repo>/.ksc/`` if needed; return its node_modules."""
    modules = _modules_dir()
    if _is_installed(modules):
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found on PATH: cannot install kaitai-struct-compiler")
    install_dir = modules.parent
    with _install_lock(install_dir):
        if _is_installed(modules):  # another process finished the install meanwhile
            return modules
        shutil.copyfile(HARNESS_DIR / "package.json", install_dir / "package.json")
        lock = HARNESS_DIR / "package-lock.json"
        if lock.is_file():
            shutil.copyfile(lock, install_dir / "package-lock.json")
            command = [npm, "ci", "--no-audit", "--no-fund"]
        else:
            (install_dir / "package-lock.json").unlink(missing_ok=True)
            command = [npm, "install", "--no-audit", "--no-fund"]
        proc = subprocess.run(
            command,
            cwd=install_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"npm {' '.join(command[1:])} failed in {install_dir} (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        if not _is_installed(modules):
            raise RuntimeError(
                f"npm finished but {modules} does not hold kaitai-struct-compiler "
                f"{KSC_VERSION} and the pinned js-yaml:\n{proc.stdout}{proc.stderr}"
            )
    return modules


def compile_ksy(paths: list[Path], outdir: Path) -> list[Path]:
    """Compile specs (and the specs they import) to Python modules in ``outdir``.

    Returns the paths of the written files; raises :class:`KscError` with the
    compiler's message (which names the spec path, e.g. ``/seq/3/type``) on failure.
    """
    if not paths:
        raise ValueError("compile_ksy needs at least one .ksy file")
    modules = ensure_compiler()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found on PATH: cannot run kaitai-struct-compiler")
    outdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[_ENV_KSC_DIR] = str(modules)
    proc = subprocess.run(
        [node, str(COMPILE_JS), str(outdir), *(str(p) for p in paths)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise KscError(proc.stderr.strip() or f"compile.js exited with {proc.returncode}")
    return [outdir / line for line in proc.stdout.splitlines() if line.strip()]


def load_compiled(outdir: Path, module: str) -> types.ModuleType:
    """Import the compiled module ``module`` (file ``outdir/<module>.py``) and return it.

    The generated code imports its sibling modules by bare name at import time, so
    ``outdir`` is put on ``sys.path`` only while importing; afterwards every module
    loaded from ``outdir`` is dropped from ``sys.modules`` again (and any module of
    the same name that was there before is restored).  Loading the same name from
    two folders therefore gives two independent modules, and nothing leaks into
    other tests.  No bytecode is written into ``outdir``.
    """
    import kaitaistruct  # noqa: F401  # import the runtime first, never shadowed by outdir

    folder = outdir.resolve()
    if not (folder / f"{module}.py").is_file():
        raise FileNotFoundError(f"no compiled module {module}.py in {folder}")
    local_names = {p.stem for p in folder.glob("*.py")}
    saved = {name: sys.modules.pop(name) for name in local_names if name in sys.modules}
    entry = str(folder)
    sys.path.insert(0, entry)
    old_dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module)
    finally:
        sys.dont_write_bytecode = old_dont_write
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        for name in local_names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
