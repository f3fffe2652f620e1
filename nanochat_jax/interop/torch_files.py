"""PyTorch `.pt` files read and written with numpy only, never running code from the file.

A `.pt` is a zip: `<archive>/data.pkl` is a pickle whose tensors point (persistent ids) at raw
storages `<archive>/data/<key>`. `torch.load` without `weights_only` runs whatever the pickle
names, so the reader allows exactly the globals a state dict needs (OrderedDict, torch's
tensor-rebuild helper and storage types), each mapped to a function of our own, and refuses any
other with `UnsafeFileError`. The writer emits the same opcodes torch.save does for a dict of
tensors, so `torch.load(..., weights_only=True)` and nanochat's scripts read its files.
"""
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np


class UnsafeFileError(ValueError):
    """A pickle that asks for something other than plain data: refused before anything runs."""


class BadCheckpointFile(ValueError):
    """A file that is truncated, corrupt or not in the expected format."""


STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `allowed`: {(module, name): object}."""

    def __init__(self, data: bytes, allowed: dict, persistent_load=None):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._persistent = persistent_load

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise UnsafeFileError(f"the pickle asks for {module}.{name}, which is not plain data; refusing to load it")
        return self._allowed[(module, name)]

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafeFileError("the pickle refers to external objects (persistent ids); refusing to load it")
        return self._persistent(pid)


def restricted_loads(data: bytes, allowed: dict, persistent_load=None):
    """Unpickle `data` with only `allowed` globals; malformed bytes give BadCheckpointFile."""
    try:
        return RestrictedUnpickler(data, allowed, persistent_load).load()
    except UnsafeFileError:
        raise
    except Exception as err:  # noqa: BLE001 -- truncated or garbled pickles fail in many ways
        raise BadCheckpointFile(f"unreadable pickle ({type(err).__name__}: {err})") from None


class _Storage:
    """A storage type named in the pickle: only its dtype matters."""

    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 as a strided view of the raw storage, copied out."""
    size, stride = tuple(size), tuple(stride)
    if not isinstance(storage, np.ndarray) or offset < 0 or any(s < 0 for s in size + stride) \
            or len(size) != len(stride):
        raise BadCheckpointFile(f"bad tensor record: size {size}, stride {stride}, offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise BadCheckpointFile(f"a tensor of size {size} runs past its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
    return np.array(view)


def read_pt(path):
    """The object saved in a `.pt` file (a dict of tensors, or one tensor) with numpy arrays."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise BadCheckpointFile(f"{path} is not a readable PyTorch zip file ({err}); is it truncated?") from None
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise BadCheckpointFile(f"{path} has no data.pkl: not a PyTorch (zip) checkpoint")
        prefix = pkl[0][: -len("data.pkl")]

        def record(name: str) -> bytes:
            try:
                return archive.read(prefix + name)
            except (KeyError, zipfile.BadZipFile, OSError, EOFError) as err:
                raise BadCheckpointFile(f"{path}: cannot read {prefix + name} ({err}); the file is corrupt "
                                        f"or truncated") from None

        if prefix + "byteorder" in names and record("byteorder") != b"little":
            raise BadCheckpointFile(f"{path} was saved big-endian; only little-endian files are read")

        def storage(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _Storage)):
                raise UnsafeFileError(f"unexpected persistent id {pid!r:.100}; refusing to load it")
            _, kind, key, _, numel = pid
            raw = record(f"data/{key}")
            if len(raw) != numel * kind.dtype.itemsize:
                raise BadCheckpointFile(f"{path}: storage {key} holds {len(raw)} bytes, expected "
                                        f"{numel} x {kind.dtype.itemsize}")
            return np.frombuffer(raw, kind.dtype)

        allowed = {("collections", "OrderedDict"): collections.OrderedDict,
                   ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor}
        allowed.update({("torch", name): _Storage(dtype) for name, dtype in STORAGE_DTYPES.items()})
        return restricted_loads(record("data.pkl"), allowed, storage)


# ---- writing ------------------------------------------------------------------------------------

def _text(s: str) -> bytes:
    data = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def _ints(values) -> bytes:
    return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tensor(key: str, array: np.ndarray) -> bytes:
    """Opcodes for _rebuild_tensor_v2(storage key, 0, shape, contiguous strides, False, OrderedDict())."""
    strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
    storage = (pickle.MARK + _text("storage") + _global("torch", _STORAGE_NAMES[array.dtype]) + _text(key)
               + _text("cpu") + _int(array.size) + pickle.TUPLE + pickle.BINPERSID)
    hooks = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    args = (pickle.MARK + storage + _int(0) + _ints(array.shape) + _ints(strides) + pickle.NEWFALSE + hooks
            + pickle.TUPLE)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def write_pt(path, obj) -> None:
    """Save a dict {name: array} (as an OrderedDict state dict) or one array, as torch.save would."""
    path = Path(path)
    arrays = list(obj.values()) if isinstance(obj, dict) else [obj]
    arrays = [np.ascontiguousarray(a) for a in arrays]
    for a in arrays:
        if a.dtype not in _STORAGE_NAMES:
            raise ValueError(f"no PyTorch storage type for dtype {a.dtype}")
    if isinstance(obj, dict):
        items = b"".join(_text(k) + _tensor(str(i), a) for i, (k, a) in enumerate(zip(obj, arrays)))
        body = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
        body += pickle.MARK + items + pickle.SETITEMS
    else:
        body = _tensor("0", arrays[0])
    archive = path.stem
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", pickle.PROTO + b"\x02" + body + pickle.STOP)
        z.writestr(f"{archive}/byteorder", "little")
        for i, a in enumerate(arrays):
            z.writestr(f"{archive}/data/{i}", a.tobytes())
        z.writestr(f"{archive}/version", "3\n")
    tmp.replace(path)
