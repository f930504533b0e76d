"""Reader for the IDX files of MNIST-like datasets (plain or gzipped), parsed with numpy.

Parsing the files ourselves keeps torchvision's download/verification logic out of the way when the
files are already on disk (e.g. from the Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE_TYPE_CODE = 0x08


def read_idx_ubyte(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (``*-idx3-ubyte`` images or ``*-idx1-ubyte`` labels).

    Gzip is detected from the file's magic bytes, not its name. Returns a ``uint8`` array whose shape
    is the one stored in the header (``[N, H, W]`` for images, ``[N]`` for labels).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number); re-download or re-install it")
    type_code, ndim = raw[2], raw[3]
    if type_code != _UBYTE_TYPE_CODE:
        raise ValueError(f"{path}: IDX type code 0x{type_code:02x} is not unsigned byte (0x08)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(raw) - offset}; "
            "the file is truncated or corrupt, re-download it"
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
