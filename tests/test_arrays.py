"""Flower Arrays read and written with one copy: the same bytes, the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedrad.common.arrays import array_of, array_values, record_of, state_dict_view
from fedrad.common.config import load_settings
from fedrad.common.models import model_from_settings

VALUES = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(7, dtype=np.int64),
          np.zeros((0, 5), dtype=np.float16), np.array([True, False]),
          np.arange(120, dtype=np.uint8).reshape(2, 3, 4, 5), np.array(2.5)]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{v.dtype}{list(v.shape)}")
def test_arrays_are_numpy_save_bytes_and_read_back_as_views(value: np.ndarray) -> None:
    made = array_of(value)
    flower = Array(value)
    assert (made.dtype, made.shape, made.stype, made.data) == \
        (flower.dtype, flower.shape, flower.stype, flower.data)
    assert made.object_id == flower.object_id
    view = array_values(flower)
    np.testing.assert_array_equal(view, value)
    assert view.dtype == value.dtype and view.shape == value.shape
    assert not view.flags.writeable
    if value.size:
        assert np.shares_memory(view, np.frombuffer(flower.data, np.uint8))


def test_a_model_round_trips_through_views_bit_for_bit() -> None:
    settings = load_settings({"image-size": 28})
    torch.manual_seed(0)
    model = model_from_settings(settings)
    state = model.state_dict()
    record = record_of(state)
    assert all(record[k].data == ArrayRecord(state)[k].data for k in state)  # Flower's bytes
    other = model_from_settings(settings)
    other.load_state_dict(state_dict_view(record), strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert record_of({"t": torch.arange(6.0).reshape(2, 3).t()})["t"].numpy().tolist() == \
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]  # a transposed tensor keeps its values


@pytest.mark.parametrize("data, shape, message", [
    (b"garbage" * 4, (3,), "not a .npy payload"),
    (b"\x93NUMPY", (3,), "shorter than a .npy header"),
    (None, (4,), "its payload float32 (3,)"),
    ("truncated", (3,), "8 bytes of values, 12 expected"),
])
def test_a_damaged_array_is_refused_with_what_is_wrong(data, shape, message) -> None:
    good = Array(np.zeros(3, np.float32)).data
    if data is None:
        data = good
    elif data == "truncated":
        data = good[:-4]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        array_values(Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=data))
    with pytest.raises(ValueError, match="not 'numpy.ndarray'"):
        array_values(Array(dtype="float32", shape=(3,), stype="torch.Tensor", data=good))
