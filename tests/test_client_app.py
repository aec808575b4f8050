"""The ClientApp's site-side work: training, evaluation, and what leaves the site."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedrad.client.client_app import (
    SiteContext,
    evaluate_on_site,
    make_client_app,
    train_on_site,
)
from fedrad.common.cache import write_cache
from fedrad.common.config import load_settings
from fedrad.common.metrics import EVALUATE_RECEIVED, EVALUATION, counts_from_metrics
from fedrad.common.models import model_from_settings

SIZE = 48


def _write_site(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 120, (n, SIZE, SIZE)).astype(np.uint8)
    images[labels == 1, 12:36, 12:36] += 100  # a bright square marks class 1
    records = [{"id": f"img{i}", "label": int(label)} for i, label in enumerate(labels)]
    write_cache(path, images, labels, records=records, quarantine=[],
                meta={"num_classes": 2, "class_names": ["normal", "opacity"]})
    return path


@pytest.fixture()
def settings():
    return load_settings({"image-size": SIZE, "model": "resnet18", "local-epochs": 1,
                          "batch-size": 16, "learning-rate": 0.05})


def _initial(settings) -> ArrayRecord:
    torch.manual_seed(0)
    model = model_from_settings(settings)
    return ArrayRecord(model.state_dict())


def test_train_then_evaluate_on_site(tmp_path: Path, settings) -> None:
    site = SiteContext("site-a", _write_site(tmp_path / "cache"))
    arrays = _initial(settings)
    new_arrays, metrics = train_on_site(arrays, settings, site, server_round=1)
    assert metrics["num-examples"] == 32  # 40 samples, val-fraction 0.2 held out
    assert np.isfinite(metrics["train-loss"])
    before, after = arrays.to_torch_state_dict(), new_arrays.to_torch_state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype for k in before)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])

    eval_metrics = evaluate_on_site(new_arrays, settings, site)
    counts = counts_from_metrics(eval_metrics)
    assert counts.n == eval_metrics["num-examples"] == 8
    assert counts.confusion.sum() == 8


def test_the_reused_model_carries_nothing_from_one_message_to_the_next(
        tmp_path: Path, settings, monkeypatch) -> None:
    """Sites reuse one model object between messages; results equal a fresh model's."""
    from fedrad.client import client_app as module

    site = SiteContext("site-a", _write_site(tmp_path / "cache"))
    start = _initial(settings)
    first, _ = train_on_site(start, settings, site, server_round=1)
    scores = evaluate_on_site(start, settings, site)
    again, _ = train_on_site(start, settings, site, server_round=1)  # after an evaluate
    other = load_settings({**settings.to_run_config(), "image-size": 32})
    module._model_for(other)  # another architecture in between replaces the cached one
    assert module._model_for(settings) is module._model_for(settings)
    monkeypatch.setattr(module, "_model_for", module.model_from_settings)  # fresh every time
    fresh, _ = train_on_site(start, settings, site, server_round=1)
    fresh_scores = evaluate_on_site(start, settings, site)
    for result in (again, fresh):
        a, b = first.to_torch_state_dict(), result.to_torch_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert scores == fresh_scores


def test_image_size_mismatch_is_a_clear_error(tmp_path: Path, settings) -> None:
    site = SiteContext("site-a", _write_site(tmp_path / "cache"))
    wrong = settings.replace(image_size=64)
    with pytest.raises(Exception, match="image-size-mismatch"):
        train_on_site(_initial(wrong), wrong, site)


def _message(kind: str, arrays: ArrayRecord, config: dict) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=600.0, message_type=kind)
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                   metadata=metadata)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_client_app_reply_carries_only_weights_counts_and_site_name(
    tmp_path: Path, settings
) -> None:
    cache = _write_site(tmp_path / "cache")
    app = make_client_app()
    config = {**settings.to_site_config(), "server-round": 1}
    ctx = _context({"data-dir": str(cache), "site-id": "site-a"})
    reply = app(_message("train", _initial(settings), config), ctx)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    assert dict(reply.content["site"]) == {"site-id": "site-a"}
    assert set(reply.content["metrics"].keys()) == {"num-examples", "train-loss",
                                                    "train-seconds"}
    reply = app(_message("evaluate", _initial(settings), config), ctx)
    assert set(reply.content.keys()) == {"metrics", "site"}
    text = repr(dict(reply.content["metrics"]))
    assert str(tmp_path) not in text


def test_a_training_message_that_asks_for_it_brings_the_received_models_evaluation(
    tmp_path: Path, settings
) -> None:
    """``evaluate-received``: the reply scores the model that came (not the trained one)."""
    cache = _write_site(tmp_path / "cache")
    app = make_client_app()
    config = {**settings.to_site_config(), "server-round": 2, EVALUATE_RECEIVED: True}
    ctx = _context({"data-dir": str(cache), "site-id": "site-a"})
    sent = _initial(settings)
    reply = app(_message("train", sent, config), ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics", "site", EVALUATION}
    assert set(reply.content["metrics"].keys()) == {"num-examples", "train-loss",
                                                    "train-seconds"}
    alone = evaluate_on_site(sent, settings, SiteContext("site-a", cache))
    assert dict(reply.content[EVALUATION]) == alone
    trained = evaluate_on_site(reply.content["arrays"], settings, SiteContext("site-a", cache))
    assert dict(reply.content[EVALUATION]) != trained
    assert counts_from_metrics(reply.content[EVALUATION]).n == 8
    del config[EVALUATE_RECEIVED]
    reply = app(_message("train", sent, config), ctx)
    assert EVALUATION not in reply.content.keys()
    # a site that holds nothing out still trains; only the evaluation is missing
    config.update({EVALUATE_RECEIVED: True, "val-fraction": 0.0})
    reply = app(_message("train", sent, config), ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    assert reply.content["metrics"]["num-examples"] == 40


def test_client_error_text_has_no_path(tmp_path: Path, settings) -> None:
    secret = tmp_path / "Doe_John_19520101" / "cache"
    app = make_client_app()
    ctx = _context({"data-dir": str(secret), "site-id": "site-a"})
    config = {**settings.to_site_config(), "server-round": 1}
    with pytest.raises(Exception) as info:
        app(_message("train", _initial(settings), config), ctx)
    text = str(info.value)
    assert "no-cache" in text
    assert "Doe_John" not in text and str(tmp_path) not in text


def test_missing_data_dir_says_how_to_fix(settings) -> None:
    app = make_client_app()
    config = {**settings.to_site_config(), "server-round": 1}
    with pytest.raises(Exception, match="--node-config"):
        app(_message("train", _initial(settings), config), _context({}))


def test_secagg_query_keeps_secrets_in_the_node_state(settings) -> None:
    from fedrad.client.secure_client import STATE_RECORD

    app = make_client_app()
    ctx = _context({"site-id": "site-a"})
    metadata = Metadata(run_id=1, message_id="q1", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=600.0, message_type="query.secagg")
    msg = Message(content=RecordDict({"secagg": ConfigRecord({"advertise": [4, 5]})}),
                  metadata=metadata)
    reply = app(msg, ctx)
    assert not reply.has_error()
    record = reply.content["secagg"]
    assert record["advert-instances"] == [4, 5]
    assert all(len(k) == 32 for k in record["advert-c-pk"] + record["advert-s-pk"])
    assert set(ctx.state[STATE_RECORD].keys()) == {"4", "5"}  # private keys stay here
    # a step the site holds no keys for is a clean, coded error
    msg2 = Message(content=RecordDict({"secagg": ConfigRecord({"unmask-instance": 9})}),
                   metadata=metadata)
    with pytest.raises(Exception, match="secagg-no-state"):
        app(msg2, ctx)


def test_secure_training_refuses_a_weight_above_the_public_bound() -> None:
    from fedrad.client.secure_client import handle_query, mask_vector
    from fedrad.common.errors import FedradError

    state = RecordDict()
    reply = handle_query({"advertise": [1]}, state)
    others = [(bytes([i]) * 32, bytes([i + 50]) * 32) for i in (1, 2)]  # any 32-byte keys
    ops = {"share-instance": 1, "share-me": 1, "share-ids": [1, 2, 3],
           "share-params": '{"threshold": 2, "round_id": 1, "clip": 8.0, "scale_bits": 20, '
                           '"degree": null, "weighted": true}',
           "share-c-pk": [reply["advert-c-pk"][0], others[0][0], others[1][0]],
           "share-s-pk": [reply["advert-s-pk"][0], others[0][1], others[1][1]]}
    handle_query(ops, state)
    with pytest.raises(FedradError, match="weight-above-bound"):
        mask_vector({"work-instance": 1, "receive-from": [], "receive-cts": [],
                     "work-total-weight": 10.0}, state, np.zeros(3), weight=50)


def test_a_packed_model_is_answered_packed_and_a_broken_one_named(tmp_path: Path,
                                                                   settings) -> None:
    from fedrad.common.arrays import LAYOUT, model_arrays, packed_content

    cache = _write_site(tmp_path / "cache")
    app = make_client_app()
    config = ConfigRecord({**settings.to_site_config(), "server-round": 1})
    ctx = _context({"data-dir": str(cache), "site-id": "site-a"})
    sent = _initial(settings)
    msg = _message("train", sent, {})
    msg.content = RecordDict({**packed_content(sent), "config": config})
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", LAYOUT, "metrics", "site"}
    trained = model_arrays(reply.content)
    assert [(k, a.dtype, tuple(a.shape)) for k, a in trained.items()] == \
        [(k, a.dtype, tuple(a.shape)) for k, a in sent.items()]
    assert not np.array_equal(trained["conv1.weight"].numpy(), sent["conv1.weight"].numpy())

    model = packed_content(sent)
    model[LAYOUT] = ConfigRecord({**dict(model[LAYOUT]), "names": ["x"] * len(sent)})
    msg.content = RecordDict({**model, "config": config})
    with pytest.raises(Exception, match=r"\[bad-message\] the server's packed model: the "
                       "layout names a tensor twice"):
        app(msg, ctx)


def test_a_site_sets_its_torch_threads_from_its_node_config(tmp_path: Path, settings) -> None:
    from fedrad.client.client_app import site_cpu_threads
    from fedrad.common.errors import FedradError
    from fedrad.common.training import cpu_budget

    assert site_cpu_threads({"cpu-threads": "3"}) == 3
    assert 1 <= site_cpu_threads({}) <= cpu_budget()
    for bad in ("0", "two", "-1"):
        with pytest.raises(FedradError, match="cpu-threads=.* whole number of threads"):
            site_cpu_threads({"cpu-threads": bad})
    cache = _write_site(tmp_path / "cache")
    app = make_client_app()
    config = {**settings.to_site_config(), "server-round": 1}
    before = torch.get_num_threads()
    try:
        ctx = _context({"data-dir": str(cache), "site-id": "site-a", "cpu-threads": 1})
        assert not app(_message("evaluate", _initial(settings), config), ctx).has_error()
        assert torch.get_num_threads() == 1
        ctx = _context({"data-dir": str(cache), "site-id": "site-a", "cpu-threads": "many"})
        with pytest.raises(Exception, match=r"\[bad-node-config\] cpu-threads='many'"):
            app(_message("evaluate", _initial(settings), config), ctx)
    finally:
        torch.set_num_threads(before)
