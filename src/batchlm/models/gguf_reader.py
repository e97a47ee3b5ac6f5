"""A GGUF file's metadata and tensor table, read from a read-only memory map.

The `gguf` package's reader builds a numpy view for every value of every metadata array, and a
llama.cpp file carries its whole vocabulary and merge list there: it spent seconds of every start-up
on metadata the loader never reads. Here scalars are decoded while the header is walked, the arrays
only when asked for, and a tensor's data is one view of the map. The `gguf` package still names the
GGML types and their block sizes (imported on first use: a server of another format never loads it)."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types: scalar type -> its little-endian layout.
_SCALARS = {
    code: struct.Struct(fmt)
    for code, fmt in {
        0: "<B",  # uint8
        1: "<b",  # int8
        2: "<H",  # uint16
        3: "<h",  # int16
        4: "<I",  # uint32
        5: "<i",  # int32
        6: "<f",  # float32
        7: "<?",  # bool
        10: "<Q",  # uint64
        11: "<q",  # int64
        12: "<d",  # float64
    }.items()
}
_UINT32, _STRING, _ARRAY, _UINT64 = 4, 8, 9, 10
# The numpy dtype of each scalar type, for arrays of them.
_ARRAY_DTYPES = {code: np.dtype(layout.format) for code, layout in _SCALARS.items()}


def round_float32(value: Any) -> float:
    """A float GGUF stores as float32, as the converter was given it: 1e-05 reads back as
    9.99999974e-06, the shortest decimal of that float32 is 1e-05 again."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table. `shape` is GGML's (the row length first); `data` is numpy's view
    of its bytes, rows first: [rows..., row length] for float types, [rows..., bytes a row] (uint8) for
    block types."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """The file memory-mapped read-only: `metadata(key)` and `tensors`. ValueError naming the file when
    it is not a GGUF file this reader understands (the version, the byte order, a truncated table)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as file:
            try:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as err:  # an empty file cannot be mapped
                raise ValueError(f"{path} is not a readable GGUF file: it is empty") from err
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, KeyError) as err:
            raise ValueError(f"{path} is not a readable GGUF file: {err!r}") from err

    def metadata(self, key: str, default: Any = None) -> Any:
        """A value as Python gives it (int, float, bool, str; arrays as lists), or `default`."""
        value = self._metadata.get(key)
        if value is None:
            return default
        return value() if callable(value) else value

    def _parse(self) -> None:
        buffer = self._map
        if buffer[:4] != MAGIC:
            raise ValueError(f"{self.path} is not a readable GGUF file: no GGUF magic")
        (version,) = struct.unpack_from("<I", buffer, 4)
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.path} is not a readable GGUF file: GGUF version {version} (as little-endian), "
                f"where batchlm reads {', '.join(map(str, SUPPORTED_VERSIONS))} (big-endian files are not read)"
            )
        tensor_count, field_count = struct.unpack_from("<QQ", buffer, 8)
        cursor = _Cursor(buffer, 24)
        self._metadata: dict[str, Any] = {}
        for _ in range(field_count):
            key = cursor.string()
            self._metadata[key] = cursor.value(cursor.uint32())
        entries = [cursor.tensor_entry() for _ in range(tensor_count)]
        alignment = int(self.metadata("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0:
            raise ValueError(f"{self.path} is not a readable GGUF file: general.alignment is {alignment}")
        data_start = -(-cursor.offset // alignment) * alignment
        # Where the tensor data begins: every byte before it is the header (metadata, tensor table).
        self.data_start = data_start
        self.tensors = [self._tensor(data_start, *entry) for entry in entries]

    def _tensor(
        self, data_start: int, name: str, dims: tuple[int, ...], code: int, offset: int
    ) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            tensor_type = GGMLQuantizationType(code)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {name!r} has GGML type {code}, unknown here") from None
        elements = int(np.prod(dims, dtype=np.int64))
        rows = tuple(reversed(dims[1:]))
        dtype = _PLAIN_DTYPES.get(tensor_type.name)
        if dtype is not None:
            count, view_shape = elements, (*rows, dims[0])
        else:  # block types, and BF16 (which numpy lacks): their bytes, a row of them at a time
            block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
            if dims[0] % block_size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has rows of {dims[0]} values, not whole "
                    f"{tensor_type.name} blocks of {block_size}"
                )
            dtype, count = np.dtype(np.uint8), elements // block_size * block_bytes
            view_shape = (*rows, dims[0] // block_size * block_bytes)
        start = data_start + offset
        if start + count * dtype.itemsize > len(self._map):
            raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file")
        data = np.frombuffer(self._map, dtype=dtype, count=count, offset=start).reshape(view_shape)
        return GGUFTensor(name, tensor_type, dims, data)


# GGML types numpy holds as they are (the others are read as bytes).
_PLAIN_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}


def _skip_strings(buffer: mmap.mmap, offset: int, count: int) -> int:
    """The offset just past `count` GGUF strings starting at `offset`."""
    length = _SCALARS[_UINT64]
    for _ in range(count):
        (size,) = length.unpack_from(buffer, offset)
        offset += length.size + size
    if offset > len(buffer):
        raise IndexError("a string array runs past the end of the file")
    return offset


class _Cursor:
    """Reads GGUF's little-endian values from a buffer, advancing an offset."""

    def __init__(self, buffer: mmap.mmap, offset: int) -> None:
        self.buffer = buffer
        self.offset = offset

    def uint32(self) -> int:
        return int(self._scalar(_UINT32))

    def uint64(self) -> int:
        return int(self._scalar(_UINT64))

    def _scalar(self, code: int) -> Any:
        layout = _SCALARS[code]
        (value,) = layout.unpack_from(self.buffer, self.offset)
        self.offset += layout.size
        return value

    def string(self) -> str:
        size = self.uint64()
        start, self.offset = self.offset, self.offset + size
        if self.offset > len(self.buffer):
            raise IndexError("a string runs past the end of the file")
        return self.buffer[start : self.offset].decode("utf-8")

    def value(self, code: int) -> Any:
        """A scalar or string as its Python value; an array as a function that decodes it."""
        if code == _STRING:
            return self.string()
        if code == _ARRAY:
            return self._array()
        return self._scalar(code)

    def _array(self) -> Callable[[], list[Any]]:
        code, count = self.uint32(), self.uint64()
        start = self.offset
        if code in _ARRAY_DTYPES:
            dtype = _ARRAY_DTYPES[code]
            self.offset += count * dtype.itemsize
            if self.offset > len(self.buffer):
                raise IndexError("an array runs past the end of the file")
            buffer = self.buffer
            return lambda: np.frombuffer(buffer, dtype=dtype, count=count, offset=start).tolist()
        # Strings or nested arrays: walked now to find the end (strings by their lengths alone), and
        # decoded when asked for.
        if code == _STRING:
            self.offset = _skip_strings(self.buffer, start, count)
        else:
            for _ in range(count):
                self.value(code)
        end = self.offset

        def decode() -> list[Any]:
            cursor = _Cursor(self.buffer, start)
            values = [cursor.value(code) for _ in range(count)]
            assert cursor.offset == end
            return [value() if callable(value) else value for value in values]

        return decode

    def tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        dims = tuple(self.uint64() for _ in range(self.uint32()))
        return name, dims, self.uint32(), self.uint64()
