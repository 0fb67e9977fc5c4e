"""FVD v1 (IBM's Fast Virtual Disk): create, read, write, journal, check (fvd.md)."""

from __future__ import annotations

from .create import create_fvd
from .image import FvdImage, open_fvd

__all__ = ["FvdImage", "create_fvd", "open_fvd"]
