"""diskspec: qcow (v1), qcow2 (v2, v3) and FVD disk images.

The on-disk structures are generated from the Kaitai Struct specs in specs/ into
``diskspec.generated``; everything diskspec raises for bad input derives from
:class:`FormatError`.
"""

from __future__ import annotations

from .errors import BuildError, FormatError, StructError, TruncatedError, ValidationError

__all__ = [
    "BuildError",
    "FormatError",
    "StructError",
    "TruncatedError",
    "ValidationError",
    "__version__",
]

__version__ = "0.1.0"
