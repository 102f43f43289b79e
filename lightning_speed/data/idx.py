"""Reader for IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

The format is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values in C order. Every check here turns a bad file
(empty, truncated, not IDX, bad gzip) into a ``ValueError`` that names the file, what is
wrong and how to fix it, so a broken download fails before training rather than during it.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

# IDX dtype codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FIX = "Re-download the file, or point root at the folder holding intact copies."


def _read_bytes(path: Path) -> bytes:
    """Return the file's (decompressed, for ``.gz``) bytes; bad gzip -> ValueError."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path}: not a readable gzip file ({err}); the download is corrupt or "
                f"incomplete. {_FIX}"
            ) from err
    return path.read_bytes()


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a numpy array (native byte order); ``source`` names it in errors."""
    if len(data) == 0:
        raise ValueError(f"{source}: the file is empty. {_FIX}")
    if len(data) < 4:
        raise ValueError(f"{source}: only {len(data)} bytes, shorter than the 4-byte IDX header. {_FIX}")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise ValueError(
            f"{source}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 + dtype code "
            f"{sorted(hex(c) for c in _IDX_DTYPES)} + ndim): this is not an IDX file, or it is "
            f"still compressed under a name without '.gz'. {_FIX}"
        )
    if ndim == 0:
        raise ValueError(f"{source}: IDX header declares 0 dimensions. {_FIX}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{source}: truncated header ({len(data)} bytes, {ndim} dims need {header_len}). {_FIX}"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: file {what}: header says shape {shape} ({expected} data bytes) but "
            f"{actual} data bytes follow. {_FIX}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or uncompressed) into a numpy array; ValueError if bad."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    return parse_idx(_read_bytes(path), source=str(path))
