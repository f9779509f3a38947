"""Copy a committed checkpoint from one store to another, verified at the destination.

The data files are streamed in chunks (memory stays at one chunk, whatever the
checkpoint's size), checked against the commit record's CRC-32C on the way in,
checked again as stored at the destination, and only then committed there with
the destination's own strategy. A single-file checkpoint (torch.save,
safetensors) is converted: loaded safely and saved in ckptstore's format.
"""

from __future__ import annotations

import crc32c

from . import commit
from .errors import CheckpointExistsError, CorruptCheckpointError
from .format.manifest import FileName, Manifest, commit_name, crc_hex, data_name, new_generation
from .reader import open_commit
from .stores.base import CHUNK, Store
from .writer import check_stored, discard, retire_older


def copy_checkpoint(src: Store, dst: Store, *, overwrite: bool = True, progress: bool = False) -> Manifest:
    """Copy the checkpoint committed at ``src`` to ``dst``; returns the manifest committed there."""
    m, _ = open_commit(src)
    if dst.is_file():
        raise CheckpointExistsError(f"{dst.uri} is a file, not a checkpoint directory", dst.uri)
    listing = dst.list() or {}
    from .api import _has_commit
    if not overwrite and listing and _has_commit(dst, listing):
        raise CheckpointExistsError(f"{dst.uri}: a checkpoint is already committed here", dst.uri)
    dst.makedirs()
    gen = new_generation([f.gen for f in map(FileName.parse, listing) if f is not None])
    files = [dict(f, name=data_name(gen, k)) for k, f in enumerate(m.files)]
    written: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=m.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"copying to {dst.uri}", leave=False)
    try:
        buf = memoryview(bytearray(min(CHUNK, max(1, max((f["nbytes"] for f in m.files), default=1)))))
        for old, new in zip(m.files, files):
            written.append(new["name"])
            _copy_file(src, old, dst, new["name"], buf, bar)
        check_stored(dst, files, [None] * len(files))
        copied = Manifest(generation=gen, files=files, blobs=m.blobs, nodes=m.nodes, meta=m.meta,
                          writer=m.writer, created=m.created)
        record = commit_name(gen)
        written.append(record)
        commit.choose(dst, dst.location.commit).publish(dst, record, copied.to_bytes())
    except BaseException:
        discard(dst, written)
        raise
    finally:
        if bar is not None:
            bar.close()
    retire_older(dst, gen, listing)
    return copied


def _copy_file(src: Store, entry: dict, dst: Store, name: str, buf: memoryview, bar) -> None:
    size, crc, pos = int(entry["nbytes"]), 0, 0
    w = dst.open_writer(name)
    try:
        with src.open_reader(entry["name"]) as r:
            while pos < size:
                n = r.readinto(pos, buf[: min(len(buf), size - pos)])
                if n <= 0:
                    raise CorruptCheckpointError(f"{src.uri}/{entry['name']}: file ends early (truncated)",
                                                 src.uri)
                crc = crc32c.crc32c(buf[:n], crc)
                w.write(buf[:n])
                pos += n
                if bar is not None:
                    bar.update(n)
        if crc_hex(crc) != entry["crc32c"]:
            raise CorruptCheckpointError(
                f"{src.uri}/{entry['name']}: CRC-32C {crc_hex(crc)}, the commit record says {entry['crc32c']}; "
                "the source is corrupt and nothing was copied", src.uri)
        w.close()
    except BaseException:
        w.abort()
        raise
