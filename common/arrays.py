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
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["array_of", "array_values", "record_of", "state_dict_view"]

_NUMPY = "numpy.ndarray"  # flwr's SType.NUMPY


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
    count = int(np.prod(shape, dtype=np.int64))
    offset = head.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"the Array's payload holds {len(data) - offset} bytes of values, "
                         f"{count * dtype.itemsize} expected")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def state_dict_view(arrays: ArrayRecord) -> dict[str, Any]:
    """``arrays`` as torch tensors that share the Arrays' bytes (read-only: for loading).

    What :meth:`ArrayRecord.to_torch_state_dict` returns, without copying 45 MB first;
    ``model.load_state_dict`` copies the values into the model's parameters.
    """
    import torch

    with warnings.catch_warnings():  # the views are read-only, and only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(array_values(v)) for k, v in arrays.items()}


def array_of(value: Any) -> Array:
    """The Array of a numpy array or CPU tensor: ``numpy.save``'s bytes, written once."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    value = np.asarray(value)
    if not value.flags.c_contiguous:
        value = value.copy(order="C")
    if value.dtype.hasobject:
        raise ValueError("an array of Python objects cannot be sent")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(value))
    data = b"".join((head.getbuffer(), value.reshape(-1).view(np.uint8).data))
    return Array(dtype=str(value.dtype), shape=tuple(int(n) for n in value.shape),
                 stype=_NUMPY, data=data)


def record_of(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of named tensors or numpy arrays (see :func:`array_of`)."""
    return ArrayRecord({k: array_of(v) for k, v in state.items()})
