"""Reading and writing IDX files, the format of MNIST and its look-alikes (Fashion-MNIST, EMNIST, ...).

Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 size per
dimension, then the data, big-endian, C order. Any file may be gzip-compressed as a whole.
Every failure a damaged or mistaken file can cause is a DataError naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from pbp_hpc.errors import DataError

# Type code -> big-endian dtype (the format says big-endian for every multi-byte type).
_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
# The format allows 255 dimensions, but nothing real has more than 4 (EMNIST: 3); a larger
# count in a header almost always means the file is not IDX at all.
MAX_DIMS = 4


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:  # missing, a directory, unreadable: all the user's to fix
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from e
    # Sniff the magic rather than trust the name: browsers sometimes decompress a
    # download and keep the .gz name, and some mirrors compress without renaming.
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # bad header, truncated stream, bad CRC
        raise DataError(f"{path}: corrupt gzip stream ({e}); download the file again") from e


def read_idx(path: str | Path) -> np.ndarray:
    """Return the array stored in an IDX file (gzip or not), native-endian, shape as in the header."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{path} is not an IDX file: it starts with {data[:4].hex(' ') or 'nothing'}, expected 00 00 <type> <dims>")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (known: 08, 09, 0B, 0C, 0D, 0E)")
    if not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{path}: header says {ndim} dimensions, expected 1 to {MAX_DIMS}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, too short for a {ndim}-D header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    # Python ints: a hostile header (4 x 2^32) must not overflow into a plausible size.
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=object))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "followed by trailing bytes"
        raise DataError(f"{path} is {problem}: shape {shape} of {dtype.name} needs {expected} bytes, found {len(data)}")
    # astype copies: the result is writable, native-endian and owns its memory.
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file; gzip-compressed when the name ends in .gz."""
    path, array = Path(path), np.asarray(array)
    codes = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()}
    code = codes.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise DataError(f"cannot write {path}: IDX has no type for {array.dtype} (use uint8, int8, int16, int32, float32 or float64)")
    if not 1 <= array.ndim <= MAX_DIMS or any(d >= 2**32 for d in array.shape):
        raise DataError(f"cannot write {path}: shape {array.shape} does not fit IDX (1 to {MAX_DIMS} dimensions, each < 2^32)")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, _DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime=0: same array, same bytes, same checksum
    try:
        path.write_bytes(payload)
    except OSError as e:
        raise DataError(f"cannot write IDX file {path}: {e.strerror or e}") from e
