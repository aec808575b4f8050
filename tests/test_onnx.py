"""ONNX export for edge devices: ONNX Runtime gives PyTorch's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.common.config import load_settings
from fedrad.common.inference import check_onnx, load_checkpoint_model
from fedrad.common.models import model_from_settings
from fedrad.server.checkpoint import save_checkpoint

onnx = pytest.importorskip("onnx", reason="pip install 'fedrad[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="pip install 'fedrad[onnx]'")
pytest.importorskip("onnxscript", reason="pip install 'fedrad[onnx]'")


def _checkpoint(tmp_path, name: str, size: int):
    torch.manual_seed(0)
    settings = load_settings({"model": name, "image-size": size, "num-classes": 3,
                              "class-names": "a,b,c"})
    model = model_from_settings(settings)
    # torchvision starts the ViT head at zero (all logits 0): give every head random weights
    # so that the comparison sees real outputs.
    head = model.heads.head if name == "vit_tiny" else model.fc
    torch.nn.init.normal_(head.weight, std=1.0 / head.in_features**0.5)
    torch.nn.init.normal_(head.bias, std=0.1)
    save_checkpoint(tmp_path, 1, model.state_dict(), settings.to_run_config())
    return tmp_path / "model-latest.pt"


@pytest.mark.parametrize(("name", "size"), [("resnet18", 32), ("vit_tiny", 32)])
def test_exported_model_in_onnx_runtime_matches_pytorch(tmp_path, name, size):
    """``fedrad export`` writes the file (and checks it); ONNX Runtime then must agree."""
    ckpt = _checkpoint(tmp_path, name, size)
    path = tmp_path / "edge" / "model.onnx"
    res = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(path)])
    assert res.exit_code == 0, res.output
    assert "max |logit difference|" in res.output and "ok" in res.output
    loaded = load_checkpoint_model(ckpt, device="cpu")
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [1, size, size]
    assert not isinstance(inp.shape[0], int), "the batch axis is dynamic"
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
        got = session.run(["logits"], {"image": x})[0]
        with torch.inference_mode():
            want = loaded.model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 3)
        assert np.abs(want).max() > 0.05, "the logits are not trivially zero"
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert check_onnx(loaded, path) < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["fedrad:model"] == name and meta["fedrad:image-size"] == str(size)
    assert json.loads(meta["fedrad:classes"]) == ["a", "b", "c"]


def test_export_without_the_model_file_is_a_named_error(tmp_path):
    res = CliRunner().invoke(app, ["export", str(tmp_path / "none.pt"), "--out",
                                   str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "bad-checkpoint" in res.output
    assert not (tmp_path / "m.onnx").exists()
