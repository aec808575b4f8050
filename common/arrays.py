"""Flower Arrays to and from tensors with one copy of the values, not three.

A Flower :class:`~flwr.app.Array` (``stype`` ``numpy.ndarray``) holds its values as the
bytes of an ``.npy`` file.  Flower reads one with :func:`numpy.load` on a ``BytesIO`` (a new
array: a copy) and writes one with :func:`numpy.save` into a ``BytesIO`` whose value is
copied out again.  For a ResNet-18 (45 MB) that is ~45-90 MB of short-lived memory and
~15-25 ms per message at a site and per reply at the server.  Here:

- :func:`array_values` is a read-only numpy view of an Array's bytes (the ``.npy`` header
  parsed, its length checked against the header's shape and dtype; no copy);
- :func:`state_dict_view` gives a model's tensors as such views, for ``load_state_dict``
  (which copies them into the model's own parameters);
- :func:`array_of` builds the Array of a numpy array or tensor with the same bytes
  :func:`numpy.save` writes, in one copy.

On the wire a whole model travels as one Array (:func:`pack_record` and
:func:`unpack_record`).  Flower sends every Array of a message as objects of their own, one
request each between the ServerApp, the SuperLink, the SuperNode and the ClientApp: a
ResNet-18 is 122 tensors, ~250 objects per message.  Packed, the same 45 MB are one Array
holding the tensors' ``.npy`` bytes one after another (10 objects of up to 5 MB), with a
config record naming each tensor, its dtype, shape and byte length.  Unpacking is free:
each tensor becomes an Array whose bytes are a read-only slice of the packed ones.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

__all__ = ["LAYOUT", "PACKED", "PACKED_STYPE", "all_finite", "array_of", "array_values",
           "array_view", "model_arrays", "pack_record", "packed_content", "record_of",
           "record_to_fill", "state_dict_view", "unpack_record"]

_NUMPY = "numpy.ndarray"  # flwr's SType.NUMPY
#: the one Array of a packed record (:func:`pack_record`)
PACKED = "npy-sequence"
#: its serialisation: the tensors' ``.npy`` files one after another
PACKED_STYPE = "fedrad.npy-sequence"
#: the config record, next to the packed arrays in a message, that says what they hold
LAYOUT = "arrays-layout"


def _header_bytes(data: Any) -> bytes:
    """The ``.npy`` magic, version and header of ``data`` (a copy of those bytes only)."""
    view = memoryview(data)
    if len(view) < 10:
        raise ValueError("shorter than a .npy header")
    major = view[6]
    if major == 1:
        end = 10 + int.from_bytes(view[8:10], "little")
    else:  # version 2 or 3 (or garbage, which read_magic refuses)
        end = 12 + int.from_bytes(view[8:12], "little")
    return view[:end].tobytes()


def array_values(array: Array) -> np.ndarray:
    """The values of ``array`` as a read-only view of its bytes.

    Raises ``ValueError`` if the bytes are not a C-ordered ``.npy`` of plain numbers whose
    header agrees with the Array's own dtype and shape and whose data have the header's
    length exactly (a truncated or padded payload).
    """
    if array.stype != _NUMPY:
        raise ValueError(f"an Array serialised as {array.stype!r}, not {_NUMPY!r}")
    data = array.data  # bytes, or a read-only buffer (see fedrad.common.ray_transport)
    shape = tuple(array.shape)
    expected = _expected_header(array.dtype, shape)
    if expected is not None and bytes(memoryview(data)[:len(expected)]) == expected:
        # the header numpy writes for the Array's own dtype and shape, byte for byte
        dtype = np.dtype(array.dtype)
        offset = len(expected)
    else:  # any other header: parsed, and checked against the Array's dtype and shape
        dtype, offset = _parsed_header(array, data)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"the Array's payload holds {len(data) - offset} bytes of values, "
                         f"{count * dtype.itemsize} expected")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


@lru_cache(maxsize=4096)
def _expected_header(dtype: str, shape: tuple[int, ...]) -> bytes | None:
    """What :func:`numpy.save` writes before the values of ``dtype`` and ``shape``.

    None for a dtype name numpy does not know or one of Python objects (the full parse
    then says what is wrong).  Comparing bytes skips parsing the header's Python literal
    (~40 us a tensor; a ResNet-18 has 122 of them in every message).
    """
    try:
        parsed = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        return None
    if parsed.hasobject or str(parsed) != dtype:
        return None
    return _npy_header(shape, parsed)


def _parsed_header(array: Array, data: Any) -> tuple[np.dtype, int]:
    """The dtype and values offset of a ``.npy`` payload's header, checked against ``array``."""
    try:
        head = io.BytesIO(_header_bytes(data))
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            raise ValueError(f".npy version {version} is not supported")
    except ValueError as err:
        raise ValueError(f"the Array's bytes are not a .npy payload: {err}") from None
    if fortran or dtype.hasobject:
        raise ValueError("the Array's .npy payload is Fortran-ordered or holds objects")
    if str(dtype) != array.dtype or tuple(shape) != tuple(array.shape):
        raise ValueError(f"the Array says {array.dtype} {tuple(array.shape)}, its payload "
                         f"{dtype} {tuple(shape)}")
    return dtype, head.tell()


def state_dict_view(arrays: ArrayRecord) -> dict[str, Any]:
    """``arrays`` as torch tensors that share the Arrays' bytes (read-only: for loading).

    What :meth:`ArrayRecord.to_torch_state_dict` returns, without copying 45 MB first;
    ``model.load_state_dict`` copies the values into the model's parameters.
    """
    import torch

    with warnings.catch_warnings():  # the views are read-only, and only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(array_values(v)) for k, v in arrays.items()}


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy array or CPU tensor as a numpy array (no copy); refuses Python objects."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    value = np.asarray(value)
    if value.dtype.hasobject:
        raise ValueError("an array of Python objects cannot be sent")
    return value


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header ``numpy.save`` writes for C-ordered values of ``shape``, ``dtype``."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": tuple(shape)})
    return head.getvalue()


def array_of(value: Any) -> Array:
    """The Array of a numpy array or CPU tensor: ``numpy.save``'s bytes, written once."""
    value = _as_numpy(value)
    if not value.flags.c_contiguous:
        value = value.copy(order="C")
    header = _npy_header(value.shape, value.dtype)
    data = b"".join((header, value.reshape(-1).view(np.uint8).data))
    return Array(dtype=str(value.dtype), shape=tuple(int(n) for n in value.shape),
                 stype=_NUMPY, data=data)


def record_of(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of named tensors or numpy arrays, as :func:`array_of` serialises them.

    Every value is copied once, into one buffer that holds the tensors' ``.npy`` bytes one
    after another; each Array is a read-only view of its part (see :func:`array_view`), so
    :func:`pack_record` packs the record without a second copy.
    """
    values = {}
    for k, v in state.items():
        try:
            values[k] = _as_numpy(v)
        except ValueError as err:
            raise ValueError(f"tensor {k}: {err}") from None
    record, slots = record_to_fill(values)
    for k, value in values.items():
        if value.size:
            np.copyto(slots[k], value)
    return record


def record_to_fill(like: Mapping[str, np.ndarray]) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """An ArrayRecord laid out as :func:`record_of` lays out ``like``, and its values to write.

    ``like`` gives each tensor's name, shape and dtype (its values are not read).  Returns
    the record, whose Arrays are read-only views of one new buffer, and for every tensor a
    writable numpy view of its values in that buffer: the caller writes the values there
    (for example a mean cast straight into the model's dtypes), so that making the record
    costs no copy of its own.  The Arrays hold whatever the buffer holds when they are
    read: fill every view before the record is used.
    """
    specs = {k: (tuple(int(n) for n in np.shape(v)), np.dtype(v.dtype))
             for k, v in like.items()}
    headers = {}
    for k, (shape, dtype) in specs.items():
        if dtype.hasobject:
            raise ValueError(f"tensor {k}: an array of Python objects cannot be sent")
        headers[k] = _npy_header(shape, dtype)
    sizes = {k: int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
             for k, (shape, dtype) in specs.items()}
    buffer = np.empty(sum(len(headers[k]) + sizes[k] for k in specs), np.uint8)
    view = memoryview(buffer)
    record = ArrayRecord()  # ArrayRecord(dict) would rebuild each Array from bytes
    slots: dict[str, np.ndarray] = {}
    offset = 0
    for k, (shape, dtype) in specs.items():
        start = offset + len(headers[k])
        end = start + sizes[k]
        buffer[offset:start] = np.frombuffer(headers[k], np.uint8)
        slots[k] = buffer[start:end].view(dtype).reshape(shape)
        record[k] = array_view(str(dtype), shape, view[offset:end])
        offset = end
    return record, slots


def _tiling(record: ArrayRecord) -> memoryview | None:
    """The one buffer ``record``'s Arrays' bytes tile exactly, in order (as :func:`record_of`
    leaves them), else None."""
    owner = None
    expected = 0
    for array in record.values():
        data = array.data
        if not isinstance(data, memoryview) or (owner is not None and data.obj is not owner):
            return None
        if owner is None:
            owner = data.obj
            try:
                whole = np.frombuffer(owner, np.uint8)
            except (TypeError, ValueError):
                return None
            expected = whole.ctypes.data
        if len(data) and np.frombuffer(data, np.uint8).ctypes.data != expected:
            return None
        expected += len(data)
    if owner is None or expected != whole.ctypes.data + whole.nbytes:
        return None
    return memoryview(owner)


def array_view(dtype: str, shape: tuple[int, ...], data: Any, *,
               stype: str = _NUMPY) -> Array:
    """An Array whose ``data`` is the read-only buffer ``data`` itself, not a copy.

    ``Array()`` insists on ``bytes`` (a copy); fedrad reads Arrays through
    :func:`array_values`, which checks the buffer against ``dtype`` and ``shape``, and
    Flower's ``Array.numpy()`` and hashing accept any buffer.
    """
    array = Array.__new__(Array)
    array.__dict__.update(dtype=dtype, shape=tuple(int(n) for n in shape), stype=stype,
                          data=memoryview(data).toreadonly())
    return array


def pack_record(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    """``record`` as one Array (its tensors' ``.npy`` bytes in order) and its layout.

    One copy of the values, none for a record :func:`record_of` made.  The layout lists
    every tensor's name, dtype, shape and byte length; :func:`unpack_record` gives the
    record back.
    """
    if not len(record):
        raise ValueError("an empty array record has nothing to pack")
    names, dtypes, ndims, dims, lengths = [], [], [], [], []
    for name, array in record.items():
        if array.stype != _NUMPY:
            raise ValueError(f"tensor {name} is serialised as {array.stype!r}, not {_NUMPY!r}")
        names.append(str(name))
        dtypes.append(str(array.dtype))
        ndims.append(len(array.shape))
        dims.extend(int(n) for n in array.shape)
        lengths.append(len(array.data))
    tiled = _tiling(record)
    if tiled is not None:  # the Arrays are one buffer already: pack it as it is
        packed = array_view("uint8", (len(tiled),), tiled, stype=PACKED_STYPE)
    else:
        data = b"".join(array.data for array in record.values())
        packed = Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)
    layout = ConfigRecord({"names": names, "dtypes": dtypes, "ndims": ndims, "dims": dims,
                           "lengths": lengths})
    record_out = ArrayRecord()  # ArrayRecord(dict) would rebuild the Array from bytes
    record_out[PACKED] = packed
    return record_out, layout


def _int_list(layout: ConfigRecord, key: str) -> list[int]:
    values = layout.get(key)
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"the layout's {key!r} is not a list of non-negative integers")
    return values


def unpack_record(packed: ArrayRecord, layout: ConfigRecord) -> ArrayRecord:
    """The ArrayRecord :func:`pack_record` packed, each Array a view of the packed bytes.

    Raises ``ValueError`` naming what does not add up: not one packed Array, a layout whose
    lists differ in length, repeated names, lengths that do not cover the packed bytes
    exactly.  Each tensor's own bytes are checked when read (:func:`array_values`).
    """
    if list(packed.keys()) != [PACKED]:
        raise ValueError(f"a packed record holds one Array named {PACKED!r}")
    whole = packed[PACKED]
    if whole.stype != PACKED_STYPE or whole.dtype != "uint8" or len(whole.shape) != 1:
        raise ValueError(f"the packed Array is {whole.stype!r} {whole.dtype} {whole.shape}, "
                         f"not {PACKED_STYPE!r} uint8 of one dimension")
    names = layout.get("names")
    dtypes = layout.get("dtypes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise ValueError("the layout's 'names' is not a list of tensor names")
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        raise ValueError("the layout's 'dtypes' is not a list of dtype names")
    ndims, dims, lengths = (_int_list(layout, k) for k in ("ndims", "dims", "lengths"))
    if not len(names) == len(dtypes) == len(ndims) == len(lengths):
        raise ValueError(f"the layout lists {len(names)} names, {len(dtypes)} dtypes, "
                         f"{len(ndims)} shapes and {len(lengths)} lengths")
    if len(set(names)) != len(names):
        raise ValueError("the layout names a tensor twice")
    if sum(ndims) != len(dims):
        raise ValueError(f"the layout's shapes need {sum(ndims)} dimensions, it has {len(dims)}")
    view = memoryview(whole.data)
    if sum(lengths) != len(view) or int(whole.shape[0]) != len(view):
        raise ValueError(f"the layout covers {sum(lengths)} bytes, the packed Array holds "
                         f"{len(view)} (its shape says {int(whole.shape[0])})")
    record = ArrayRecord()  # ArrayRecord(dict) would rebuild each Array from bytes
    offset = at = 0
    for name, dtype, ndim, length in zip(names, dtypes, ndims, lengths, strict=True):
        record[name] = array_view(dtype, tuple(dims[at:at + ndim]), view[offset:offset + length])
        offset, at = offset + length, at + ndim
    return record


def packed_content(record: ArrayRecord, key: str = "arrays") -> dict[str, Any]:
    """The records a message carries for ``record`` packed: ``{key: ..., LAYOUT: ...}``."""
    packed, layout = pack_record(record)
    return {key: packed, LAYOUT: layout}


def model_arrays(content: RecordDict, key: str = "arrays") -> ArrayRecord:
    """The model a message carries under ``key``, packed (:data:`LAYOUT` present) or not.

    Raises ``KeyError`` if there is none and ``ValueError`` if the packed form does not add
    up (see :func:`unpack_record`).
    """
    record = content.array_records[key]
    layout = content.config_records.get(LAYOUT)
    if layout is None:
        return record
    return unpack_record(record, layout)


def all_finite(value: np.ndarray) -> bool:
    """True if no value is NaN or infinite.

    Float32/64 tensors are first screened by ``x . x`` (one BLAS pass, no temporary; a NaN
    or infinity makes it NaN or infinite, since the squares never cancel), which on a
    ResNet-18 reply takes about half of ``isfinite(x).all()``; only a tensor whose dot
    is not finite (a NaN, an infinity, or values so big that their squares overflow) is
    checked value by value.
    """
    if value.dtype in (np.float32, np.float64) and value.size:
        flat = value.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(value).all())
