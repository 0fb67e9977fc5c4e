"""qcow version 1 images: read, write, create, map and info (qcow.md section A)."""
