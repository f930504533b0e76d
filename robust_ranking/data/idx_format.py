"""Reader for the IDX files of MNIST-like datasets (plain or gzipped), parsed with numpy.

Parsing the files ourselves keeps torchvision's download/verification logic out of the way when the
files are already on disk (e.g. from the Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from robust_ranking.data.errors import DataConfigError

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE_TYPE_CODE = 0x08


def _gunzip_prefix(raw: bytes) -> bytes:
    """What a cut-short gzip stream still decompresses to (empty if even that fails)."""
    try:
        return zlib.decompressobj(wbits=31).decompress(raw)
    except zlib.error:
        return b""


def _idx_size(raw: bytes) -> int | None:
    """Total size (header + data) an IDX file announces in its header, or None if the header is unreadable."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        return None
    offset = 4 + 4 * raw[3]
    if len(raw) < offset:
        return None
    return offset + int(np.prod(np.frombuffer(raw, dtype=">i4", count=raw[3], offset=4), dtype=np.int64))


def read_idx_ubyte(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (``*-idx3-ubyte`` images or ``*-idx1-ubyte`` labels).

    Gzip is detected from the file's magic bytes, not its name. Returns a ``uint8`` array whose shape
    is the one stored in the header (``[N, H, W]`` for images, ``[N]`` for labels).

    Raises:
        DataConfigError: the file is not an IDX file (bad magic number / type code), its gzip stream is
            corrupt or cut short, or it holds fewer (truncated) or more bytes than its header announces.
            The message names the file and what is wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    fix = "re-download or re-install it"
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            partial = _gunzip_prefix(raw)
            expected = _idx_size(partial)
            got = f"expected {expected} bytes of IDX data, got {len(partial)}" if expected else (
                f"got {len(partial)} bytes of IDX data")
            raise DataConfigError(
                f"{path}: truncated gzip file ({got} before the compressed stream ends); {fix}"
            ) from None
        except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            reason = " ".join(str(err).split())
            raise DataConfigError(f"{path}: corrupt gzip file ({reason}); {fix}") from None
    if len(raw) < 4:
        raise DataConfigError(
            f"{path}: truncated IDX file: expected at least a 4-byte header, got {len(raw)} bytes; {fix}"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise DataConfigError(
            f"{path} is not an IDX file (bad magic number 0x{raw[:4].hex()}, expected 0x0000080N); {fix}"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code != _UBYTE_TYPE_CODE:
        raise DataConfigError(
            f"{path}: IDX type code 0x{type_code:02x} is not unsigned byte (0x08); {fix}"
        )
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataConfigError(
            f"{path}: truncated IDX file: expected a {offset}-byte header for {ndim} dimensions, "
            f"got {len(raw)} bytes; {fix}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in shape):
        raise DataConfigError(f"{path}: corrupt IDX header (negative size in shape {shape}); {fix}")
    expected = int(np.prod(shape, dtype=np.int64)) if shape else 0
    got = len(raw) - offset
    if got != expected:
        what = "truncated" if got < expected else "corrupt (trailing data)"
        raise DataConfigError(
            f"{path}: {what} IDX file: expected {expected} data bytes for shape {shape}, got {got}; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx_ubyte(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a ``uint8`` array as an IDX file (gzipped when ``compress`` or the name ends in ``.gz``).

    Used by the tests to fabricate small MNIST-like trees.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE_TYPE_CODE, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload)
