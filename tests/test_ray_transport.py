"""Simulated sites' weights travel through Ray out of band, and arrive bit for bit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedrad.common.arrays import array_values
from fedrad.common.config import load_settings
from fedrad.common.models import model_from_settings
from fedrad.common.ray_transport import (
    array_from_wire,
    array_to_wire,
    in_ray_worker,
    use_out_of_band_arrays,
)


def _model_record() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(model_from_settings(load_settings({"image-size": 28})).state_dict())


def test_wire_form_round_trip_is_exact_and_the_view_shares_memory() -> None:
    for value in (np.arange(12, dtype=np.float32).reshape(3, 4), np.array(7, dtype=np.int64),
                  np.zeros((0, 5), dtype=np.float16)):
        array = Array(value)
        wire = array_to_wire(array)
        assert np.shares_memory(wire[3], np.frombuffer(array.data, np.uint8)) or not array.data
        back = array_from_wire(wire)
        assert (back.dtype, back.shape, back.stype, back.data) == \
            (array.dtype, array.shape, array.stype, array.data)
        assert back.object_id == array.object_id
        np.testing.assert_array_equal(back.numpy(), value)
        # the receiver reads the values where they arrived: no copy, and read-only
        assert isinstance(back.data, memoryview) and back.data.readonly
        assert np.shares_memory(np.frombuffer(back.data, np.uint8), wire[3]) or not array.data
        np.testing.assert_array_equal(array_values(back), value)


def test_wire_form_refuses_what_fedrad_did_not_send() -> None:
    header = array_to_wire(Array(np.ones(3, np.float32)))
    with pytest.raises(TypeError, match="not an Array"):
        array_from_wire((header[0], header[1], header[2], b"raw bytes"))
    with pytest.raises(TypeError, match="not an Array"):
        array_from_wire((header[0], header[1], header[2], np.ones(3, np.float32)))


def test_a_model_message_goes_out_of_band_and_arrives_identical(monkeypatch) -> None:
    import ray.cloudpickle as cloudpickle

    from fedrad.common import ray_transport

    # start unregistered, whatever an earlier simulation in this process did
    monkeypatch.delitem(cloudpickle.CloudPickler.dispatch, Array, raising=False)
    monkeypatch.setattr(ray_transport, "_registered", False)
    monkeypatch.setattr(ray_transport, "_share_sends", False)  # as in a site's actor

    record = _model_record()
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 2})})
    payload = sum(len(a.data) for a in record.values())

    def dumps() -> tuple[bytes, list[pickle.PickleBuffer]]:
        buffers: list[pickle.PickleBuffer] = []
        return cloudpickle.dumps(content, protocol=5, buffer_callback=buffers.append), buffers

    in_band_before, _ = dumps()
    assert len(in_band_before) > payload  # Flower's bytes are copied into the pickle
    use_out_of_band_arrays()
    use_out_of_band_arrays()  # idempotent
    in_band, buffers = dumps()
    assert len(in_band) < payload / 100  # only headers and names stay in the pickle
    assert sum(b.raw().nbytes for b in buffers) == payload
    back = pickle.loads(in_band, buffers=buffers)
    arrays = back["arrays"]
    assert list(arrays.keys()) == list(record.keys())
    assert all(arrays[k].data == record[k].data and arrays[k].shape == record[k].shape
               for k in record.keys())
    assert back.object_id == content.object_id
    assert back["config"]["server-round"] == 2


def test_outside_ray_nothing_says_it_is_a_worker() -> None:
    import ray

    assert in_ray_worker() == ray.is_initialized()


def test_a_driver_puts_a_model_sent_to_many_sites_in_the_object_store_once(monkeypatch) -> None:
    """The ServerApp sends one model to every site: one object-store copy, read in place."""
    import gc

    import ray

    from fedrad.common import ray_transport
    from fedrad.common.ray_transport import SHARE_BYTES, forget_shared_sends

    monkeypatch.setattr(ray_transport, "_share_sends", True)
    forget_shared_sends()
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value: puts.append(value.nbytes) or real_put(value))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR",
                 object_store_memory=80 * 1024 * 1024)
    try:
        big = Array(np.arange(SHARE_BYTES // 4 + 3, dtype=np.float32))
        small = Array(np.arange(10, dtype=np.float32))
        wires = [array_to_wire(big) for _ in range(10)]
        assert puts == [len(big.data)]  # ten sends, one put
        assert all(w[3] == wires[0][3] for w in wires)  # the same ObjectRef each time
        assert isinstance(array_to_wire(small)[3], np.ndarray)  # small ones travel inline
        back = array_from_wire(wires[0])
        assert back.object_id == big.object_id and back.data.readonly
        np.testing.assert_array_equal(array_values(back), array_values(big))
        assert len(ray_transport._shared) == 1
        del big, wires
        gc.collect()
        assert not ray_transport._shared  # freed with its Array
        other = Array(np.ones(SHARE_BYTES, np.uint8))
        array_to_wire(other)
        forget_shared_sends()
        array_to_wire(other)  # a new session's first send: put again
        assert len(puts) == 3
    finally:
        forget_shared_sends()
        if started_here:
            ray.shutdown()
