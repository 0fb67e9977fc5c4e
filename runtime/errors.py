"""The diskspec exception tree: everything raised for bad input derives from FormatError."""

from __future__ import annotations

__all__ = [
    "BuildError",
    "FormatError",
    "StructError",
    "TruncatedError",
    "ValidationError",
]


class FormatError(Exception):
    """Root of every error about the content of an image or a structure."""


class StructError(FormatError):
    """A structure failed to parse, validate or build.

    Carries the spec file, the spec path of the attribute, the structure and field names,
    the byte offset, and what was expected and found, so the one-line message says exactly
    which byte is wrong.
    """

    def __init__(
        self,
        spec: str,
        path: str,
        structure: str,
        fieldname: str,
        offset: int | None,
        problem: str,
    ) -> None:
        self.spec = spec
        self.path = path
        self.structure = structure
        self.field = fieldname
        self.offset = offset
        self.problem = problem
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(
            f"{structure}.{fieldname}{where}: {problem} ({spec} {path})"
        )


class TruncatedError(StructError):
    """The data ends before the structure does; ``needed`` is the end offset required."""

    def __init__(
        self,
        spec: str,
        path: str,
        structure: str,
        fieldname: str,
        offset: int,
        needed: int,
        available: int,
    ) -> None:
        self.needed = needed
        self.available = available
        super().__init__(
            spec,
            path,
            structure,
            fieldname,
            offset,
            f"needs {needed - offset} bytes, only {max(available - offset, 0)} available",
        )


class ValidationError(StructError):
    """A field holds a value its format does not allow."""


class BuildError(StructError):
    """An object cannot be serialized: counts, lengths or conditions disagree with its data."""
