"""A real fsspec filesystem that can silently damage what it stores.

`bitrot://` is fsspec's in-memory filesystem with one fault added: while
`BitRotFileSystem.rot` is on, the first byte of every data file (`*.bin`)
written is stored with one bit flipped, the way a faulty disk, controller or
network path corrupts data without reporting an error. It exists to prove
that `save(verify=True)` checks what was stored, not what it meant to store.
"""
from __future__ import annotations

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class _RottingFile(MemoryFile):
    _rotted = False

    def write(self, data):
        if self.fs.rot and not self._rotted and len(data):
            damaged = bytearray(data)
            damaged[0] ^= 0x04
            data = bytes(damaged)
            self._rotted = True
        return super().write(data)


class BitRotFileSystem(MemoryFileSystem):
    protocol = "bitrot"
    store: dict = {}
    pseudo_dirs = [""]
    rot = False

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode and str(path).endswith(".bin") and type(f) is MemoryFile:
            f.__class__ = _RottingFile
        return f

    def clear(self, prefix: str) -> None:
        for key in [k for k in list(self.store) if k.startswith(prefix)]:
            del self.store[key]
        for d in [d for d in list(self.pseudo_dirs) if d.startswith(prefix)]:
            self.pseudo_dirs.remove(d)


fsspec.register_implementation("bitrot", BitRotFileSystem, clobber=True)
