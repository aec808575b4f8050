"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

The Mersenne prime ``2**521 - 1`` is larger than any 32-byte secret, so a secret is one
field element and is shared in one polynomial of degree ``threshold - 1`` whose other
coefficients come from :func:`secrets.randbelow`.  A share is the pair ``(x, y)`` with
``x`` the recipient's node id (a positive integer, distinct per recipient) and
``y = f(x)``.  Any ``threshold`` shares give the secret back by Lagrange interpolation at
0; fewer reveal nothing about it (information-theoretic secrecy).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence

from ..errors import FedradError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "share_secret", "share_from_bytes", "share_to_bytes"]

#: The field modulus, the Mersenne prime 2**521 - 1.
PRIME = 2**521 - 1
#: Bytes of a serialised share value ``y``.
SHARE_BYTES = 66
SECRET_BYTES = 32


def share_secret(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Split a 32-byte ``secret`` into one share per x coordinate in ``xs``.

    Raises ``FedradError("bad-threshold")`` unless ``1 <= threshold <= len(xs)`` and the
    x coordinates are distinct positive integers below the field modulus.
    """
    if len(secret) != SECRET_BYTES:
        raise FedradError("bad-secret", f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise FedradError(
            "bad-threshold",
            f"threshold {threshold} must be between 1 and the number of shares {len(xs)}",
        )
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares: dict[int, int] = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """Recover the 32-byte secret from at least ``threshold`` shares ``{x: y}``.

    Raises ``FedradError("too-few-shares")`` when fewer than ``threshold`` are given, and
    ``FedradError("bad-share")`` when the interpolated value is not a 32-byte secret (a
    share was corrupted).  Only the first ``threshold`` shares (by x) are used.
    """
    if len(shares) < threshold:
        raise FedradError(
            "too-few-shares",
            f"{len(shares)} shares available but {threshold} are needed to reconstruct",
        )
    xs = sorted(shares)[:threshold]
    _check_xs(xs)
    secret = 0
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + shares[xi] * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise FedradError("bad-share", "the shares do not combine to a valid secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(y: int) -> bytes:
    """Serialise a share value to :data:`SHARE_BYTES` bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Parse a share value written by :func:`share_to_bytes`."""
    if len(data) != SHARE_BYTES:
        raise FedradError("bad-share", f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise FedradError("bad-share", "the share value is outside the field")
    return y


def _check_xs(xs: Iterable[int]) -> None:
    seen: set[int] = set()
    for x in xs:
        if not isinstance(x, int) or not 0 < x < PRIME or x in seen:
            raise FedradError("bad-share", "share x coordinates must be distinct positive integers")
        seen.add(x)
