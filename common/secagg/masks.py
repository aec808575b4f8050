"""Mask seeds and mask expansion.

* Pairwise seeds: X25519 agreement between two clients' mask keys, then HKDF-SHA256 to a
  256-bit seed bound to the protocol version, the round and the (ordered) pair of node ids.
* Self-mask seeds: 32 bytes from :func:`os.urandom`, fed through the same HKDF.
* Expansion: the seed is an AES-256 key; the mask is the AES-CTR keystream (counter block
  starting at zero), ``4 * length`` bytes viewed as little-endian ``uint32``.  AES-NI makes
  this several GB/s on one core.  Seeds keep their full 256 bits (no folding).

Sign convention: for a pair ``u < v`` (node ids), ``u`` **adds** the pair's mask and ``v``
**subtracts** it, so the pair's masks cancel in the sum.

:func:`apply_masks` adds and subtracts many keystreams into one buffer chunk by chunk, so
the accumulator chunk stays in cache while every stream passes over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import FedradError
from .encoding import CHUNK_ELEMENTS

__all__ = [
    "PROTOCOL",
    "apply_masks",
    "derive_key",
    "expand_mask",
    "load_public_key",
    "mask_word",
    "mask_workers",
    "pairwise_seed",
    "self_mask_seed",
]

PROTOCOL = b"fedrad-secagg-v1"
_ZERO_CHUNK = bytes(4 * CHUNK_ELEMENTS)


def derive_key(secret: bytes, purpose: bytes, round_id: int, *parts: int) -> bytes:
    """HKDF-SHA256 of ``secret`` to 32 bytes, bound to protocol, purpose, round and ids."""
    info = PROTOCOL + b"|" + purpose + b"|" + int(round_id).to_bytes(8, "big", signed=False)
    for p in parts:
        info += int(p).to_bytes(8, "big", signed=False)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def load_public_key(data: bytes) -> X25519PublicKey:
    """Parse a raw 32-byte X25519 public key, or raise ``FedradError("bad-key")``."""
    if not isinstance(data, bytes | bytearray) or len(data) != 32:
        raise FedradError("bad-key", "an X25519 public key is 32 raw bytes")
    try:
        return X25519PublicKey.from_public_bytes(bytes(data))
    except ValueError as e:
        raise FedradError("bad-key", "the X25519 public key is invalid") from e


def pairwise_seed(
    private_key: X25519PrivateKey, peer_public: bytes, round_id: int, a: int, b: int
) -> bytes:
    """The 256-bit mask seed shared by nodes ``a`` and ``b`` (order-independent)."""
    try:
        shared = private_key.exchange(load_public_key(peer_public))
    except ValueError as e:  # all-zero shared secret: a low-order public key
        raise FedradError("bad-key", "key agreement with a peer's public key failed") from e
    lo, hi = sorted((a, b))
    return derive_key(shared, b"pair-mask", round_id, lo, hi)


def self_mask_seed(b_secret: bytes, round_id: int, node_id: int) -> bytes:
    """The 256-bit self-mask seed of ``node_id`` from its private secret ``b_u``."""
    return derive_key(b_secret, b"self-mask", round_id, node_id)


def _stream(seed: bytes, first_block: int = 0) -> Callable[[bytes, bytearray], int]:
    counter = int(first_block).to_bytes(16, "big")
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor().update_into


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """The full mask of ``length`` uint32 for ``seed`` (for tests and small vectors)."""
    out = np.zeros(length, np.uint32)
    apply_masks(out, add=[seed], subtract=[])
    return out


def mask_workers() -> int:
    """Threads for :func:`apply_masks` on a server: the CPUs this process may use (its
    affinity mask, capped by a container's CPU quota), up to 8."""
    from fedrad.common.training import cpu_budget

    return min(8, cpu_budget())


def apply_masks(
    acc: np.ndarray,
    *,
    add: Sequence[bytes],
    subtract: Sequence[bytes],
    fill: Callable[[int, int, np.ndarray], None] | None = None,
    post: Callable[[int, int, np.ndarray], None] | None = None,
    workers: int = 1,
) -> None:
    """Add the masks of ``add`` and subtract those of ``subtract`` into ``acc`` in place.

    Parameters
    ----------
    acc:
        Flat contiguous ``uint32`` accumulator; arithmetic wraps modulo ``2**32``.
    add, subtract:
        256-bit seeds whose masks are added / subtracted.
    fill:
        Optional ``fill(start, stop, chunk)`` called before the masks of each chunk, to
        write the chunk's own content (fused encoding: the chunk stays in cache).
    post:
        Optional ``post(start, stop, chunk)`` called after the masks of each chunk (fused
        decoding).
    workers:
        Threads that share the work, each a contiguous range of chunks (AES-CTR enters
        each stream at the range's first block; OpenSSL and numpy run without the GIL, so
        the threads run in parallel).  With more than one, ``fill`` and ``post`` are called
        from several threads at once, each for chunks of its own range.  The result is
        the same for any number.
    """
    if acc.dtype != np.uint32 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise FedradError("bad-input", "the accumulator must be a flat contiguous uint32 array")
    n = acc.shape[0]
    chunks = -(-n // CHUNK_ELEMENTS)
    workers = max(1, min(int(workers), chunks // _MIN_CHUNKS_PER_WORKER))
    if workers == 1:
        _apply_range(acc, 0, n, add, subtract, fill, post)
        return
    per = -(-chunks // workers) * CHUNK_ELEMENTS  # range starts stay on chunk boundaries
    ranges = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="secagg-masks") as pool:
        done = [pool.submit(_apply_range, acc, lo, hi, add, subtract, fill, post)
                for lo, hi in ranges]
        for future in done:
            future.result()  # a failure in any range is raised here


#: chunks (of each mask: 4 MiB) a thread gets at least; a thread costs ~0.1 ms to start
_MIN_CHUNKS_PER_WORKER = 64


def _apply_range(acc: np.ndarray, lo: int, hi: int, add: Sequence[bytes],
                 subtract: Sequence[bytes], fill: Callable[[int, int, np.ndarray], None] | None,
                 post: Callable[[int, int, np.ndarray], None] | None) -> None:
    """:func:`apply_masks` for elements ``lo:hi`` (``lo`` on a 16-byte AES block)."""
    first_block = lo // 4
    adders = [_stream(s, first_block) for s in add]
    subtractors = [_stream(s, first_block) for s in subtract]
    buf = bytearray(4 * CHUNK_ELEMENTS + 16)  # update_into needs a block of slack
    ks = np.frombuffer(buf, np.dtype("<u4"), count=CHUNK_ELEMENTS)
    for start in range(lo, hi, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, hi)
        chunk = acc[start:stop]
        if fill is not None:
            fill(start, stop, chunk)
        size = stop - start
        zeros = _ZERO_CHUNK if size == CHUNK_ELEMENTS else _ZERO_CHUNK[: 4 * size]
        part = ks[:size]
        for update in adders:
            update(zeros, buf)
            np.add(chunk, part, out=chunk)
        for update in subtractors:
            update(zeros, buf)
            np.subtract(chunk, part, out=chunk)
        if post is not None:
            post(start, stop, chunk)


def mask_word(seed: bytes, index: int) -> int:
    """Element ``index`` of the mask of ``seed``, computed without the elements before it.

    AES-CTR's counter block is the 128-bit big-endian block number, so the keystream can
    be entered at any 16-byte block.
    """
    block, word = divmod(int(index), 4)
    enc = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    data = enc.update(bytes(16))
    return int.from_bytes(data[4 * word : 4 * word + 4], "little")
