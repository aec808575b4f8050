"""Masks computed with torch (for sites that mask on their GPU) equal OpenSSL's AES-CTR masks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedrad.common.errors import FedradError
from fedrad.common.secagg.masks import apply_masks, expand_mask, mask_word
from fedrad.common.secagg.torch_masks import apply_masks_torch, expand_masks_torch


def test_keystream_is_bit_identical_to_openssl() -> None:
    seeds = [os.urandom(32) for _ in range(3)] + [bytes(32), b"\xff" * 32]
    ref = [expand_mask(s, 103) for s in seeds]
    got = expand_masks_torch(seeds, 103).numpy().astype(np.uint32)
    for i in range(len(seeds)):
        np.testing.assert_array_equal(got[i], ref[i])
    # entering the stream part-way (not on a block boundary) gives the same words
    part = expand_masks_torch(seeds[:1], 50, start=37).numpy().astype(np.uint32)
    np.testing.assert_array_equal(part[0], ref[0][37:87])
    # far into the stream, where the counter's upper 32-bit word is non-zero
    far = 4 * (1 << 32) + 5
    word = int(expand_masks_torch(seeds[:1], 1, start=far)[0, 0])
    assert word == mask_word(seeds[0], far)


def test_apply_masks_matches_numpy_and_wraps() -> None:
    rng = np.random.default_rng(0)
    seeds = [os.urandom(32) for _ in range(4)]
    acc = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    expected = acc.copy()
    apply_masks(expected, add=seeds[:3], subtract=seeds[3:])
    got = torch.from_numpy(acc.astype(np.int64))
    apply_masks_torch(got, add=seeds[:3], subtract=seeds[3:], chunk=96)
    assert int(got.min()) >= 0 and int(got.max()) < 2**32
    np.testing.assert_array_equal(got.numpy().astype(np.uint32), expected)
    # adding and subtracting the same seed leaves the vector unchanged
    again = torch.from_numpy(acc.astype(np.int64))
    apply_masks_torch(again, add=seeds[:1], subtract=seeds[:1])
    np.testing.assert_array_equal(again.numpy().astype(np.uint32), acc)


def test_bad_input_is_refused() -> None:
    with pytest.raises(FedradError, match="32 bytes"):
        expand_masks_torch([b"short"], 4)
    with pytest.raises(FedradError, match="flat int64"):
        apply_masks_torch(torch.zeros(4, dtype=torch.int32), add=[bytes(32)], subtract=[])


@pytest.mark.gpu
def test_gpu_masks_cancel_with_cpu_masks() -> None:
    seeds = [os.urandom(32) for _ in range(3)]
    n = (1 << 20) + 3
    cpu = np.zeros(n, np.uint32)
    apply_masks(cpu, add=seeds[:2], subtract=seeds[2:])
    gpu = torch.zeros(n, dtype=torch.int64, device="cuda")
    apply_masks_torch(gpu, add=seeds[:2], subtract=seeds[2:])
    np.testing.assert_array_equal(gpu.cpu().numpy().astype(np.uint32), cpu)
