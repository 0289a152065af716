"""Read a `torch.save` file without torch: the zip archive and a pickle that may build nothing but tensors.

The service serves through ONNX Runtime and need not install torch, yet it reads the same
`checkpoint.pth` as training: its classes, preprocessing, stored figures and the weights whose
hash ties the ONNX files to it. `torch.save` writes a zip whose `data.pkl` names each tensor's
storage by key (the bytes are the archive's `data/<key>` entry, little-endian) and rebuilds it
with `torch._utils._rebuild_tensor_v2`. This reader allows those globals and plain containers
only (the same set `torch.load(weights_only=True)` allows for such a file) and gives every
tensor as a read-only numpy array. Anything else in the pickle is refused, not executed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# torch's storage classes → the numpy dtype of their bytes and the dtype's name in torch, which
# the weights hash (`models.checkpoint.weights_sha256`) spells as torch prints it.
STORAGE_DTYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "FloatStorage": (np.dtype("<f4"), "torch.float32"),
    "DoubleStorage": (np.dtype("<f8"), "torch.float64"),
    "HalfStorage": (np.dtype("<f2"), "torch.float16"),
    "LongStorage": (np.dtype("<i8"), "torch.int64"),
    "IntStorage": (np.dtype("<i4"), "torch.int32"),
    "ShortStorage": (np.dtype("<i2"), "torch.int16"),
    "CharStorage": (np.dtype("i1"), "torch.int8"),
    "ByteStorage": (np.dtype("u1"), "torch.uint8"),
    "BoolStorage": (np.dtype("?"), "torch.bool"),
}
TORCH_DTYPE_NAMES = {dtype: name for dtype, name in STORAGE_DTYPES.values()}


class WeightsFileError(ValueError):
    """The file is not a torch zip archive of plain data and tensors; the message says why in one line."""


class _StorageType:
    """Stands for `torch.FloatStorage` and its kind inside the pickle."""

    def __init__(self, name: str) -> None:
        self.dtype, self.torch_name = STORAGE_DTYPES[name]


def _rebuild_tensor(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_rest: Any
) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2` for numpy: a view of the storage's elements, copied out contiguous."""
    if len(size) != len(stride) or offset < 0:
        raise WeightsFileError(f"a tensor of size {size} has stride {stride} at offset {offset}")
    if any(n == 0 for n in size):
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if any(s < 0 for s in stride) or last >= storage.size:
        raise WeightsFileError(f"a tensor of size {size} and stride {stride} runs past its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False
    )
    array = view.copy()  # C order; unlike ascontiguousarray it keeps a 0-d tensor 0-d
    array.flags.writeable = False
    return array


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsFileError(f"it asks for {module}.{name}, which a weights-only file never holds") from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise WeightsFileError(f"unknown persistent id {str(pid)[:80]}")
        kind, key = pid[1], str(pid[2])
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise WeightsFileError(f"storage {key} is missing from the archive") from None
            if len(raw) % kind.dtype.itemsize:
                raise WeightsFileError(f"storage {key} holds {len(raw)} bytes, not whole {kind.torch_name} values")
            self._storages[key] = np.frombuffer(raw, dtype=kind.dtype)
        return self._storages[key]


def read_weights_file(path: Path) -> Any:
    """The object a `torch.save` zip file holds, its tensors as read-only numpy arrays.

    Raises:
        WeightsFileError: not a zip archive of torch's layout, or a pickle that asks for anything
            but plain containers and tensors; the message is one line.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsFileError(f"not a torch zip archive ({exc})") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsFileError("not a torch zip archive (no single <name>/data.pkl)")
        prefix = pickles[0].removesuffix("data.pkl")
        # Files from torch before 1.13 have no byteorder entry; they were written little-endian too.
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise WeightsFileError("its tensors are stored big-endian, which this reader does not convert")
        try:
            return _Unpickler(archive.read(pickles[0]), archive, prefix).load()
        except WeightsFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, zipfile.BadZipFile) as exc:
            raise WeightsFileError(f"its pickle is damaged ({type(exc).__name__}: {str(exc)[:120]})") from None
