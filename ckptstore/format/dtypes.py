"""The tensor dtypes of the format: each name, its torch dtype and its bytes per element.

The table is fixed here, not read from ``dir(torch)``: a reader accepts
exactly the names a writer may write, so a record naming a quantized dtype
(``qint8``, ``quint4x2``), whose bytes mean nothing without scales and zero
points, is refused rather than loaded as a broken tensor. Names a given torch
does not have are absent from the table there; a record naming one of them is
refused with the same error as an unknown name.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CorruptCheckpointError, UnsupportedObjectError

# name -> bytes one element takes in a storage. The sub-byte kinds are "shell"
# dtypes in torch: one element per byte (int1..int7, uint1..uint7), or one
# byte holding a packed pair (float4_e2m1fn_x2) or bit group (bits1x8, ...),
# counted as one element.
ELEMENT_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
    "int1": 1, "int2": 1, "int3": 1, "int4": 1, "int5": 1, "int6": 1, "int7": 1,
    "uint1": 1, "uint2": 1, "uint3": 1, "uint4": 1, "uint5": 1, "uint6": 1, "uint7": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}

BY_NAME: dict[str, torch.dtype] = {}
for _name in ELEMENT_SIZES:
    _dtype = getattr(torch, _name, None)
    if isinstance(_dtype, torch.dtype):
        BY_NAME[_name] = _dtype
NAME_OF: dict[torch.dtype, str] = {d: n for n, d in BY_NAME.items()}


def dtype_name(dtype: torch.dtype, where: str = "state") -> str:
    """The format's name of a dtype a tensor may have; UnsupportedObjectError for any other."""
    name = NAME_OF.get(dtype)
    if name is None:
        raise UnsupportedObjectError(
            f"{where}: a {str(dtype).removeprefix('torch.')} tensor is not supported by the safe format "
            "(quantized dtypes need their scales; dequantize it first, or pass allow_pickle=True)")
    return name


def dtype_from_name(name: Any) -> torch.dtype:
    if type(name) is not str or name not in BY_NAME:
        raise CorruptCheckpointError(
            f"unknown tensor dtype {name!r:.60} in the checkpoint (a newer torch or ckptstore may know it)")
    return BY_NAME[name]
