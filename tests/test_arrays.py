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


def _resnet_record() -> ArrayRecord:
    torch.manual_seed(0)
    return record_of(model_from_settings(load_settings({"image-size": 28})).state_dict())


def test_a_packed_model_is_one_array_and_unpacks_to_views_of_it() -> None:
    from fedrad.common.arrays import PACKED, PACKED_STYPE, pack_record, unpack_record

    record = _resnet_record()
    packed, layout = pack_record(record)
    assert list(packed.keys()) == [PACKED]
    whole = packed[PACKED]
    assert (whole.dtype, whole.stype) == ("uint8", PACKED_STYPE)
    assert len(whole.data) == sum(len(a.data) for a in record.values())
    back = unpack_record(packed, layout)
    assert list(back.keys()) == list(record.keys())
    everything = np.frombuffer(whole.data, np.uint8)
    for name, array in record.items():
        got = back[name]
        assert (got.dtype, tuple(got.shape), got.stype) == (array.dtype, tuple(array.shape),
                                                           array.stype)
        assert got.object_id == array.object_id  # the same bytes, tensor by tensor
        view = array_values(got)
        np.testing.assert_array_equal(view, array_values(array))
        if view.size:
            assert np.shares_memory(view, everything)  # no copy
    model = model_from_settings(load_settings({"image-size": 28}))
    model.load_state_dict(state_dict_view(back), strict=True)


def test_packing_a_record_of_a_state_copies_nothing_and_gives_the_same_bytes() -> None:
    """record_of writes every tensor once, into one buffer; pack_record then packs it as is."""
    from fedrad.common.arrays import PACKED, pack_record

    record = _resnet_record()
    packed, layout = pack_record(record)
    whole = np.frombuffer(packed[PACKED].data, np.uint8)
    first = next(iter(record.values()))
    assert np.shares_memory(whole, np.frombuffer(first.data, np.uint8))  # not a copy
    assert packed[PACKED].data.readonly  # nobody writes through the packed view
    per_tensor = ArrayRecord()  # the same tensors as bytes Arrays: packing copies them
    for name, array in record.items():
        per_tensor[name] = Array(dtype=array.dtype, shape=tuple(array.shape),
                                 stype=array.stype, data=bytes(array.data))
    copied, copied_layout = pack_record(per_tensor)
    assert bytes(packed[PACKED].data) == bytes(copied[PACKED].data)
    assert packed.object_id == copied.object_id and dict(layout) == dict(copied_layout)
    assert not np.shares_memory(np.frombuffer(copied[PACKED].data, np.uint8), whole)
    reordered = ArrayRecord()  # views of one buffer, but not in its order: copied, in order
    for name in reversed(list(record.keys())):
        reordered[name] = record[name]
    again, again_layout = pack_record(reordered)
    assert again_layout["names"] == list(reversed(layout["names"]))
    assert bytes(again[PACKED].data) == b"".join(bytes(reordered[k].data) for k in reordered)


def test_a_packed_message_is_a_few_flower_objects_instead_of_hundreds() -> None:
    """Flower sends every object of a message in a request of its own, at every hop."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedrad.common.arrays import model_arrays, packed_content

    torch.manual_seed(0)
    state = model_from_settings(load_settings({"image-size": 28})).state_dict()
    # as after training: no two tensors alike (Flower sends identical objects once)
    record = record_of({k: torch.randn(v.shape) if v.is_floating_point()
                        else torch.full(v.shape, i) for i, (k, v) in enumerate(state.items())})
    plain = RecordDict({"arrays": record})
    packed = RecordDict(packed_content(record))
    n_plain = len(get_all_nested_objects(plain))
    n_packed = len(get_all_nested_objects(packed))
    assert n_plain > 200 and n_packed < 20, (n_plain, n_packed)
    assert list(model_arrays(packed).keys()) == list(record.keys())
    assert model_arrays(plain) is record


def _broken(kind: str):
    from flwr.app import ConfigRecord

    from fedrad.common.arrays import PACKED, pack_record

    packed, layout = pack_record(record_of({"a": np.arange(6, dtype=np.float32),
                                            "b": np.array(3, dtype=np.int64)}))
    fields = dict(layout)
    if kind == "short":
        whole = packed[PACKED]
        packed = ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(whole.data) - 4,),
                                            stype=whole.stype, data=bytes(whole.data)[:-4])})
    elif kind == "twice":
        fields["names"] = ["a", "a"]
    elif kind == "lists":
        fields["dtypes"] = ["float32"]
    elif kind == "dims":
        fields["ndims"] = [2, 0]
    elif kind == "negative":
        fields["lengths"] = [-1, 1]
    elif kind == "not-packed":
        packed = ArrayRecord({"a": Array(np.zeros(3))})
    elif kind == "stype":
        whole = packed[PACKED]
        packed = ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(whole.data),),
                                            stype="numpy.ndarray", data=bytes(whole.data))})
    return packed, ConfigRecord(fields)


@pytest.mark.parametrize("kind, message", [
    ("short", "the layout covers"), ("twice", "names a tensor twice"),
    ("lists", "lists 2 names, 1 dtypes"), ("dims", "need 2 dimensions, it has 1"),
    ("negative", "'lengths' is not a list of non-negative integers"),
    ("not-packed", "holds one Array named"), ("stype", "not 'fedrad.npy-sequence'"),
])
def test_a_packed_record_that_does_not_add_up_is_refused(kind: str, message: str) -> None:
    from fedrad.common.arrays import unpack_record

    packed, layout = _broken(kind)
    with pytest.raises(ValueError, match=message):
        unpack_record(packed, layout)


def test_a_packed_tensor_whose_bytes_disagree_with_the_layout_is_refused_when_read() -> None:
    from flwr.app import ConfigRecord

    from fedrad.common.arrays import pack_record, unpack_record

    packed, layout = pack_record(record_of({"a": np.arange(6, dtype=np.float32)}))
    fields = dict(layout)
    fields["dims"] = [3, 2]
    fields["ndims"] = [2]
    back = unpack_record(packed, ConfigRecord(fields))
    with pytest.raises(ValueError, match=r"says float32 \(3, 2\), its payload float32 \(6,\)"):
        array_values(back["a"])


def test_a_record_to_fill_is_laid_out_as_record_of_lays_out_the_same_tensors() -> None:
    """record_to_fill gives the record and writable views of its values; once they are
    written, its bytes are record_of's, and packing it copies nothing."""
    from fedrad.common.arrays import PACKED, pack_record, record_to_fill

    state = {f"t{i}": v for i, v in enumerate(VALUES)}
    record, slots = record_to_fill(state)
    assert list(slots) == list(state) and list(record.keys()) == list(state)
    for k, value in state.items():
        assert slots[k].shape == value.shape and slots[k].dtype == value.dtype
        assert slots[k].flags.writeable
        np.copyto(slots[k], value)
    reference = record_of(state)
    for k in state:
        assert bytes(record[k].data) == bytes(reference[k].data)
        assert record[k].data.readonly
        np.testing.assert_array_equal(array_values(record[k]), state[k])
    packed, _ = pack_record(record)
    assert np.shares_memory(np.frombuffer(packed[PACKED].data, np.uint8), slots["t0"])
    with pytest.raises(ValueError, match="tensor bad: an array of Python objects"):
        record_to_fill({"bad": np.array([None, 1], dtype=object)})


def test_headers_numpy_writes_otherwise_are_parsed_and_still_checked() -> None:
    """A header other than the one numpy writes for the Array's dtype and shape (a .npy
    version 2.0 file, a Fortran-ordered one, one for other values) is parsed in full."""
    import io

    value = np.arange(6, dtype=np.float32).reshape(2, 3)

    def npy(arr: np.ndarray, version: tuple[int, int] | None) -> bytes:
        out = io.BytesIO()
        np.lib.format.write_array(out, arr, version=version)
        return out.getvalue()

    v2 = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=npy(value, (2, 0)))
    np.testing.assert_array_equal(array_values(v2), value)
    fortran = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                    data=npy(np.asfortranarray(value), (1, 0)))
    with pytest.raises(ValueError, match="Fortran-ordered"):
        array_values(fortran)
    other = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=npy(value, (1, 0)))
    with pytest.raises(ValueError, match=r"says float32 \(3, 2\), its payload float32 \(2, 3\)"):
        array_values(other)
    padded = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                   data=npy(value, (1, 0)) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="28 bytes of values, 24 expected"):
        array_values(padded)
    objects = Array(dtype="object", shape=(2,), stype="numpy.ndarray",
                    data=npy(np.array([1, None], dtype=object), (1, 0)))
    with pytest.raises(ValueError, match="holds objects"):
        array_values(objects)
