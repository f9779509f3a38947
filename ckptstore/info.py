"""What the calls return: ``CheckpointInfo`` for a committed save, ``VerifyReport`` for a check."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckpointInfo:
    """What a save committed."""

    uri: str            #: where, secrets redacted
    nbytes: int         #: payload bytes written (data files)
    seconds: float      #: wall time of the whole save
    strategy: str       #: "rename" or "marker"
    generation: str = ""  #: id of this save inside the checkpoint directory
    created: float = 0.0  #: commit time, seconds since the epoch
    files: int = 0      #: data files written
    meta: dict = field(default_factory=dict)
    #: bytes the step holds uncompressed (every blob's own size, reused ones included)
    logical_nbytes: int = 0


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    problems: list
    nbytes: int
    uri: str = ""
    deep: bool = False
    generation: str = ""

    def __bool__(self) -> bool:
        return self.ok
