"""The site's egress log records exactly what each reply carries, and nothing identifying."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from typer.testing import CliRunner

from fedrad.cli import app as fedrad_cli
from fedrad.client.client_app import make_client_app
from fedrad.client.egress import egress_log_path, egress_mod, flower_error_reason
from fedrad.common.arrays import LAYOUT, model_arrays, packed_content
from fedrad.common.cache import write_cache
from fedrad.common.config import load_settings
from fedrad.common.models import model_from_settings

SIZE = 32


def _write_site(path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 200, (n, SIZE, SIZE)).astype(np.uint8)
    records = [{"id": f"img{i}", "label": int(label)} for i, label in enumerate(labels)]
    write_cache(path, images, labels, records=records, quarantine=[],
                meta={"num_classes": 2, "class_names": ["normal", "opacity"]})
    return path


@pytest.fixture()
def settings():
    return load_settings({"image-size": SIZE, "model": "resnet18", "local-epochs": 1,
                          "batch-size": 8, "amp": False})


def _message(kind: str, content: RecordDict, group: str = "3") -> Message:
    metadata = Metadata(run_id=77, message_id="m1", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=group, created_at=time.time(),
                        ttl=600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


def _context(node_config: dict) -> Context:
    return Context(run_id=77, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def _flower_bytes(reply: Message) -> int:
    """What Flower pushes for a reply: every deflated object of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-tensor"])
def test_every_reply_is_logged_with_its_exact_bytes_and_digests(tmp_path: Path,
                                                                settings, packed) -> None:
    cache = _write_site(tmp_path / "Doe_John_cache")
    torch.manual_seed(0)
    arrays = ArrayRecord(model_from_settings(settings).state_dict())
    config = ConfigRecord({**settings.to_site_config(), "server-round": 3})
    ctx = _context({"data-dir": str(cache), "site-id": "site-a"})
    app = make_client_app()
    model = packed_content(arrays) if packed else {"arrays": arrays}

    train = app(_message("train", RecordDict({**model, "config": config})), ctx)
    evaluate = app(_message("evaluate", RecordDict({**model, "config": config})), ctx)
    assert (LAYOUT in train.content.config_records) == packed  # answered in the same form
    trained = model_arrays(train.content)

    log_file = cache / "egress.jsonl"
    assert egress_log_path(ctx.node_config) == log_file
    entries = _lines(log_file)
    assert [e["message-type"] for e in entries] == ["train", "evaluate"]
    for entry, reply in zip(entries, (train, evaluate), strict=True):
        assert entry["kind"] == "reply" and entry["run-id"] == 77
        assert entry["server-round"] == 3
        assert entry["bytes"] == _flower_bytes(reply)
        assert entry["sha256"] == hashlib.sha256(reply.content.deflate()).hexdigest()
        assert entry["message-id"] == hashlib.sha256(reply.deflate()).hexdigest()
        assert [r["name"] for r in entry["records"]] == list(reply.content.keys())
        for described in entry["records"]:
            record = reply.content[described["name"]]
            assert described["sha256"] == hashlib.sha256(record.deflate()).hexdigest()
            assert described["bytes"] == _flower_bytes(record)
    described = {r["name"]: r for r in entries[0]["records"]}
    arrays_words = described["arrays"]["contents"]
    n_numbers = sum(int(np.prod(a.shape)) for a in trained.values())
    assert f"{len(trained)} arrays, {n_numbers} numbers" in arrays_words
    conv1 = trained["conv1.weight"]
    assert f"conv1.weight float32{list(conv1.shape)}" in arrays_words
    listed = {name: (dtype, tuple(shape))
              for name, dtype, shape in described["arrays"]["arrays"]}
    assert listed == {k: (a.dtype, tuple(a.shape)) for k, a in trained.items()}
    assert "train-loss (float)" in described["metrics"]["contents"]
    assert described["site"]["contents"] == "1 config keys: site-id (str)"

    text = log_file.read_text()
    assert str(tmp_path) not in text and "Doe_John" not in text
    loss = train.content["metrics"]["train-loss"]
    assert repr(loss) not in text  # metric values never enter the log, only their keys


def test_an_error_reply_is_logged_with_the_text_flower_sends(tmp_path: Path,
                                                             settings) -> None:
    missing = tmp_path / "Doe_John_19520101" / "cache"
    log_file = tmp_path / "it" / "egress.jsonl"
    ctx = _context({"data-dir": str(missing), "site-id": "site-a",
                    "egress-log": str(log_file)})
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(
        {**settings.to_site_config(), "server-round": 1})})
    with pytest.raises(Exception) as info:
        make_client_app()(_message("train", content, group="1"), ctx)
    (entry,) = _lines(log_file)
    assert entry["kind"] == "error" and entry["server-round"] == 1
    assert entry["error"] == flower_error_reason(info.value)
    assert "no-cache" in entry["error"]
    assert "Doe_John" not in log_file.read_text()
    assert not missing.exists()  # the log went where egress-log said, not into data-dir


def test_a_masked_vector_is_described_without_its_values(tmp_path: Path) -> None:
    vector = np.arange(1000, 1000 + 5000, dtype=np.uint32)
    app = ClientApp(mods=[egress_mod])

    @app.query()
    def masked(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"masked": ArrayRecord({"update": Array(vector)})}),
                       reply_to=msg)

    log_file = tmp_path / "egress.jsonl"
    reply = app(_message("query", RecordDict()), _context({"egress-log": str(log_file)}))
    (entry,) = _lines(log_file)
    assert entry["records"][0]["contents"] == "vector of 5000 uint32 (update)"
    assert entry["bytes"] == _flower_bytes(reply) > vector.nbytes
    assert "1000" not in log_file.read_text().replace("5000", "")


def test_a_reply_that_cannot_be_logged_is_not_sent(tmp_path: Path) -> None:
    app = ClientApp(mods=[egress_mod])
    sent = []

    @app.query()
    def reply(msg: Message, ctx: Context) -> Message:
        sent.append(msg)
        return Message(RecordDict({"m": ConfigRecord({"k": 1})}), reply_to=msg)

    blocked = tmp_path / "Doe_John"  # a folder where the log file should be
    blocked.mkdir()
    with pytest.raises(Exception, match="egress-log-unwritable") as info:
        app(_message("query", RecordDict()), _context({"egress-log": str(blocked),
                                                       "site-id": "site-a"}))
    assert sent  # the handler ran, but its reply was withheld
    assert "Doe_John" not in str(info.value) and str(tmp_path) not in str(info.value)


def test_simulated_sites_keep_no_log() -> None:
    assert egress_log_path({"partition-id": 0}) is None


def test_site_egress_command_prints_the_log(tmp_path: Path) -> None:
    app = ClientApp(mods=[egress_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((3, 4), "f4"))}),
                                   "site": ConfigRecord({"site-id": "site-a"})}),
                       reply_to=msg)

    log_file = tmp_path / "egress.jsonl"
    reply = app(_message("train", RecordDict()), _context({"egress-log": str(log_file)}))
    result = CliRunner().invoke(fedrad_cli, ["site", "egress", str(log_file), "--full"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert reply.content.object_id in result.output
    assert "w float32[3, 4]" in result.output and "site-id (str)" in result.output
    assert "1 messages" in result.output

    log_file.write_text(log_file.read_text() + "not json\n")
    result = CliRunner().invoke(fedrad_cli, ["site", "egress", str(log_file)])
    assert result.exit_code == 2
    assert "line 2" in result.output
    result = CliRunner().invoke(fedrad_cli, ["site", "egress", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "egress-log=" in result.output
