"""CRC-32C of what a store holds.

CRC-32C (Castagnoli) is the checksum of the format: hardware-accelerated on
x86 and ARM through the ``crc32c`` package (>10 GB/s per core, and it releases
the GIL), and the checksum GCS and S3 can report for stored objects, so a
backend's own figure can stand in for reading the data back.
"""

from __future__ import annotations

import crc32c

from .errors import CorruptCheckpointError
from .stores.base import Store

# Small: reading back is sequential and the page cache does the buffering.
READ_BACK = 8 << 20


def stored_crc32c(store: Store, name: str, size: int) -> int:
    """CRC-32C of a stored file, as the backend reports it or by reading it back."""
    reported = store.reported_crc32c(name)
    if reported is not None:
        return reported
    crc, offset = 0, 0
    buf = bytearray(min(READ_BACK, max(size, 1)))
    view = memoryview(buf)
    with store.open_reader(name) as r:
        while offset < size:
            n = r.readinto(offset, view[: min(len(view), size - offset)])
            if n <= 0:
                break
            crc = crc32c.crc32c(view[:n], crc)
            offset += n
        # One byte more must not exist: the file must not be longer than written.
        if r.readinto(offset, memoryview(bytearray(1))) != 0:
            offset += 1
    if offset != size:
        raise CorruptCheckpointError(
            f"{store.uri}/{name}: {offset} bytes stored where {size} were written", store.uri)
    return crc
