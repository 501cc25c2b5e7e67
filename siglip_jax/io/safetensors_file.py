"""Reading and writing `.safetensors` files with numpy alone, bfloat16 included.

The safetensors package's numpy backend refuses bfloat16 (numpy has no such dtype), and released SigLIP
checkpoints are often stored in it, so we read the format directly: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes. bfloat16 comes
from ml_dtypes, which JAX already depends on.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes named arrays to `path` in the safetensors layout (tensors in name order, header 8-byte aligned)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise TypeError(
                f"Tensor {name!r} has dtype {array.dtype}, which safetensors cannot store; valid dtypes: "
                f"{', '.join(str(d) for d in _NAMES)}. Cast it first."
            )
        header[name] = {
            "dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the reference writer aligns the data to 8 bytes
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for array in arrays:
            file.write(array.tobytes())


def load_file(path: str) -> dict[str, np.ndarray]:
    """Reads every tensor of a safetensors file into numpy arrays (bfloat16 as ml_dtypes.bfloat16)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        if header_length > size - 8:
            raise ValueError(
                f"{path!r} is not a safetensors file: its header claims {header_length} bytes but the file has "
                f"{size}. It may be truncated, or a Git LFS pointer rather than the weights (run `git lfs pull`)."
            )
        header = json.loads(file.read(header_length))
        data = file.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(
                f"Tensor {name!r} in {path!r} has safetensors dtype {entry['dtype']!r}; supported: "
                f"{', '.join(_DTYPES)}."
            )
        begin, end = entry["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=_DTYPES[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"]).copy()
    return tensors
