"""Fixed-point encoding of float vectors into ``uint32`` with wrap-around arithmetic.

Encoding
--------
A float ``x`` is clipped to ``[-clip, clip]``, multiplied by ``factor * 2**scale_bits``
(``factor`` is the client's weight share, 1 for a plain sum), rounded to the nearest
integer and stored as the two's-complement ``int32`` bit pattern viewed as ``uint32``.
Masks and sums are added modulo ``2**32`` (numpy's ``uint32`` wraps), so as long as the
true integer sum lies in ``[-2**31, 2**31)``, viewing the wrapped sum as ``int32`` gives it
back exactly.

Headroom rule
-------------
Let ``B`` bound the absolute value of the (real) sum of the clients' contributions for
every element: ``B = n_clients * clip`` for a plain sum and ``B = clip`` for a weighted
sum where the weight shares add up to at most 1 (see *Weighting*).  Each client's rounding
adds at most 1/2 unit, so the integer sum never overflows when::

    B * 2**scale_bits + n_clients / 2 < 2**31

:func:`check_headroom` enforces it; :func:`max_scale_bits` returns the largest
``scale_bits`` that satisfies it.

Error bound
-----------
The quantisation step is ``2**-scale_bits``; each client's rounding error is at most half a
step, so a decoded plain sum of clipped values is within ``n_clients * 2**-(scale_bits+1)``
of the true sum (per element).  Values beyond ``clip`` are clipped, which is not bounded
here: choose ``clip`` above the largest value you send (:func:`encode` counts the clipped
elements).  For the weighted mean see :func:`weighted_mean_error_bound`.

Weighting
---------
fedrad uses *both* mechanisms the literature offers, so that dropouts need no extra round:
client ``i`` with weight ``w_i`` (its sample count) and the round's public normaliser ``W``
(the sum of the cohort's sample counts, which FedAvg already makes public, or any upper
bound of it) computes its share ``a_i = w_i / W`` and sends ``encode(a_i * x_i)``
**followed by one extra element** ``encode(a_i)``.  The server's unmasked sum then holds
``sum(a_i * x_i)`` and ``sum(a_i)`` over the clients that survived, and the weighted mean is
their ratio: correct whoever dropped, and with headroom ``B = clip`` because
``sum(a_i) <= 1``.  The individual weights stay masked like the update.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import FedradError

__all__ = [
    "ArraySpec",
    "CHUNK_ELEMENTS",
    "check_headroom",
    "decode",
    "decode_weighted_mean",
    "encode",
    "flatten_arrays",
    "max_scale_bits",
    "sum_error_bound",
    "unflatten_arrays",
    "weighted_mean_error_bound",
]

logger = logging.getLogger(__name__)

#: Elements processed per step (64 KiB of uint32): the chunk and its keystream stay in cache.
CHUNK_ELEMENTS = 1 << 14
_INT32_LIMIT = 2**31


def _headroom_bound(n_clients: int, clip: float, weighted: bool) -> float:
    return float(clip) if weighted else float(clip) * n_clients


def check_headroom(n_clients: int, *, clip: float, scale_bits: int, weighted: bool) -> None:
    """Raise ``FedradError("no-headroom")`` unless the sum of ``n_clients`` encodings fits.

    Parameters
    ----------
    n_clients:
        Number of clients whose encodings are summed.
    clip:
        Absolute clipping bound of each encoded value.
    scale_bits:
        Number of fractional bits (the quantisation step is ``2**-scale_bits``).
    weighted:
        True when clients send weight-share-scaled values whose shares sum to at most 1.
    """
    if n_clients < 1 or not (clip > 0) or not np.isfinite(clip) or scale_bits < 0:
        raise FedradError(
            "bad-encoding",
            f"invalid encoding parameters (n_clients={n_clients}, clip={clip}, "
            f"scale_bits={scale_bits}): need n_clients >= 1, 0 < clip < inf, scale_bits >= 0",
        )
    bound = _headroom_bound(n_clients, clip, weighted)
    if bound * 2.0**scale_bits + n_clients / 2 >= _INT32_LIMIT:
        raise FedradError(
            "no-headroom",
            f"a sum of {n_clients} values clipped to {clip} with {scale_bits} fractional bits "
            f"can overflow 32 bits; use scale_bits <= "
            f"{max_scale_bits(n_clients, clip=clip, weighted=weighted)} or a smaller clip",
        )


def max_scale_bits(n_clients: int, *, clip: float, weighted: bool) -> int:
    """Largest ``scale_bits`` for which :func:`check_headroom` passes (may be negative)."""
    bound = _headroom_bound(n_clients, clip, weighted)
    bits = int(np.floor(np.log2((_INT32_LIMIT - n_clients / 2) / bound)))
    while bits >= 0 and bound * 2.0**bits + n_clients / 2 >= _INT32_LIMIT:
        bits -= 1
    return bits


def sum_error_bound(n_clients: int, *, scale_bits: int) -> float:
    """Largest per-element error of a decoded sum of ``n_clients`` clipped encodings."""
    return n_clients * 2.0 ** -(scale_bits + 1)


def weighted_mean_error_bound(
    n_clients: int, *, clip: float, scale_bits: int, weight_sum: float
) -> float:
    """Largest per-element error of :func:`decode_weighted_mean` against the exact mean.

    With ``e = n_clients * 2**-(scale_bits+1)`` the error of both decoded sums and
    ``A = weight_sum`` (the survivors' total share ``sum(a_i)``, at most 1), the mean
    ``S / A`` of values within ``[-clip, clip]`` is off by at most
    ``e * (1 + clip) / (A - e)``.
    """
    e = sum_error_bound(n_clients, scale_bits=scale_bits)
    if weight_sum <= e:
        return float("inf")
    return e * (1.0 + clip) / (weight_sum - e)


def encode_into(
    out: np.ndarray,
    vec: np.ndarray,
    *,
    clip: float,
    scale_bits: int,
    factor: float = 1.0,
    work: np.ndarray | None = None,
) -> int:
    """Encode one chunk ``vec`` into ``out`` (uint32, same length); return the clipped count.

    Raises ``FedradError("non-finite")`` if ``vec`` holds NaN or Inf.
    """
    n = vec.shape[0]
    t = np.empty(n, np.float64) if work is None else work[:n]
    scale = float(factor) * 2.0**scale_bits
    bound = float(clip) * scale
    np.multiply(vec, np.float64(scale), out=t, dtype=np.float64)
    if not np.isfinite(np.add.reduce(t)):
        raise FedradError(
            "non-finite", "the update holds NaN or Inf values; it cannot be aggregated"
        )
    clipped = 0
    if t.min() < -bound or t.max() > bound:
        clipped = int(np.count_nonzero(np.abs(t) > bound))
        np.clip(t, -bound, bound, out=t)
    np.rint(t, out=t)
    np.copyto(out.view(np.int32), t, casting="unsafe")
    return clipped


def encode(vec: np.ndarray, *, clip: float, scale_bits: int, factor: float = 1.0) -> np.ndarray:
    """Encode a flat float vector into ``uint32`` fixed point (see the module docstring).

    Parameters
    ----------
    vec:
        One-dimensional float array (any float dtype).
    clip:
        Values are clipped to ``[-clip, clip]`` before scaling.
    scale_bits:
        Fractional bits; the quantisation step is ``2**-scale_bits``.
    factor:
        Multiplier applied after clipping (a client's weight share, in ``(0, 1]``).

    Returns
    -------
    numpy.ndarray
        ``uint32`` array of the same length.
    """
    vec = _as_flat_float(vec)
    if not (0 < factor <= 1):
        raise FedradError("bad-weight", f"the weight share must be in (0, 1], got {factor}")
    out = np.empty(vec.shape[0], np.uint32)
    work = np.empty(CHUNK_ELEMENTS, np.float64)
    clipped = 0
    for start in range(0, vec.shape[0], CHUNK_ELEMENTS):
        sl = slice(start, start + CHUNK_ELEMENTS)
        clipped += encode_into(
            out[sl], vec[sl], clip=clip, scale_bits=scale_bits, factor=factor, work=work
        )
    if clipped:
        logger.debug("encode: %s of %s values clipped to +-%s", clipped, vec.shape[0], clip)
    return out


def decode(
    total: np.ndarray, *, n_clients: int, clip: float, scale_bits: int, weighted: bool = False
) -> np.ndarray:
    """Decode a wrapped ``uint32`` sum of ``n_clients`` encodings into float64.

    The result is within :func:`sum_error_bound` of the sum of the clipped values.
    Raises ``FedradError("no-headroom")`` if the parameters allow an overflow.
    """
    check_headroom(n_clients, clip=clip, scale_bits=scale_bits, weighted=weighted)
    total = np.asarray(total)
    if total.dtype != np.uint32 or total.ndim != 1:
        raise FedradError(
            "bad-input", f"expected a flat uint32 sum, got {total.dtype} of shape {total.shape}"
        )
    return total.view(np.int32).astype(np.float64) * 2.0**-scale_bits


def decode_weighted_mean(
    total: np.ndarray, *, n_clients: int, clip: float, scale_bits: int
) -> tuple[np.ndarray, float]:
    """Decode a weighted sum whose last element is the sum of weight shares.

    Returns
    -------
    (mean, weight_sum)
        The weighted mean (float64, one element shorter than ``total``) and the decoded
        sum of the survivors' weight shares.
    """
    dec = decode(total, n_clients=n_clients, clip=clip, scale_bits=scale_bits, weighted=True)
    weight_sum = float(dec[-1])
    if weight_sum <= sum_error_bound(n_clients, scale_bits=scale_bits):
        raise FedradError(
            "zero-weight", "the survivors' weights sum to zero: no weighted mean exists"
        )
    return dec[:-1] / weight_sum, weight_sum


def _as_flat_float(vec: np.ndarray) -> np.ndarray:
    arr = np.asarray(vec)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating):
        raise FedradError(
            "bad-input",
            f"expected a flat float vector, got {arr.dtype} of shape {arr.shape}; "
            "flatten a state dict with flatten_arrays()",
        )
    return arr


@dataclass(frozen=True)
class ArraySpec:
    """Names, shapes and dtypes of the arrays packed by :func:`flatten_arrays`."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def size(self) -> int:
        """Total number of elements."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))


def flatten_arrays(
    arrays: Mapping[str, np.ndarray], *, dtype: type = np.float32
) -> tuple[np.ndarray, ArraySpec]:
    """Pack a dict of arrays (a state dict) into one flat float vector, in key order.

    Returns the vector and the :class:`ArraySpec` that :func:`unflatten_arrays` needs.
    Integer and boolean arrays are converted to float (exact below 2**24 for float32).
    """
    names = tuple(arrays.keys())
    parts = [np.asarray(arrays[k]) for k in names]
    spec = ArraySpec(
        names=names,
        shapes=tuple(tuple(int(d) for d in p.shape) for p in parts),
        dtypes=tuple(p.dtype.str for p in parts),
    )
    flat = np.empty(spec.size, dtype)
    offset = 0
    for p in parts:
        flat[offset : offset + p.size] = p.reshape(-1)
        offset += p.size
    return flat, spec


def unflatten_arrays(vec: np.ndarray, spec: ArraySpec) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_arrays`: split ``vec`` and restore shapes and dtypes.

    Integer and boolean arrays are rounded to the nearest integer before the cast.
    """
    vec = np.asarray(vec).reshape(-1)
    if vec.shape[0] != spec.size:
        raise FedradError(
            "bad-length",
            f"the vector has {vec.shape[0]} elements but the spec describes {spec.size}",
        )
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dt in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        part = vec[offset : offset + size]
        dtype = np.dtype(dt)
        if dtype.kind in "iub":
            part = np.rint(part)
        out[name] = part.astype(dtype).reshape(shape)
        offset += size
    return out
