"""Copy a committed checkpoint from one store to another, verified at the destination.

The data files are streamed in chunks through the source's range reader
(memory stays at three 8 MiB chunks, whatever the checkpoint's size), checked
against the commit record's CRC-32C on the way in, checked again as stored
at the destination, and only then committed there, through the same
generation transaction as a save (the ``overwrite=False`` claim and the
space check included). A single-file checkpoint (torch.save, safetensors)
is converted by the CLI: loaded safely and saved in ckptstore's format.
"""

from __future__ import annotations

import dataclasses

import crc32c

from .datafiles import check_stored
from .errors import CorruptCheckpointError
from .format.manifest import INCREMENTAL_MAJOR, FileEntry, Manifest
from .ranges import READ_BACK, Range, StreamReader
from .reader import load_manifest, open_commit
from .stores.base import Store
from .writer import Generation, progress_bar, write_checkpoint


def copy_checkpoint(src: Store, dst: Store, *, overwrite: bool = True, progress: bool = False) -> Manifest:
    """Copy the checkpoint committed at ``src`` to ``dst``; returns the manifest committed there."""
    m, _ = open_commit(src)
    if m.version[0] >= INCREMENTAL_MAJOR:
        return _copy_incremental(src, dst, m, overwrite=overwrite, progress=progress)
    with Generation.begin(dst, overwrite=overwrite, nbytes=m.nbytes) as gen, \
            progress_bar(progress, m.nbytes, f"copying to {dst.uri}") as bar:
        files = [dataclasses.replace(f, name=gen.data_name(k)) for k, f in enumerate(m.files)]
        with StreamReader(src, m.files) as reader:
            for k, new in enumerate(files):
                gen.written.append(new.name)
                _copy_file(reader, k, dst, new.name, bar)
        check_stored(dst, files, [None] * len(files))
        copied = m.replace(generation=gen.id, files=files)
        gen.commit(copied)
    return copied


def _copy_incremental(src: Store, dst: Store, m: Manifest, *, overwrite: bool, progress: bool) -> Manifest:
    """An incremental step becomes a self-contained version 2 checkpoint (5 when compressed):
    its state is read (every blob checked) and saved whole at ``dst``, with the same meta."""
    devices: dict = {}

    def keep_on_host(storage, location: str):
        # every storage stays in host memory (a copy needs no GPU); the copy records where it was saved
        if location != "cpu":
            devices[storage.data_ptr()] = location
        return storage
    state = load_manifest(src, m, allow_pickle=m.pickled, map_location=keep_on_host)
    write_checkpoint(dst, state, overwrite=overwrite, allow_pickle=m.pickled, progress=progress, meta=m.meta,
                     devices=devices, compression="zstd" if m.blobs.codec else None)
    copied, _ = open_commit(dst)
    return copied


def _copy_file(reader: StreamReader, k: int, dst: Store, name: str, bar) -> None:
    entry: FileEntry = reader.files[k]
    start, size, crc = reader.starts[k], entry.nbytes, 0
    step = min(READ_BACK, max(size, 1))
    w = dst.open_writer(name)
    try:
        for r, data in reader.fetch((Range(start + o, min(step, size - o)) for o in range(0, size, step)),
                                    concurrency=2):
            crc = crc32c.crc32c(data, crc)
            w.write(data)
            if bar is not None:
                bar.update(r.nbytes)
        if crc != entry.crc32c:
            raise CorruptCheckpointError(
                f"{reader.where(k)}: CRC-32C {crc:08x}, the commit record says {entry.crc32c:08x}; "
                "the source is corrupt and nothing was copied", reader.store.uri)
        w.close()
    except BaseException:
        w.abort()
        raise
