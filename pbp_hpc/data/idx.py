"""Reading and writing IDX files, the format of MNIST and its look-alikes (Fashion-MNIST, EMNIST, ...).

Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 size per
dimension, then the data, big-endian, C order. Any file may be gzip-compressed as a whole.
Every failure a damaged or mistaken file can cause is a DataError naming the file.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Optional

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


# Stated limits: what reading an IDX file may cost, whatever its header claims.
MAX_BYTES = int(os.environ.get("PBP_HPC_IDX_MAX_BYTES", 8 << 30))  # decompressed data; EMNIST is < 1 GiB
# deflate cannot do better than 1032:1, so a gzip file claiming more than this many bytes per
# compressed byte is lying about its size: refused before anything is inflated
MAX_GZIP_RATIO = 1032
_CHUNK = 1 << 20


def _open(path: Path) -> tuple[BinaryIO, int, bool]:
    """(stream of the IDX bytes, size of the file on disk, whether it is gzip)."""
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:  # missing, a directory, unreadable: all the user's to fix
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from e
    try:
        # Sniff the magic rather than trust the name: browsers sometimes decompress a
        # download and keep the .gz name, and some mirrors compress without renaming.
        magic = f.read(2)
        f.seek(0)
    except OSError as e:
        f.close()
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from e
    if magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb"), size, True  # type: ignore[return-value]
    return f, size, False


def _read_exactly(stream: BinaryIO, out: memoryview, path: Path) -> int:
    """Fill out from stream as far as it goes; the number of bytes read."""
    got = 0
    while got < len(out):
        n = stream.readinto(out[got : got + _CHUNK])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _rest(stream: BinaryIO, compressed: bool, disk_size: int) -> int:
    """Bytes after the array. A gzip stream is read to its end (at most what deflate can expand
    disk_size to, a chunk at a time): a member damaged in the middle can inflate to more bytes
    than the header says, and only its check (the CRC, read at the end) tells damage from data
    that follows; a failed check raises here, as a corrupt gzip stream."""
    if not compressed:
        return len(stream.read(1))
    extra, cap = 0, MAX_GZIP_RATIO * disk_size + _CHUNK
    while extra <= cap:
        n = len(stream.read(_CHUNK))
        if not n:
            break
        extra += n
    return extra


def read_idx(path: str | Path, max_bytes: Optional[int] = None) -> np.ndarray:
    """Return the array stored in an IDX file (gzip or not), native-endian, shape as in the header.

    The header is read first and checked against the stated limits (max_bytes, default
    MAX_BYTES, of data; MAX_GZIP_RATIO for a compressed file; the file's size for an
    uncompressed one) before anything else is read; the data is then streamed into an array of
    the claimed size, so memory never exceeds what the header claimed and the limits allow.
    """
    path = Path(path)
    limit = MAX_BYTES if max_bytes is None else max_bytes
    stream, disk_size, compressed = _open(path)
    try:
        with stream:
            return _read_stream(stream, path, disk_size, compressed, limit)
    except (OSError, EOFError, zlib.error) as e:  # bad gzip header, truncated stream, bad CRC
        if isinstance(e, OSError) and not compressed:
            raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from e
        raise DataError(f"{path}: corrupt gzip stream ({e}); download the file again") from e


def _read_stream(stream: BinaryIO, path: Path, disk_size: int, compressed: bool, limit: int) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4 or head[:2] != b"\0\0":
        raise DataError(f"{path} is not an IDX file: it starts with {head[:4].hex(' ') or 'nothing'}, expected 00 00 <type> <dims>")
    code, ndim = head[2], head[3]
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (known: 08, 09, 0B, 0C, 0D, 0E)")
    if not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{path}: header says {ndim} dimensions, expected 1 to {MAX_DIMS}")
    dims = stream.read(4 * ndim)
    header = 4 + 4 * ndim
    if len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated: {4 + len(dims)} bytes, too short for a {ndim}-D header")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4", count=ndim))
    dtype = _DTYPES[code]
    # Python ints: a hostile header (4 x 2^32) must not overflow into a plausible size.
    payload = dtype.itemsize * int(np.prod(shape, dtype=object))
    expected = header + payload
    if not compressed and disk_size != expected:
        problem = "truncated" if disk_size < expected else "followed by trailing bytes"
        raise DataError(f"{path} is {problem}: shape {shape} of {dtype.name} needs {expected} bytes, found {disk_size}")
    if payload > limit:
        raise DataError(f"{path}: header claims shape {shape} of {dtype.name}, {payload} bytes of data, more than the "
                        f"limit of {limit} bytes (PBP_HPC_IDX_MAX_BYTES)")
    if compressed and expected > MAX_GZIP_RATIO * disk_size + 1024:
        raise DataError(f"{path} is truncated: shape {shape} of {dtype.name} needs {expected} bytes, more than "
                        f"{disk_size} compressed bytes can hold")
    out = np.empty(payload, dtype=np.uint8)  # pages are touched only as data arrives
    got = _read_exactly(stream, memoryview(out), path)
    if got < payload:
        raise DataError(f"{path} is truncated: shape {shape} of {dtype.name} needs {expected} bytes, found {header + got}")
    if _rest(stream, compressed, disk_size):
        raise DataError(f"{path} is followed by trailing bytes: shape {shape} of {dtype.name} needs {expected} bytes, found more")
    try:
        array = out.view(dtype).reshape(shape)
    except ValueError as e:  # an empty array whose other dimensions overflow numpy's index type
        raise DataError(f"{path}: shape {shape} cannot be held by an array ({e})") from None
    # astype copies: the result is writable, native-endian and owns its memory.
    return array.astype(dtype.newbyteorder("="))


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
