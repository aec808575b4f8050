"""Heatmaps: Grad-CAM for the CNNs, attention rollout for the transformer, PNG overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedrad.common.errors import ConfigError
from fedrad.common.heatmaps import (
    CAM_LAYERS,
    attention_maps,
    attention_rollout,
    colorize,
    compute_heatmaps,
    grad_cam,
    heatmap_grid_png,
    heatmap_method,
    overlay_png,
    rollout,
)
from fedrad.common.models import get_model, list_models
from fedrad.common.training import normalize_batch, train_local


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_has_a_heatmap_of_input_size_in_unit_range(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3, image_size=32)
    model.train()
    x = torch.randn(2, 1, 32, 32)
    maps = compute_heatmaps(model, name, x)
    assert maps.shape == (2, 32, 32)
    assert maps.dtype == torch.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert float(maps.max()) == pytest.approx(1.0)  # min-max scaled, not flat
    assert model.training, "the model's mode is restored"
    assert all(p.grad is None for p in model.parameters()), "no gradients are left behind"


def test_unknown_model_and_bad_input_are_config_errors():
    with pytest.raises(ConfigError, match="no heatmap method"):
        heatmap_method("alexnet")
    model = get_model("resnet18", num_classes=2, image_size=32)
    with pytest.raises(ConfigError, match=r"\[B, C, H, W\]"):
        compute_heatmaps(model, "resnet18", torch.zeros(32, 32))
    with pytest.raises(ConfigError, match="no layer"):
        grad_cam(model, torch.zeros(1, 1, 32, 32), layer="layer9")
    with pytest.raises(ConfigError, match="class index"):
        grad_cam(model, torch.zeros(1, 1, 32, 32), layer="layer4", target=5)


SIZE = 64
SIDE = 16


def _squares(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; label 1 has a bright square somewhere, label 0 none."""
    images = rng.normal(0.35, 0.08, size=(n, SIZE, SIZE)).clip(0, 1)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, SIZE - SIDE, size=2)
        images[i, r:r + SIDE, c:c + SIDE] = 0.95
    return np.rint(images * 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def square_detector():
    """A ResNet-18 trained for a few steps to tell images with a bright square."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, labels = _squares(96, rng)
    model = get_model("resnet18", num_classes=2, image_size=SIZE)
    train_local(model, images, labels, epochs=4, batch_size=16, learning_rate=2e-3,
                optimizer="adam", device="cpu", seed=0)
    model.eval()
    test_images, test_labels = _squares(32, np.random.default_rng(1))
    with torch.no_grad():
        pred = model(normalize_batch(torch.from_numpy(test_images), torch.device("cpu")))
    accuracy = float((pred.argmax(1).numpy() == test_labels).mean())
    assert accuracy >= 0.9, f"the detector did not learn the task (accuracy {accuracy})"
    return model


@pytest.mark.parametrize("corner", [(4, 6), (40, 44), (6, 42)])
def test_grad_cam_follows_the_planted_square(square_detector, corner):
    rng = np.random.default_rng(2)
    image = rng.normal(0.35, 0.08, size=(SIZE, SIZE)).clip(0, 1)
    r, c = corner
    image[r:r + SIDE, c:c + SIDE] = 0.95
    x = normalize_batch(torch.from_numpy(np.rint(image * 255).astype(np.uint8))[None],
                        torch.device("cpu"))
    maps, logits = grad_cam(square_detector, x, layer=CAM_LAYERS["resnet18"], target=1)
    heat = maps[0].numpy()
    inside = np.zeros_like(heat, dtype=bool)
    inside[r:r + SIDE, c:c + SIDE] = True
    assert heat[inside].mean() > 2 * heat[~inside].mean(), (
        f"square mean {heat[inside].mean():.3f} vs background {heat[~inside].mean():.3f}")
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(peak[0] - (r + SIDE / 2)) <= SIDE and abs(peak[1] - (c + SIDE / 2)) <= SIDE
    assert int(logits.argmax()) == 1


def test_rollout_of_attention_to_one_token_points_at_that_patch():
    tokens = 1 + 16  # class token + a 4x4 grid
    focus = 1 + 6  # patch (1, 2)
    att = torch.zeros(1, 3, tokens, tokens)
    att[..., focus] = 1.0  # every token, every head attends to the focus patch
    flow = rollout([att, att, att])
    assert torch.allclose(flow.sum(-1), torch.ones(1, tokens))
    # Class token: 0.5**3 stays on itself, the rest flows to the focus patch.
    assert float(flow[0, 0, 0]) == pytest.approx(0.125)
    assert float(flow[0, 0, focus]) == pytest.approx(0.875)
    uniform = torch.full((1, 3, tokens, tokens), 1.0 / tokens)
    flat = rollout([uniform])[0, 0, 1:]
    assert torch.allclose(flat, flat[0].expand_as(flat))


def test_attention_maps_are_the_models_own_softmax_attention():
    torch.manual_seed(0)
    model = get_model("vit_tiny", num_classes=2, image_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        reference_logits = model(x)
    attentions, logits = attention_maps(model, x)
    assert torch.allclose(logits, reference_logits, atol=1e-5), "hooks change nothing"
    assert len(attentions) == len(model.encoder.layers)
    # Recompute layer 0's attention from its input and its projection weights.
    with torch.no_grad():
        tokens = model._process_input(x)
        cls = model.class_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + model.encoder.pos_embedding
        block = model.encoder.layers[0]
        h = block.ln_1(tokens)
        mha = block.self_attention
        q, k, _ = F_linear_split(h, mha.in_proj_weight, mha.in_proj_bias, mha.num_heads)
        expected = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    assert attentions[0].shape == expected.shape
    assert torch.allclose(attentions[0], expected, atol=1e-5)
    maps, _ = attention_rollout(model, x)
    assert maps.shape == (2, 32, 32)


def F_linear_split(h, weight, bias, heads):  # noqa: N802 - reads like torch's F.linear
    b, t, d = h.shape
    qkv = torch.nn.functional.linear(h, weight, bias).reshape(b, t, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return q, k, v


def test_overlay_png_colours_the_hot_region_only(tmp_path):
    image = np.full((32, 32), 0.5, np.float32)
    heat = np.zeros((32, 32), np.float32)
    heat[:16, :16] = 1.0
    path = overlay_png(tmp_path / "o.png", image, heat, size=64)
    pic = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pic.shape == (64, 64 * 2 + 4, 3)
    left, right = pic[:, :64], pic[:, 68:]
    assert np.ptp(left) <= 1, "the left half is the plain grey image"
    hot, cold = right[8, 8], right[56, 56]
    assert abs(cold[0] - cold[2]) <= 1 and abs(cold[0] - 128) <= 2, "no heat: still grey"
    assert hot[0] > hot[2] + 60, "full heat: red of the jet colour map"


def test_colorize_rejects_mismatched_shapes():
    with pytest.raises(ConfigError, match="same shape"):
        colorize(np.zeros((8, 8)), np.zeros((4, 4)))


def test_heatmap_grid_png_writes_a_figure(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.random((28, 28)).astype(np.float32) for _ in range(5)]
    heats = [rng.random((28, 28)).astype(np.float32) for _ in range(5)]
    path = heatmap_grid_png(tmp_path / "grid.png", images, heats,
                            [f"image {i}" for i in range(5)], suptitle="test")
    with Image.open(path) as pic:
        assert pic.format == "PNG" and pic.width > 300 and pic.height > 300
    with pytest.raises(ConfigError, match="as many"):
        heatmap_grid_png(tmp_path / "bad.png", images, heats[:2], ["a"])


@pytest.mark.parametrize(("model_name", "size", "stem", "expected"), [
    ("resnet18", 224, "standard", "layer4"),   # 7x7
    ("resnet18", 64, "standard", "layer3"),    # layer4 2x2 -> layer3 4x4
    ("resnet18", 28, "standard", "layer2"),    # layer4 1x1 -> layer2 4x4
    ("resnet18", 32, "small", "layer4"),       # 4x4
])
def test_cam_layer_takes_the_deepest_block_that_still_localises(model_name, size, stem,
                                                                expected) -> None:
    from fedrad.common.heatmaps import cam_layer
    from fedrad.common.models import get_model

    model = get_model(model_name, num_classes=2, in_channels=1, image_size=size, stem=stem)
    model.train()
    assert cam_layer(model, model_name, size) == expected
    assert model.training  # the probe leaves the mode as it was


def test_a_constant_map_with_rounding_noise_is_flat() -> None:
    from fedrad.common.heatmaps import _normalise

    maps = torch.full((1, 8, 8), 3.0) + torch.randn(1, 8, 8) * 1e-7
    assert torch.count_nonzero(_normalise(maps)) == 0
    real = torch.zeros(1, 8, 8)
    real[0, 2:4, 2:4] = 1.0
    assert _normalise(real).max() == 1.0 and _normalise(real).min() == 0.0
