"""How Flower's simulation engine moves model weights between its Ray processes.

In a simulation every message (a whole model: 45 MB for ResNet-18) is pickled by Ray on
its way to a site's actor and back.  A Flower :class:`~flwr.app.Array` keeps its values
as one ``bytes`` object, which Ray pickles *in band*: copied into the pickle, copied into
the object store and copied out again.  :func:`use_out_of_band_arrays` registers a Ray
serializer that hands the values to Ray as a numpy buffer instead, which Ray writes to
its object store once (pickle protocol 5, out of band), and the receiver's Array reads them
there (a read-only view, no copy): one copy of every model trip instead of four.  On this
project's 2-core test machine the out-of-band transfer alone (the receiver still copying)
took a 10-site plain round (ResNet-18, 28 px) from 2.44 s to 2.11 s with 90 images per
site, and from 5.61 s to 4.95-5.55 s with ~470.

The ServerApp sends one model to every site of a round: in the driver
(``use_out_of_band_arrays(share_sends=True)``) an Array of :data:`SHARE_BYTES` or more goes
to the object store once, on its first send, and every later send of the same Array object
carries only its reference, which the actor reads the values through (``ray.get``, no
copy).  Ten sites' puts of a ResNet-18 model took 0.28 CPU-seconds per round on the 2-core
machine; one takes 0.03.  The driver owns those objects, and drops each with its Array.

Only the Ray transport of a simulation changes; the arrays arrive bit for bit, and a
deployed SuperLink/SuperNode (no Ray) never calls this.  The registration is per process:
:func:`~fedrad.simulations.engine.run_in_simulation` makes it in the driver (what the
ServerApp sends) and fedrad's ClientApp in each Ray actor (what the sites send back).
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["SHARE_BYTES", "array_from_wire", "array_to_wire", "forget_shared_sends",
           "in_ray_worker", "use_out_of_band_arrays"]

#: Arrays this big or bigger are put in the object store once however often sent (driver)
SHARE_BYTES = 1 << 20

_registered = False
_share_sends = False
_shared: dict[int, tuple[weakref.ref, Any]] = {}  # id(Array) -> (the Array, its ObjectRef)
_shared_lock = threading.Lock()


def _put_once(array, values: np.ndarray) -> Any:
    """The ObjectRef of ``array``'s values, put in Ray's object store on its first send."""
    import ray

    key = id(array)
    with _shared_lock:
        hit = _shared.get(key)
        if hit is not None and hit[0]() is array:
            return hit[1]

        def forget(gone: weakref.ref, key: int = key) -> None:  # the Array was freed
            with _shared_lock:
                if _shared.get(key, (None,))[0] is gone:
                    del _shared[key]

        ref = ray.put(values)
        _shared[key] = (weakref.ref(array, forget), ref)
        return ref


def forget_shared_sends() -> None:
    """Drop every ObjectRef of a shared send (a simulation's Ray session is over or new)."""
    with _shared_lock:
        _shared.clear()


def array_to_wire(array) -> tuple[str, tuple[int, ...], str, Any]:
    """An :class:`~flwr.app.Array` as its header and a zero-copy uint8 view of its values
    (or, for a big Array sent by a driver that shares its sends, their ObjectRef)."""
    values = np.frombuffer(array.data, dtype=np.uint8)
    if _share_sends and values.nbytes >= SHARE_BYTES:
        return (array.dtype, tuple(int(n) for n in array.shape), array.stype,
                _put_once(array, values))
    return (array.dtype, tuple(int(n) for n in array.shape), array.stype, values)


def array_from_wire(wire: tuple[str, tuple[int, ...], str, Any]):
    """The :class:`~flwr.app.Array` of :func:`array_to_wire`'s output, without a copy.

    Its ``data`` is a read-only ``memoryview`` of the values where Ray left them (its
    object store, which keeps them while the Array lives), not a ``bytes`` copy: fedrad
    reads Arrays through :func:`fedrad.common.arrays.array_values`, and Flower's
    ``Array.numpy()`` and hashing accept any buffer.
    """
    from fedrad.common.arrays import array_view

    dtype, shape, stype, values = wire
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(values, ray.ObjectRef):  # a shared send
        values = ray.get(values)
    if not (isinstance(dtype, str) and isinstance(stype, str)
            and isinstance(values, np.ndarray) and values.dtype == np.uint8
            and values.ndim == 1):
        raise TypeError("not an Array sent by fedrad's Ray transport")
    return array_view(dtype, shape, values, stype=stype)


def in_ray_worker() -> bool:
    """True in a process connected to a Ray cluster (a simulation's driver or actor)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def use_out_of_band_arrays(*, share_sends: bool = False) -> None:
    """Make Ray send Flower Arrays' values out of band in this process (idempotent).

    ``share_sends`` (the driver): an Array sent more than once goes to the object store
    once (see the module docstring).
    """
    global _registered, _share_sends
    if share_sends:
        _share_sends = True
    if _registered:
        return
    import ray.util
    from flwr.app import Array

    ray.util.register_serializer(Array, serializer=array_to_wire, deserializer=array_from_wire)
    _registered = True
