meta:
  id: fvd
  title: Fast Virtual Disk, version 1 (FVD)
  application: IBM's FVD driver for QEMU (2011, never merged)
  file-extension: fvd
  license: CC0-1.0
  ks-version: '0.11'
  endian: le
  bit-endian: le
doc: |
  FVD keeps guest data raw-like at its virtual offset (or, in a compact image, in chunks
  found through a lookup table), a bitmap of which blocks of the base image have been
  copied into the image, and a journal of bitmap and table updates. All integers are
  little-endian; booleans are int32 (1 true, 0 false); strings are NUL-padded char arrays.
  Regions are found through the header's offsets, never assumed.
doc-ref:
  - https://wiki.qemu.org/Features/FVD
  - ../shared/formats/fvd.md, sections 2 and 3
seq:
  - id: header
    type: header
instances:
  bitmap:
    pos: header.ofs_bitmap
    size: header.len_bitmap
    if: header.len_bitmap > 0
    doc: |
      One bit per block of the base image's range, least significant bit first: 1 means
      the block's data is in the FVD image, 0 in the base.
  table:
    pos: header.ofs_table
    type: table_entry
    repeat: expr
    repeat-expr: header.num_table_entries
    if: header.compact_image != 0
    doc: The lookup table of a compact image, one entry per virtual chunk.
  journal:
    pos: header.ofs_journal
    size: 512
    type: journal_sector
    repeat: expr
    repeat-expr: header.len_journal / 512
    if: header.len_journal > 0
    doc: The metadata journal, in self-contained 512-byte sectors.
types:
  header:
    -orig-id: FvdHeader
    doc: |
      The packed 4336-byte header at offset 0; the header region is 8192 bytes and the rest
      of it is zero.
    seq:
      - id: magic
        contents: [0xa9, 0xf5, 0x43, 0x51]
        doc: FVD_MAGIC 0x5143F5A9, little-endian.
      - id: version
        type: u4
        valid: 1
        doc: FVD_VERSION 1; any other is not an FVD v1 image.
      - id: all_data_in_fvd_img
        type: s4
        doc: TRUE when there is no base or a whole-image prefetch finished.
      - id: len_virtual_disk
        -orig-id: virtual_disk_size
        type: s8
        valid:
          expr: _ >= 0 and _ % 512 == 0
        doc: Bytes seen by the guest; a multiple of 512.
      - id: len_metadata
        -orig-id: metadata_size
        type: s8
        valid:
          min: 0
        doc: Bytes of metadata; the offset of guest data when there is no data file.
      - id: base_img
        size: 1024
        doc: Path of the base image, NUL-padded; empty for none.
      - id: base_img_fmt
        size: 16
        doc: Format of the base image, NUL-padded; empty means probe.
      - id: len_base_img
        -orig-id: base_img_size
        type: s8
        valid:
          min: 0
        doc: Bytes of the base covered, min(virtual size, base length) rounded up to 512.
      - id: ofs_bitmap
        -orig-id: bitmap_offset
        type: s8
        valid:
          min: 0
        doc: Offset of the bitmap (8192), 0 when there is no base.
      - id: len_bitmap
        -orig-id: bitmap_size
        type: s8
        valid:
          min: 0
        doc: Bytes of bitmap, a 4096 multiple, 0 when there is no base.
      - id: block_size
        type: s4
        valid:
          expr: _ >= 0 and _ % 512 == 0
        doc: Bytes covered by one bitmap bit, a multiple of 512; 0 when there is no base.
      - id: copy_on_read
        type: s4
        doc: Copy-on-read runtime policy (TRUE / FALSE).
      - id: max_outstanding_copy_on_read_data
        type: s8
        doc: Copy-on-read throttle in bytes (default 2,000,000).
      - id: data_file
        size: 1024
        doc: Path of a separate data file, NUL-padded; empty means data in this file.
      - id: data_file_fmt
        size: 16
        doc: Format of the data file, NUL-padded; empty means probe.
      - id: prefetch_start_delay
        type: s4
        doc: Seconds before prefetch starts; -1 disables prefetch.
      - id: ofs_prefetch_profile
        -orig-id: prefetch_profile_offset
        type: s8
        doc: Not implemented (0).
      - id: num_prefetch_profile_entries
        -orig-id: prefetch_profile_entries
        type: s8
        doc: Not implemented (0).
      - id: num_prefetch_slots
        type: s4
        doc: Prefetch buffers (default 2).
      - id: bytes_per_prefetch
        type: s4
        doc: Bytes per prefetch buffer (default 1 MiB rounded up to block_size).
      - id: prefetch_read_throughput_measure_time
        type: s4
        doc: Milliseconds (default 100).
      - id: prefetch_write_throughput_measure_time
        type: s4
        doc: Milliseconds (default 100).
      - id: prefetch_perf_calc_alpha
        type: s4
        doc: EWMA weight in hundredths (default 80).
      - id: prefetch_min_read_throughput
        type: s4
        doc: KB/s (default 5120).
      - id: prefetch_min_write_throughput
        type: s4
        doc: KB/s (default 5120).
      - id: prefetch_max_read_throughput
        type: s4
        doc: KB/s (default 1,000,000,000; not enforced).
      - id: prefetch_max_write_throughput
        type: s4
        doc: KB/s (not enforced).
      - id: prefetch_throttle_time
        type: s4
        doc: Milliseconds (default 30000).
      - id: compact_image
        type: s4
        doc: TRUE when the lookup table is in use.
      - id: ofs_table
        -orig-id: table_offset
        type: s8
        valid:
          min: 0
        doc: Offset of the lookup table, 0 when not compact.
      - id: chunk_size
        type: s8
        valid:
          min: 0
        doc: Bytes per chunk, a 4096 multiple (default 1 MiB); 0 when not compact.
      - id: storage_grow_unit
        type: s8
        doc: Bytes to grow the data storage by (default 100 MiB).
      - id: add_storage_cmd
        size: 2048
        doc: Shell command to grow a block device; never executed by diskspec, kept as is.
      - id: ofs_journal
        -orig-id: journal_offset
        type: s8
        valid:
          min: 0
        doc: Offset of the journal, 0 when there is none.
      - id: len_journal
        -orig-id: journal_size
        type: s8
        valid:
          expr: _ >= 0 and _ % 512 == 0
        doc: Bytes of journal, a 4096 multiple; 0 means no journal.
      - id: clean_shutdown
        type: s4
        doc: TRUE when closed cleanly; FALSE while open read-write (the journal must be replayed).
      - id: need_zero_init
        type: s4
        doc: TRUE when unwritten data storage must read as zeros.
      - id: generate_prefetch_profile
        type: s4
        doc: Not implemented (FALSE).
      - id: unit_of_prefetch_profile_entry_len
        -orig-id: unit_of_PrefetchProfileEntry_len
        type: s4
        doc: Unused (4096).
      - id: profile_directed_prefetch_start_delay
        type: s4
        doc: Unused (-1).
      - id: write_updates_base_img
        size: 16
        doc: Not implemented (empty).
    instances:
      num_table_entries:
        value: >-
          chunk_size > 0 ? (len_virtual_disk + chunk_size - 1) / chunk_size : 0
        doc: Entries in the lookup table, one per virtual chunk.
      num_bitmap_blocks:
        value: >-
          block_size > 0 ? (len_base_img + block_size - 1) / block_size : 0
        doc: Blocks of the base range, one bitmap bit each.

  table_entry:
    doc: One lookup table entry; 0xFFFFFFFF (EMPTY) is an unallocated chunk.
    seq:
      - id: chunk_index
        type: b31
        doc: Physical chunk index; all ones with dirty set means EMPTY.
      - id: dirty
        -orig-id: DIRTY_TABLE
        type: b1
        doc: In-memory "not yet journaled" mark; never set on disk outside EMPTY.

  journal_sector:
    doc: One 512-byte journal sector, records back to back until an EMPTY record or its end.
    seq:
      - id: records
        type: journal_record
        repeat: until
        repeat-until: >-
          _.record_type != journal_record_type::bitmap and
          _.record_type != journal_record_type::table or _io.eof
      - id: rest
        size-eos: true
        doc: Unused bytes after the last record.

  journal_record:
    doc: One journal record; any type other than bitmap and table ends the sector.
    seq:
      - id: record_type
        -orig-id: type
        type: u4
        enum: journal_record_type
      - id: body
        type:
          switch-on: record_type
          cases:
            'journal_record_type::bitmap': bitmap_record
            'journal_record_type::table': table_record

  bitmap_record:
    -orig-id: BITMAP_JRECORD
    doc: Blocks overlapping the sector range are now in the FVD image.
    seq:
      - id: num_sectors
        -orig-id: nb_sectors
        type: u4
        doc: Number of 512-byte virtual sectors.
      - id: first_sector
        type: s8
        doc: First 512-byte virtual sector; may be only 4-aligned in the sector.

  table_record:
    -orig-id: TABLE_JRECORD
    doc: New values of consecutive lookup table entries.
    seq:
      - id: first_chunk
        type: u4
        doc: Index of the first entry.
      - id: num_entries
        type: u4
        doc: Number of entries.
      - id: entries
        type: table_entry
        repeat: expr
        repeat-expr: num_entries
        doc: The entries; the dirty bit may be set and is masked off on replay.

enums:
  journal_record_type:
    0:
      id: empty
      -orig-id: EMPTY_JRECORD
      doc: Ends the records of a sector.
    0x3f2ab8ed:
      id: bitmap
      -orig-id: BITMAP_JRECORD
    0xb4e6f7ac:
      id: table
      -orig-id: TABLE_JRECORD
  version:
    1:
      id: v1
      -orig-id: FVD_VERSION
      doc: The only version; the header's version field must hold it.
  table_entry_value:
    0xffffffff:
      id: empty
      -orig-id: EMPTY_TABLE
      doc: A lookup table entry of an unallocated chunk (reads as zeros).
  layout_unit:
    512:
      id: sector
      doc: Bytes of a sector; sizes, block sizes and journal records are counted in sectors.
    4096:
      id: region_align
      doc: Every region starts on, and is sized in, multiples of this.
    8192:
      id: header_region
      doc: Bytes of the header region at offset 0 (the 4336-byte header, rounded up to 4096).
