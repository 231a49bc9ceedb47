#!/usr/bin/env python3
"""Recomputes the chunk CRCs of PNG files in place. The png crate skips CRC checks when built
for fuzzing, so a crash input found by `cargo fuzz` must get valid CRCs before it is kept as a
regression (else `cargo test`, with the checks on, stops at the first bad CRC)."""
import struct, sys, zlib

for path in sys.argv[1:]:
    b = bytearray(open(path, "rb").read())
    at = 8
    while at + 8 <= len(b):
        n = struct.unpack(">I", b[at : at + 4])[0]
        end = at + 8 + n
        if end + 4 > len(b):
            break
        b[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(b[at + 4 : end])))
        at = end + 4
    open(path, "wb").write(b)
