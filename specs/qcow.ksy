meta:
  id: qcow
  title: QEMU copy-on-write disk image, version 1 (qcow)
  application: QEMU
  file-extension: qcow
  license: CC0-1.0
  ks-version: '0.11'
  endian: be
  bit-endian: be
doc: |
  The first QEMU copy-on-write format: a 48-byte header, a two-level L1 -> L2 mapping with
  append-only allocation and no refcounts, optional zlib-compressed clusters and optional
  AES-128-CBC encryption. All integers are big-endian. It shares its magic with qcow2 and is
  told apart by version 1.
doc-ref:
  - https://gitlab.com/qemu-project/qemu/-/blob/master/block/qcow.c
  - ../shared/formats/qcow.md, section A
seq:
  - id: header
    type: header
instances:
  backing_file_name:
    pos: header.ofs_backing_file_name
    size: header.len_backing_file_name
    if: header.ofs_backing_file_name != 0
    doc: Name of the backing file, not NUL-terminated. No backing format is stored.
  l1_table:
    pos: header.ofs_l1_table
    type: l1_entry
    repeat: expr
    repeat-expr: header.num_l1_entries
    doc: The L1 table, one entry per L2 table.
types:
  header:
    doc: The 48-byte header at offset 0.
    seq:
      - id: magic
        contents: [0x51, 0x46, 0x49, 0xfb]
        doc: '"QFI\xfb", shared with qcow2.'
      - id: version
        type: u4
        valid: 1
        doc: Always 1; 2 and 3 are qcow2.
      - id: ofs_backing_file_name
        -orig-id: backing_file_offset
        type: u8
        doc: Offset of the backing file name, 0 for none.
      - id: len_backing_file_name
        -orig-id: backing_file_size
        type: u4
        valid:
          max: 1023
        doc: Length of the backing file name, at most 1023, no NUL terminator.
      - id: mtime
        type: u4
        doc: Unused; qemu writes 0.
      - id: len_virtual_disk
        -orig-id: size
        type: u8
        valid:
          min: 2
        doc: Virtual disk size in bytes; qemu uses size / 512 sectors.
      - id: cluster_bits
        type: u1
        valid:
          min: 9
          max: 16
        doc: log2 of the cluster size, 512 B to 64 KiB.
      - id: l2_bits
        type: u1
        valid:
          min: 6
          max: 13
        doc: log2 of the entries per L2 table; not tied to the cluster size.
      - id: padding
        size: 2
        doc: Unused.
      - id: crypt_method
        type: u4
        enum: crypt_method
        doc: Encryption of guest data.
      - id: ofs_l1_table
        -orig-id: l1_table_offset
        type: u8
        doc: Offset of the L1 table; qemu writes it 8-aligned after the backing name.
    instances:
      cluster_size:
        value: 1 << cluster_bits
        doc: Bytes per cluster.
      num_l2_entries:
        value: 1 << l2_bits
        doc: Entries per L2 table.
      len_l2_table:
        value: 8 << l2_bits
        doc: Bytes per L2 table.
      num_l1_entries:
        -orig-id: l1_size
        value: >-
          (len_virtual_disk + (1 << (cluster_bits + l2_bits)) - 1) >>
          (cluster_bits + l2_bits)
        doc: Entries in the L1 table, derived from the size (there is no l1_size field).

  l1_entry:
    doc: One L1 entry, the plain offset of an L2 table (no flag bits); 0 is unallocated.
    seq:
      - id: ofs_l2_table
        -orig-id: l1_table[i]
        type: u8
        doc: Offset of the L2 table.

  l2_entry:
    doc: |
      One L2 entry. A normal entry holds the host offset of the cluster (0 is unallocated);
      a compressed one holds a compressed_descriptor.
    seq:
      - id: compressed
        -orig-id: QCOW_OFLAG_COMPRESSED
        type: b1
        doc: The cluster is compressed.
      - id: ofs_cluster
        type: b63
        doc: Host offset of a normal cluster, 512-aligned.

  l2_table:
    doc: One L2 table, 8 << l2_bits bytes.
    params:
      - id: l2_bits
        type: u1
        doc: The image's l2_bits.
    seq:
      - id: entries
        type: l2_entry
        repeat: expr
        repeat-expr: 1 << l2_bits

  compressed_descriptor:
    doc: |
      A compressed L2 entry: bit 63 set, the compressed size in BYTES in bits
      63 - cluster_bits .. 62, the host byte offset below.
    params:
      - id: cluster_bits
        type: u1
        doc: The image's cluster_bits.
    seq:
      - id: raw
        type: u8
        doc: The whole L2 entry.
    instances:
      num_offset_bits:
        value: 63 - cluster_bits
        doc: Width of the host offset field.
      ofs_compressed:
        value: raw & ((1 << num_offset_bits) - 1)
        doc: Host byte offset of the raw deflate data.
      len_compressed:
        value: (raw >> num_offset_bits) & ((1 << cluster_bits) - 1)
        doc: Bytes of compressed data.

enums:
  crypt_method:
    0: none
    1:
      id: aes
      -orig-id: QCOW_CRYPT_AES
      doc: AES-128-CBC per 512-byte sector, IV = little-endian guest sector number.
