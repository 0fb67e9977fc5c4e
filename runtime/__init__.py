"""diskspec: qcow, qcow2 and FVD."""
