"""The masks of :mod:`.masks`, computed with torch on a site's GPU (or its CPU).

A site that trains on a GPU can mask its update where it already lies: this module
computes the same AES-256-CTR keystream as :func:`.masks.expand_mask` (the seed is the
AES-256 key, the counter block the 128-bit big-endian block number from zero, the keystream
read as little-endian ``uint32``) with table-driven AES in plain torch operations, so every
word is bit-identical to the OpenSSL keystream and masks from GPU and CPU sites cancel.

All the seeds of one site are expanded together (one batch of counter blocks per seed), so
a site with many neighbours costs one pass of fourteen AES rounds over a larger tensor.
Values are held in ``int64`` tensors in ``[0, 2**32)``; sums wrap modulo ``2**32``.

The tables and key schedule are computed here from the AES definition (FIPS-197): the
S-box from the multiplicative inverse in GF(2^8) and the affine map; ``tests`` check the
keystream against OpenSSL's for several seeds, lengths and offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ..errors import FedradError

__all__ = ["apply_masks_torch", "expand_masks_torch"]

_MASK32 = 0xFFFFFFFF
_ROUNDS = 14  # AES-256


def _xtime(b: int) -> int:
    b <<= 1
    return (b ^ 0x11B) & 0xFF if b & 0x100 else b


def _gmul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a = _xtime(a)
        b >>= 1
    return out


@lru_cache(maxsize=1)
def _sbox() -> tuple[int, ...]:
    box = []
    for x in range(256):
        inv = 0
        if x:
            inv = next(y for y in range(1, 256) if _gmul(x, y) == 1)
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        box.append(s ^ 0x63)
    return tuple(box)


def _ror(word: int, bits: int) -> int:
    return ((word >> bits) | (word << (32 - bits))) & _MASK32


@lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """The four round tables (Te0..Te3) stacked, and the S-box, as int64 arrays."""
    sbox = _sbox()
    te0 = [(_xtime(s) << 24) | (s << 16) | (s << 8) | (_xtime(s) ^ s) for s in sbox]
    te = np.array([te0, [_ror(w, 8) for w in te0], [_ror(w, 16) for w in te0],
                   [_ror(w, 24) for w in te0]], dtype=np.int64)
    return te, np.array(sbox, dtype=np.int64)


def _key_schedule(key: bytes) -> list[int]:
    """The 60 round-key words of AES-256 (FIPS-197 section 5.2)."""
    if len(key) != 32:
        raise FedradError("bad-seed", "a mask seed is 32 bytes (an AES-256 key)")
    sbox = _sbox()

    def sub_word(w: int) -> int:
        return ((sbox[w >> 24] << 24) | (sbox[(w >> 16) & 0xFF] << 16)
                | (sbox[(w >> 8) & 0xFF] << 8) | sbox[w & 0xFF])

    words = [int.from_bytes(key[4 * i:4 * i + 4], "big") for i in range(8)]
    rcon = 1
    for i in range(8, 4 * (_ROUNDS + 1)):
        temp = words[i - 1]
        if i % 8 == 0:
            temp = sub_word(((temp << 8) | (temp >> 24)) & _MASK32) ^ (rcon << 24)
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            temp = sub_word(temp)
        words.append(words[i - 8] ^ temp)
    return words


def _bswap32(x: torch.Tensor) -> torch.Tensor:
    return (((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00)
            | ((x >> 24) & 0xFF))


def _keystream(seeds: Sequence[bytes], first_block: int, blocks: int,
               device: torch.device) -> torch.Tensor:
    """AES-256-CTR keystream words, shape ``(len(seeds), 4 * blocks)``, int64 in [0, 2^32)."""
    te_np, sbox_np = _tables()
    te = torch.as_tensor(te_np, device=device)
    sbox = torch.as_tensor(sbox_np, device=device)
    # round keys: (seeds, 60) -> (seeds, 60, 1) to broadcast over the blocks
    rk = torch.tensor([_key_schedule(s) for s in seeds], dtype=torch.int64,
                      device=device).unsqueeze(-1)
    counter = torch.arange(first_block, first_block + blocks, dtype=torch.int64, device=device)
    # the 128-bit big-endian counter block: columns 0 and 1 are zero below 2**64 blocks
    zero = torch.zeros_like(counter)
    s = [zero ^ rk[:, 0], zero ^ rk[:, 1], (counter >> 32) ^ rk[:, 2],
         (counter & _MASK32) ^ rk[:, 3]]
    te0, te1, te2, te3 = te[0], te[1], te[2], te[3]
    for r in range(1, _ROUNDS):
        s = [te0[s[i] >> 24] ^ te1[(s[(i + 1) % 4] >> 16) & 0xFF]
             ^ te2[(s[(i + 2) % 4] >> 8) & 0xFF] ^ te3[s[(i + 3) % 4] & 0xFF]
             ^ rk[:, 4 * r + i] for i in range(4)]
    last = 4 * _ROUNDS
    out = [((sbox[s[i] >> 24] << 24) | (sbox[(s[(i + 1) % 4] >> 16) & 0xFF] << 16)
            | (sbox[(s[(i + 2) % 4] >> 8) & 0xFF] << 8) | sbox[s[(i + 3) % 4] & 0xFF])
           ^ rk[:, last + i] for i in range(4)]
    # big-endian output columns -> keystream bytes -> little-endian uint32 words
    return _bswap32(torch.stack(out, dim=-1)).reshape(len(seeds), 4 * blocks)


def expand_masks_torch(seeds: Sequence[bytes], length: int, *, start: int = 0,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """Words ``start .. start + length`` of each seed's mask, shape ``(len(seeds), length)``.

    Equal to ``masks.expand_mask(seed, start + length)[start:]`` for every seed.
    """
    if length < 0 or start < 0:
        raise FedradError("bad-input", "mask start and length must be >= 0")
    dev = torch.device(device)
    if not seeds or length == 0:
        return torch.zeros((len(seeds), length), dtype=torch.int64, device=dev)
    first_block, skip = divmod(start, 4)
    blocks = -(-(skip + length) // 4)
    words = _keystream(list(seeds), first_block, blocks, dev)
    return words[:, skip:skip + length]


def apply_masks_torch(acc: torch.Tensor, *, add: Sequence[bytes], subtract: Sequence[bytes],
                      chunk: int = 1 << 22) -> torch.Tensor:
    """Add the masks of ``add`` and subtract those of ``subtract`` into ``acc`` (mod 2^32).

    ``acc`` is a flat int64 tensor of values in ``[0, 2**32)`` on any device; it is updated
    in place (chunk by chunk, to bound the memory of the keystream) and returned.
    """
    if acc.dtype != torch.int64 or acc.ndim != 1:
        raise FedradError("bad-input", "the accumulator must be a flat int64 tensor")
    seeds = list(add) + list(subtract)
    if not seeds:
        return acc
    signs = torch.tensor([1] * len(add) + [-1] * len(subtract), dtype=torch.int64,
                         device=acc.device).unsqueeze(-1)
    per_chunk = max(4, (chunk // len(seeds)) // 4 * 4)
    for begin in range(0, acc.shape[0], per_chunk):
        stop = min(begin + per_chunk, acc.shape[0])
        stream = expand_masks_torch(seeds, stop - begin, start=begin, device=acc.device)
        acc[begin:stop] += (stream * signs).sum(dim=0)
        acc[begin:stop] &= _MASK32
    return acc
