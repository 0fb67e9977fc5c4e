"""qcow2: header, read path and snapshots."""
