meta:
  id: qcow2
  title: QEMU copy-on-write disk image, versions 2 and 3 (qcow2)
  application: QEMU
  file-extension: qcow2
  xref:
    mime: application/x-qemu-disk
  license: CC0-1.0
  ks-version: '0.11'
  endian: be
  bit-endian: be
doc: |
  A qcow2 image maps guest (virtual) clusters to host clusters through a two-level table
  (L1 -> L2), keeps a reference count for every host cluster, and can hold internal snapshots,
  persistent dirty bitmaps, a LUKS encryption header and a pointer to a backing file. All
  integers are big-endian. Version 2 is qemu-img's "compat=0.10", version 3 its "compat=1.1".

  Parse the first cluster of the file with this type: the header, then the header extension
  area, which runs from the end of the header to the backing file name (or to the end of
  cluster 0 when there is no backing file). Tables elsewhere in the file are the positioned
  instances.
doc-ref:
  - https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.rst
  - ../shared/formats/qcow.md, section B
seq:
  - id: header
    type: header
  - id: extension_area
    -orig-id: header extensions
    size: header.ofs_extension_area_end - header.len_header_effective
    type: header_extension_area
    doc: |
      The header extensions, from the end of the header (72 for v2, header_length for v3)
      up to the backing file name, or to the end of cluster 0 when there is none.
instances:
  backing_file_name:
    pos: header.ofs_backing_file_name
    size: header.len_backing_file_name
    if: header.ofs_backing_file_name != 0
    doc: Name of the backing file, not NUL-terminated, resolved against the image's folder.
  l1_table:
    pos: header.ofs_l1_table
    type: l1_entry
    repeat: expr
    repeat-expr: header.num_l1_entries
    doc: The active L1 table, one entry per L2 table.
  refcount_table:
    pos: header.ofs_refcount_table
    type: refcount_table_entry
    repeat: expr
    repeat-expr: header.num_refcount_table_clusters * header.cluster_size / 8
    doc: The refcount table, one entry per refcount block.
  snapshot_table:
    pos: header.ofs_snapshot_table
    type: snapshot_entry
    repeat: expr
    repeat-expr: header.num_snapshots
    doc: The internal snapshots, each entry 8-aligned.
types:
  header:
    doc: |
      The fixed image header at offset 0: 72 bytes in version 2, header_length bytes (qemu
      writes 112) in version 3.
    seq:
      - id: magic
        contents: [0x51, 0x46, 0x49, 0xfb]
        doc: '"QFI\xfb", shared with qcow version 1.'
      - id: version
        type: u4
        valid:
          any-of: [2, 3]
        doc: 2 for compat=0.10, 3 for compat=1.1.
      - id: ofs_backing_file_name
        -orig-id: backing_file_offset
        type: u8
        doc: |
          Offset of the backing file name in the file, 0 for none. qemu requires it to lie
          within cluster 0; when nonzero it also ends the header extension area.
      - id: len_backing_file_name
        -orig-id: backing_file_size
        type: u4
        valid:
          max: 1023
        doc: Length of the backing file name in bytes, at most 1023, no NUL terminator.
      - id: cluster_bits
        type: u4
        valid:
          expr: >-
            _ >= 9 and _ <= 21 and (ofs_backing_file_name == 0 or
            ofs_backing_file_name + len_backing_file_name <= (1 << _))
        doc: |
          log2 of the cluster size; qemu accepts 9 (512 B) to 21 (2 MiB). The backing file
          name must lie within cluster 0.
      - id: len_virtual_disk
        -orig-id: size
        type: u8
        doc: Virtual disk size in bytes; qemu truncates it down to a multiple of 512.
      - id: crypt_method
        type: u4
        enum: crypt_method
        doc: Encryption of guest data clusters.
      - id: num_l1_entries
        -orig-id: l1_size
        type: u4
        valid:
          max: 4194304
        doc: |
          Entries in the active L1 table; at least what the virtual size needs, and qemu caps
          the table at 32 MiB.
      - id: ofs_l1_table
        -orig-id: l1_table_offset
        type: u8
        doc: Offset of the active L1 table; cluster-aligned.
      - id: ofs_refcount_table
        -orig-id: refcount_table_offset
        type: u8
        doc: Offset of the refcount table; cluster-aligned.
      - id: num_refcount_table_clusters
        -orig-id: refcount_table_clusters
        type: u4
        valid:
          expr: _ << cluster_bits <= 8388608
        doc: Clusters occupied by the refcount table; qemu caps the table at 8 MiB.
      - id: num_snapshots
        -orig-id: nb_snapshots
        type: u4
        valid:
          max: 65536
        doc: Number of internal snapshots.
      - id: ofs_snapshot_table
        -orig-id: snapshots_offset
        type: u8
        doc: Offset of the snapshot table; cluster-aligned.
      - id: incompatible_features
        type: u8
        -flags: incompatible_feature
        if: version >= 3
        doc: |
          Features a reader must understand to open the image at all; an unknown bit set
          refuses even a read-only open. Absent (all clear) in version 2.
      - id: compatible_features
        type: u8
        -flags: compatible_feature
        if: version >= 3
        doc: Features a reader may ignore; unknown bits are kept on rewrite.
      - id: autoclear_features
        type: u8
        -flags: autoclear_feature
        if: version >= 3
        doc: Features a writer that does not know them must clear before writing.
      - id: refcount_order
        type: u4
        if: version >= 3
        valid:
          max: 6
        doc: log2 of the refcount width in bits (0..6); 4 (16 bits) in version 2.
      - id: len_header
        -orig-id: header_length
        type: u4
        if: version >= 3
        valid:
          expr: _ >= 104 and _ % 8 == 0 and _ <= (1 << cluster_bits)
        doc: |
          Length of the header in bytes (qemu writes 112); header extensions start here.
          qemu does not check the multiple-of-8 rule of the specification; diskspec does.
      - id: compression_type
        type: u1
        enum: compression_type
        if: version >= 3 and len_header > 104
        doc: Compression of compressed clusters; present when header_length > 104.
      - id: padding
        size: 7
        if: version >= 3 and len_header > 104
        doc: Pads the header to 112 bytes; must be zero.
      - id: unknown_header_fields
        size: len_header - 112
        if: version >= 3 and len_header > 112
        doc: Header fields of later versions, kept verbatim on rewrite.
    instances:
      cluster_size:
        value: 1 << cluster_bits
        doc: Bytes per cluster.
      len_header_effective:
        value: 'version >= 3 ? len_header : 72'
        doc: Where the header extensions start.
      ofs_extension_area_end:
        value: 'ofs_backing_file_name != 0 ? ofs_backing_file_name : 1 << cluster_bits'
        doc: Where the header extension area ends.
      refcount_order_effective:
        value: 'version >= 3 ? refcount_order : 4'
        doc: log2 of the refcount width; version 2 always uses 16-bit refcounts.
      refcount_bits:
        value: 1 << refcount_order_effective
        doc: Width of one refcount in bits.
      has_extended_l2:
        value: >-
          version >= 3 and (incompatible_features >>
          incompatible_feature::extended_l2.to_i) & 1 != 0
        doc: True when L2 entries are 128 bits with a subcluster bitmap.
      num_l2_entries:
        value: '(1 << cluster_bits) / (has_extended_l2 ? 16 : 8)'
        doc: Entries per L2 table.
      num_refcount_block_entries:
        value: 1 << (cluster_bits + 3 - refcount_order_effective)
        doc: Refcounts per refcount block.

  header_extension_area:
    doc: |
      The header extensions, each 8-aligned, ended by an end-of-extensions record; the bytes
      after it (zero padding, and the backing file name when it lies in the same area) are
      kept as they are.
    seq:
      - id: extensions
        type: header_extension
        repeat: until
        repeat-until: _.ext_type == header_extension_type::end or _io.eof
      - id: rest
        size-eos: true
        doc: Everything after the end-of-extensions record.

  header_extension:
    doc: One header extension; unknown types are kept as bytes and preserved on rewrite.
    seq:
      - id: ext_type
        -orig-id: magic
        type: u4
        enum: header_extension_type
        doc: What the extension holds; 0 ends the list.
      - id: len_data
        -orig-id: len
        type: u4
        doc: Length of the data, without the padding to 8.
      - id: data
        size: len_data
        type:
          switch-on: ext_type
          cases:
            'header_extension_type::backing_file_format': ext_backing_file_format
            'header_extension_type::feature_name_table': ext_feature_name_table
            'header_extension_type::bitmaps': ext_bitmaps
            'header_extension_type::full_disk_encryption': ext_full_disk_encryption
            'header_extension_type::external_data_file': ext_external_data_file
        doc: The extension's data; bytes for an unknown type.
      - id: padding
        size: (8 - len_data % 8) % 8
        doc: Zero padding to a multiple of 8.

  ext_backing_file_format:
    doc: Format of the backing file ("raw", "qcow2", ...); qemu allows at most 15 bytes.
    seq:
      - id: name
        size-eos: true
        doc: The format name, ASCII, not NUL-terminated.

  ext_external_data_file:
    doc: Name of the external data file holding the guest data (incompatible bit 2).
    seq:
      - id: name
        size-eos: true
        doc: The file name, not NUL-terminated.

  ext_feature_name_table:
    doc: Names of feature bits, for error messages.
    seq:
      - id: entries
        type: feature_name_entry
        repeat: eos

  feature_name_entry:
    doc: One named feature bit.
    seq:
      - id: feature_type
        -orig-id: type
        type: u1
        enum: feature_type
        doc: Which of the three feature masks the bit belongs to.
      - id: bit
        -orig-id: bit number
        type: u1
        valid:
          max: 63
        doc: Bit number within that mask.
      - id: name
        -orig-id: feature name
        size: 46
        doc: The name, zero padded, not necessarily NUL-terminated.

  ext_bitmaps:
    doc: Where the persistent bitmap directory lies; valid only while autoclear bit 0 is set.
    seq:
      - id: num_bitmaps
        -orig-id: nb_bitmaps
        type: u4
        valid:
          min: 1
          max: 65535
        doc: Number of bitmaps in the directory.
      - id: reserved
        -orig-id: reserved32
        type: u4
        valid: 0
        doc: Must be zero.
      - id: len_bitmap_directory
        -orig-id: bitmap_directory_size
        type: u8
        valid:
          max: 67107840
        doc: Size of the bitmap directory in bytes.
      - id: ofs_bitmap_directory
        -orig-id: bitmap_directory_offset
        type: u8
        doc: Offset of the bitmap directory; cluster-aligned.
    instances:
      bitmap_directory:
        io: _root._io
        pos: ofs_bitmap_directory
        size: len_bitmap_directory
        type: bitmap_directory

  ext_full_disk_encryption:
    doc: Where the LUKS header lies (crypt_method 2 only).
    seq:
      - id: ofs_encryption_header
        -orig-id: offset
        type: u8
        doc: Offset of the LUKS header; cluster-aligned.
      - id: len_encryption_header
        -orig-id: length
        type: u8
        doc: Bytes of the LUKS header and its key material.
    instances:
      encryption_header:
        io: _root._io
        pos: ofs_encryption_header
        type: luks_header

  l1_entry:
    doc: One active or snapshot L1 entry, pointing at an L2 table.
    seq:
      - id: copied
        -orig-id: QCOW_OFLAG_COPIED
        type: b1
        doc: The L2 table's refcount is exactly 1 (meaningful in the active L1 only).
      - id: reserved_high
        type: b7
        doc: Reserved, must be zero.
      - id: ofs_l2_table_div512
        -orig-id: L1E_OFFSET_MASK
        type: b47
        doc: Bits 9..55 of the L2 table offset; 0 means the whole range is unallocated.
      - id: reserved_low
        type: b9
        doc: Reserved, must be zero (the L2 offset is cluster-aligned).
    instances:
      ofs_l2_table:
        value: ofs_l2_table_div512 << 9
        doc: Offset of the L2 table.

  l2_entry:
    doc: |
      One standard L2 entry. For a compressed cluster (compressed set) bits 0..61 are a
      compressed_descriptor instead of the fields below bit 62.
    seq:
      - id: copied
        -orig-id: QCOW_OFLAG_COPIED
        type: b1
        doc: The cluster's refcount is exactly 1; never set on compressed clusters.
      - id: compressed
        -orig-id: QCOW_OFLAG_COMPRESSED
        type: b1
        doc: The cluster is compressed; bits 0..61 are a compressed_descriptor.
      - id: reserved_high
        type: b6
        doc: Reserved, must be zero.
      - id: ofs_cluster_div512
        -orig-id: L2E_OFFSET_MASK
        type: b47
        doc: Bits 9..55 of the host cluster offset; 0 means unallocated.
      - id: reserved_low
        type: b8
        doc: Reserved, must be zero.
      - id: zero
        -orig-id: QCOW_OFLAG_ZERO
        type: b1
        doc: The cluster reads as zeros (version 3; unused with extended L2).
    instances:
      ofs_cluster:
        value: ofs_cluster_div512 << 9
        doc: Host offset of the cluster.

  subcluster_bitmap:
    doc: The second word of an extended L2 entry; subcluster x is bit x and bit 32+x.
    seq:
      - id: reads_as_zero
        type: b32
        doc: Bit x set means subcluster x reads as zeros.
      - id: allocated
        type: b32
        doc: Bit x set means subcluster x is allocated in this image.

  l2_entry_extended:
    doc: One extended L2 entry (incompatible bit 4), 128 bits.
    seq:
      - id: entry
        type: l2_entry
        doc: The standard entry; its zero flag is unused.
      - id: subclusters
        type: subcluster_bitmap
        doc: Allocation and zero state of the 32 subclusters.

  l2_table:
    doc: One L2 table, one cluster long.
    params:
      - id: cluster_bits
        type: u1
        doc: The image's cluster_bits.
      - id: extended
        type: bool
        doc: True when the image has extended L2 entries.
    seq:
      - id: entries
        type: l2_entry
        repeat: expr
        repeat-expr: (1 << cluster_bits) / 8
        if: not extended
        doc: The standard entries.
      - id: entries_extended
        type: l2_entry_extended
        repeat: expr
        repeat-expr: (1 << cluster_bits) / 16
        if: extended
        doc: The extended entries.

  compressed_descriptor:
    doc: |
      The descriptor of a compressed cluster, bits 0..61 of its L2 entry: a host byte
      offset in the low 70 - cluster_bits bits, then the number of 512-byte sectors the
      compressed data spans beyond the first.
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
        value: 70 - cluster_bits
        doc: Width of the host offset field.
      ofs_compressed:
        value: raw & ((1 << num_offset_bits) - 1)
        doc: Host byte offset of the compressed data; usually not aligned.
      num_additional_sectors:
        value: (raw >> num_offset_bits) & ((1 << (cluster_bits - 8)) - 1)
        doc: 512-byte sectors spanned beyond the one holding the offset.
      len_compressed_max:
        value: (num_additional_sectors + 1) * 512 - ofs_compressed % 512
        doc: Bytes to read from ofs_compressed; decompression stops after one cluster.

  refcount_table_entry:
    doc: One refcount table entry, pointing at a refcount block.
    seq:
      - id: ofs_refcount_block_div512
        -orig-id: REFT_OFFSET_MASK
        type: b55
        doc: Bits 9..63 of the refcount block offset; 0 means not allocated.
      - id: reserved
        type: b9
        doc: Reserved, must be zero.
    instances:
      ofs_refcount_block:
        value: ofs_refcount_block_div512 << 9
        doc: Offset of the refcount block.

  refcount_block:
    doc: |
      One refcount block, one cluster of refcounts of 1 << refcount_order bits. Widths below
      8 bits are packed from the least significant bit of each byte; wider ones are big-endian.
    params:
      - id: cluster_bits
        type: u1
        doc: The image's cluster_bits.
      - id: refcount_order
        type: u1
        doc: The image's refcount_order.
    seq:
      - id: refcounts_1
        type: b1le
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 0
      - id: refcounts_2
        type: b2le
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 1
      - id: refcounts_4
        type: b4le
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 2
      - id: refcounts_8
        type: u1
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 3
      - id: refcounts_16
        type: u2
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 4
      - id: refcounts_32
        type: u4
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 5
      - id: refcounts_64
        type: u8
        repeat: expr
        repeat-expr: num_entries
        if: refcount_order == 6
    instances:
      num_entries:
        value: 1 << (cluster_bits + 3 - refcount_order)
        doc: Refcounts in one block.

  snapshot_entry:
    doc: One internal snapshot; entries are 8-aligned and follow each other.
    seq:
      - id: ofs_l1_table
        -orig-id: l1_table_offset
        type: u8
        doc: Offset of the snapshot's copy of the L1 table; cluster-aligned.
      - id: num_l1_entries
        -orig-id: l1_size
        type: u4
        valid:
          max: 4194304
        doc: Entries in the snapshot's L1 table.
      - id: len_id
        -orig-id: id_str_size
        type: u2
        doc: Length of the unique ID string.
      - id: len_name
        -orig-id: name_size
        type: u2
        doc: Length of the name.
      - id: date_sec
        type: u4
        doc: Creation time, seconds since the epoch.
      - id: date_nsec
        type: u4
        doc: Creation time, nanoseconds part.
      - id: vm_clock_nsec
        type: u8
        doc: Guest time when the snapshot was taken, in nanoseconds.
      - id: len_vm_state_32
        -orig-id: vm_state_size
        type: u4
        doc: Size of the saved VM state; 0 for a disk-only snapshot or one over 4 GiB.
      - id: len_extra_data
        -orig-id: extra_data_size
        type: u4
        valid:
          max: 1024
        doc: Bytes of extra data; at least 16 in version 3, qemu writes 24.
      - id: extra_data
        size: len_extra_data
        type: snapshot_extra_data
        doc: Optional fields added after version 2.
      - id: id_str
        size: len_id
        doc: The unique ID, a decimal number in qemu.
      - id: name
        size: len_name
        doc: The snapshot's name.
      - id: padding
        size: (8 - (40 + len_extra_data + len_id + len_name) % 8) % 8
        doc: Zero padding to a multiple of 8.
    instances:
      l1_table:
        io: _root._io
        pos: ofs_l1_table
        type: l1_entry
        repeat: expr
        repeat-expr: num_l1_entries
        doc: The snapshot's L1 table.

  snapshot_extra_data:
    doc: The extra data of a snapshot entry; fields present as its length allows.
    seq:
      - id: len_vm_state
        -orig-id: vm_state_size_large
        type: u8
        if: _parent.len_extra_data >= 8
        doc: Size of the saved VM state, 64 bits.
      - id: len_virtual_disk
        -orig-id: disk_size
        type: u8
        if: _parent.len_extra_data >= 16
        doc: Virtual disk size when the snapshot was taken.
      - id: icount
        type: s8
        if: _parent.len_extra_data >= 24
        doc: Instruction count when the snapshot was taken, -1 for none (qemu-img writes 0).
      - id: unknown
        size-eos: true
        doc: Extra data of later versions, kept on rewrite.

  bitmap_directory:
    doc: The persistent bitmap directory.
    seq:
      - id: entries
        type: bitmap_directory_entry
        repeat: eos

  bitmap_directory_entry:
    doc: One persistent dirty bitmap; entries are 8-aligned and follow each other.
    seq:
      - id: ofs_bitmap_table
        -orig-id: bitmap_table_offset
        type: u8
        doc: Offset of the bitmap table; cluster-aligned.
      - id: num_bitmap_table_entries
        -orig-id: bitmap_table_size
        type: u4
        valid:
          max: 0x800_0000
        doc: Entries in the bitmap table.
      - id: flags
        type: u4
        -flags: bitmap_flag
        doc: in_use, auto and extra_data_compatible.
      - id: bitmap_type
        -orig-id: type
        type: u1
        enum: bitmap_type
        doc: Only dirty tracking bitmaps exist.
      - id: granularity_bits
        type: u1
        valid:
          min: 9
          max: 31
        doc: log2 of the bytes one bit covers.
      - id: len_name
        -orig-id: name_size
        type: u2
        valid:
          max: 1023
        doc: Length of the name.
      - id: len_extra_data
        -orig-id: extra_data_size
        type: u4
        doc: Length of the extra data.
      - id: extra_data
        size: len_extra_data
        doc: Extra data; must never reference clusters.
      - id: name
        size: len_name
        doc: The bitmap's name, unique in the image.
      - id: padding
        size: (8 - (24 + len_extra_data + len_name) % 8) % 8
        doc: Zero padding to a multiple of 8.
    instances:
      bitmap_table:
        io: _root._io
        pos: ofs_bitmap_table
        type: bitmap_table_entry
        repeat: expr
        repeat-expr: num_bitmap_table_entries
        doc: The bitmap table, one entry per cluster of bitmap data.

  bitmap_table_entry:
    doc: One bitmap table entry, pointing at a cluster of bitmap data.
    seq:
      - id: reserved_high
        type: b8
        doc: Reserved, must be zero.
      - id: ofs_data_div512
        type: b47
        doc: Bits 9..55 of the data cluster offset; 0 means all zeros or all ones.
      - id: reserved_low
        type: b8
        doc: Reserved, must be zero.
      - id: all_ones
        type: b1
        doc: With offset 0, the cluster's bits are all ones; must be 0 otherwise.
    instances:
      ofs_data:
        value: ofs_data_div512 << 9
        doc: Offset of the bitmap data cluster.

  luks_header:
    doc: |
      The LUKS1 partition header that starts the encryption header area (crypt_method 2).
      Key material offsets count 512-byte sectors from the start of this header.
    doc-ref: https://gitlab.com/cryptsetup/cryptsetup/-/wikis/LUKS-standard/on-disk-format.pdf
    seq:
      - id: magic
        contents: [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]
        doc: '"LUKS\xba\xbe".'
      - id: version
        type: u2
        valid: 1
        doc: LUKS version 1.
      - id: cipher_name
        -orig-id: cipher-name
        size: 32
        doc: Cipher, e.g. "aes", NUL padded.
      - id: cipher_mode
        -orig-id: cipher-mode
        size: 32
        doc: Mode and IV generator, e.g. "xts-plain64", NUL padded.
      - id: hash_spec
        -orig-id: hash-spec
        size: 32
        doc: Hash of the key derivation, e.g. "sha256", NUL padded.
      - id: ofs_payload_sectors
        -orig-id: payload-offset
        type: u4
        doc: Ignored by qcow2, which places the data itself.
      - id: len_key
        -orig-id: key-bytes
        type: u4
        doc: Bytes of the master key.
      - id: mk_digest
        -orig-id: mk-digest
        size: 20
        doc: PBKDF2 digest of the master key.
      - id: mk_digest_salt
        -orig-id: mk-digest-salt
        size: 32
      - id: mk_digest_iterations
        -orig-id: mk-digest-iter
        type: u4
      - id: uuid
        size: 40
        doc: UUID of the volume, ASCII, NUL padded.
      - id: key_slots
        type: luks_key_slot
        repeat: expr
        repeat-expr: 8
        doc: The eight key slots.

  luks_key_slot:
    doc: One LUKS1 key slot.
    seq:
      - id: active
        type: u4
        enum: luks_key_slot_state
        doc: Whether the slot holds key material.
      - id: iterations
        type: u4
        doc: PBKDF2 iterations of the passphrase.
      - id: salt
        size: 32
        doc: PBKDF2 salt of the passphrase.
      - id: ofs_key_material_sectors
        -orig-id: key-material-offset
        type: u4
        doc: Start of the anti-forensic key material, in sectors from the LUKS header.
      - id: num_stripes
        -orig-id: stripes
        type: u4
        doc: Anti-forensic stripes; the material is key-bytes * stripes long.

enums:
  crypt_method:
    0: none
    1:
      id: aes
      doc: AES-128-CBC with the guest sector number as IV; weak, read for liberation.
    2:
      id: luks
      doc: LUKS, header located by the full disk encryption extension.
  compression_type:
    0:
      id: zlib
      doc: Raw deflate with a 12-bit window.
    1: zstd
  incompatible_feature:
    # -label: the name qemu writes for the bit in the feature name table extension
    0:
      id: dirty
      -orig-id: QCOW2_INCOMPAT_DIRTY
      -label: dirty bit
      doc: Refcounts may be stale (lazy refcounts).
    1:
      id: corrupt
      -orig-id: QCOW2_INCOMPAT_CORRUPT
      -label: corrupt bit
      doc: The image is corrupt; no read-write open.
    2:
      id: external_data_file
      -orig-id: QCOW2_INCOMPAT_DATA_FILE
      -label: external data file
      doc: Guest data lives in an external data file.
    3:
      id: compression_type
      -orig-id: QCOW2_INCOMPAT_COMPRESSION
      -label: compression type
      doc: The compression_type field is nonzero.
    4:
      id: extended_l2
      -orig-id: QCOW2_INCOMPAT_EXTL2
      -label: extended L2 entries
      doc: L2 entries are 128 bits with subclusters.
  compatible_feature:
    0:
      id: lazy_refcounts
      -orig-id: QCOW2_COMPAT_LAZY_REFCOUNTS
      -label: lazy refcounts
      doc: Refcount updates may be deferred, with the dirty bit set.
  autoclear_feature:
    0:
      id: bitmaps
      -orig-id: QCOW2_AUTOCLEAR_BITMAPS
      -label: bitmaps
      doc: The bitmaps extension is consistent.
    1:
      id: data_file_raw
      -orig-id: QCOW2_AUTOCLEAR_DATA_FILE_RAW
      -label: raw external data
      doc: The external data file is a valid raw image by itself.
  header_extension_type:
    0x00000000: end
    0xe2792aca:
      id: backing_file_format
      -orig-id: QCOW2_EXT_MAGIC_BACKING_FORMAT
    0x6803f857:
      id: feature_name_table
      -orig-id: QCOW2_EXT_MAGIC_FEATURE_TABLE
    0x23852875:
      id: bitmaps
      -orig-id: QCOW2_EXT_MAGIC_BITMAPS
    0x0537be77:
      id: full_disk_encryption
      -orig-id: QCOW2_EXT_MAGIC_CRYPTO_HEADER
    0x44415441:
      id: external_data_file
      -orig-id: QCOW2_EXT_MAGIC_DATA_FILE
  feature_type:
    0: incompatible
    1: compatible
    2: autoclear
  bitmap_flag:
    0:
      id: in_use
      -orig-id: BME_FLAG_IN_USE
      doc: The bitmap is being modified; inconsistent in an offline image.
    1:
      id: auto
      -orig-id: BME_FLAG_AUTO
      doc: The bitmap tracks writes automatically.
    2:
      id: extra_data_compatible
      -orig-id: BME_FLAG_EXTRA_DATA_COMPATIBLE
      doc: Unknown extra data may be ignored.
  bitmap_type:
    1: dirty_tracking
  luks_key_slot_state:
    0x0000dead: disabled
    0x00ac71f3: active
