"""fedrad's secure aggregation core (SecAgg+ semantics), free of Flower.

* :mod:`.encoding` — fixed-point ``uint32`` encoding, its error bound and headroom rule,
  weighting, and flattening a state dict into one vector.
* :mod:`.shamir` — Shamir secret sharing of 32-byte secrets.
* :mod:`.masks` — X25519 + HKDF seeds and AES-256-CTR mask expansion.
* :mod:`.protocol` — :class:`SecAggClient` and :class:`SecAggServer`, the round's stages.
"""

from __future__ import annotations

from .encoding import (
    ArraySpec,
    check_headroom,
    decode,
    decode_weighted_mean,
    encode,
    flatten_arrays,
    max_scale_bits,
    sum_error_bound,
    unflatten_arrays,
    weighted_mean_error_bound,
)
from .masks import apply_masks, expand_mask
from .protocol import (
    DEFAULT_CLIP,
    DEFAULT_SCALE_BITS,
    SecAggClient,
    SecAggParams,
    SecAggResult,
    SecAggServer,
    neighbours,
)

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_SCALE_BITS",
    "ArraySpec",
    "SecAggClient",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "apply_masks",
    "check_headroom",
    "decode",
    "decode_weighted_mean",
    "encode",
    "expand_mask",
    "flatten_arrays",
    "max_scale_bits",
    "neighbours",
    "sum_error_bound",
    "unflatten_arrays",
    "weighted_mean_error_bound",
]
