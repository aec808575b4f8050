"""Tests for the model registry (fedrad.common.models)."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from fedrad.common.errors import ConfigError, FedradError
from fedrad.common.models import get_model, list_models, resolve_stem, vit_patch_size


def test_registry_lists_the_required_models():
    names = list_models()
    assert names == sorted(names)
    for required in ("resnet18", "resnet50", "densenet121", "vit_tiny"):
        assert required in names


@pytest.mark.parametrize("image_size", [28, 64])
@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_one_channel_input(name, image_size):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3, image_size=image_size)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.randn(2, 1, image_size, image_size))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_three_channel_input(name):
    model = get_model(name, num_classes=2, in_channels=3, image_size=32, stem="standard")
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def _first_conv_and_pool(model: nn.Module) -> tuple[nn.Conv2d, nn.Module]:
    if hasattr(model, "conv1"):
        return model.conv1, model.maxpool
    return model.features.conv0, model.features.pool0


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_stems(name):
    small = get_model(name, num_classes=2, image_size=32, stem="small")
    conv, pool = _first_conv_and_pool(small)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels == 1
    assert isinstance(pool, nn.Identity)

    standard = get_model(name, num_classes=2, image_size=32, stem="standard")
    conv, pool = _first_conv_and_pool(standard)
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.in_channels == 1
    assert isinstance(pool, nn.MaxPool2d)


def test_auto_stem_depends_on_image_size():
    assert resolve_stem("auto", 28) == "small"
    assert resolve_stem("auto", 32) == "small"
    assert resolve_stem("auto", 33) == "standard"
    assert resolve_stem("standard", 28) == "standard"
    assert get_model("resnet18", num_classes=2, image_size=28).conv1.kernel_size == (3, 3)
    assert get_model("resnet18", num_classes=2, image_size=64).conv1.kernel_size == (7, 7)


def test_small_stem_keeps_more_resolution():
    x = torch.randn(2, 1, 28, 28)
    small = get_model("resnet18", num_classes=2, image_size=28, stem="small").eval()
    standard = get_model("resnet18", num_classes=2, image_size=28, stem="standard").eval()
    with torch.no_grad():
        small_map = small.layer1(small.maxpool(small.relu(small.bn1(small.conv1(x)))))
        std_map = standard.layer1(standard.maxpool(standard.relu(standard.bn1(standard.conv1(x)))))
    assert small_map.shape[-1] == 28
    assert std_map.shape[-1] == 7


def test_vit_patch_grid():
    assert vit_patch_size(28) == 2  # 14 x 14 patches
    assert vit_patch_size(224) == 16  # 14 x 14, as ViT-B/16
    assert 8 <= 64 // vit_patch_size(64) <= 16
    model = get_model("vit_tiny", num_classes=2, image_size=28)
    assert model.conv_proj.in_channels == 1
    assert model.conv_proj.kernel_size == (2, 2)
    assert model.hidden_dim == 192
    with pytest.raises(ConfigError, match="Nearby sizes"):
        get_model("vit_tiny", num_classes=2, image_size=31)


def test_unknown_model_lists_the_registry():
    with pytest.raises(ConfigError) as info:
        get_model("resnet9000", num_classes=2)
    for name in list_models():
        assert name in str(info.value)
    assert info.value.code == "bad-config"


@pytest.mark.parametrize("num_classes", [0, 1, -2, 2.0, "2", True, None])
def test_bad_num_classes(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        get_model("resnet18", num_classes=num_classes)


def test_bad_stem_and_sizes():
    with pytest.raises(ConfigError, match="stem"):
        get_model("resnet18", num_classes=2, stem="tiny")
    with pytest.raises(ConfigError, match="in_channels"):
        get_model("resnet18", num_classes=2, in_channels=0)
    with pytest.raises(ConfigError, match="image_size"):
        get_model("resnet18", num_classes=2, image_size=4)
    with pytest.raises(ConfigError, match="stem='small'"):
        get_model("densenet121", num_classes=2, image_size=28, stem="standard")


def test_builders_are_keyword_only():
    with pytest.raises(TypeError):
        get_model("resnet18", 2)  # type: ignore[misc]


# --------------------------------------------------------------------------- weights


@pytest.fixture
def rgb_resnet18_file(tmp_path):
    """A 3-channel, 1000-class torchvision ResNet-18 state dict (random init, no download)."""
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_rgb.pt"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_rgb_weights_are_summed_into_one_channel(rgb_resnet18_file, caplog):
    path, source = rgb_resnet18_file
    torch.manual_seed(2)
    fresh_fc = get_model("resnet18", num_classes=2, image_size=64).fc.weight.detach().clone()
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="fedrad.common.models"):
        model = get_model(
            "resnet18", num_classes=2, image_size=64, stem="standard", weights_path=path
        )
    state = model.state_dict()
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(state["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(state[key], source[key]), key
    # The 2-class head cannot take the 1000-class weights: it keeps its initialisation.
    assert state["fc.weight"].shape == (2, 512)
    assert torch.equal(state["fc.weight"], fresh_fc)
    assert "fc.weight" in caplog.text and "fc.bias" in caplog.text


def test_small_stem_skips_the_7x7_conv(rgb_resnet18_file, caplog):
    path, source = rgb_resnet18_file
    with caplog.at_level(logging.WARNING, logger="fedrad.common.models"):
        model = get_model("resnet18", num_classes=2, image_size=28, stem="small", weights_path=path)
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    assert torch.equal(model.state_dict()["layer2.0.conv1.weight"], source["layer2.0.conv1.weight"])
    assert "conv1.weight" in caplog.text


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    trained = get_model("resnet18", num_classes=2, image_size=32)
    trained.bn1.running_mean.fill_(0.25)  # BatchNorm buffers travel too
    path = tmp_path / "ckpt.pth"
    wrapped = {"state_dict": {"module." + k: v for k, v in trained.state_dict().items()}}
    torch.save(wrapped, path)
    torch.manual_seed(4)
    loaded = get_model("resnet18", num_classes=2, image_size=32, weights_path=path).state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "secret-hospital-folder" / "weights.pt"
    with pytest.raises(FedradError) as info:
        get_model("resnet18", num_classes=2, weights_path=missing)
    assert info.value.code == "bad-weights"
    assert "state dict" in str(info.value)
    assert "secret-hospital-folder" not in str(info.value)  # no path may leave the site
    assert "secret-hospital-folder" in info.value.local_detail


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(FedradError) as info:
        get_model("resnet18", num_classes=2, weights_path=path)
    assert info.value.code == "bad-weights"
    assert info.value.__cause__ is not None
    assert str(tmp_path) not in str(info.value)


def test_weights_for_another_architecture(tmp_path):
    path = tmp_path / "densenet.pt"
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), path)
    with pytest.raises(FedradError, match="does not fit") as info:
        get_model("resnet18", num_classes=2, weights_path=path)
    assert info.value.code == "bad-weights"

    # ResNet-34 has every ResNet-18 tensor, with the same shapes, and more blocks.
    resnet34 = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), resnet34)
    with pytest.raises(FedradError, match="unexpected") as info:
        get_model("resnet18", num_classes=2, weights_path=resnet34)
    assert info.value.code == "bad-weights"


def test_vit_weights_for_another_image_size(tmp_path):
    path = tmp_path / "vit28.pt"
    torch.save(get_model("vit_tiny", num_classes=2, image_size=28).state_dict(), path)
    with pytest.raises(FedradError, match="pos_embedding"):
        get_model("vit_tiny", num_classes=2, image_size=64, weights_path=path)


def test_weights_file_without_tensors(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(FedradError, match="no tensors") as info:
        get_model("resnet18", num_classes=2, weights_path=path)
    assert info.value.code == "bad-weights"


@pytest.mark.parametrize("name", list_models())
def test_a_shell_takes_a_whole_state_dict_and_then_is_that_model(name, tmp_path):
    """initialise=False skips the random initialisation; once a complete state dict is
    loaded (strict), the shell computes exactly what the model it came from computes."""
    torch.manual_seed(3)
    kwargs = {"num_classes": 3, "image_size": 32, "stem": "small"}
    model = get_model(name, **kwargs).eval()
    shell = get_model(name, initialise=False, **kwargs)
    real, empty = model.state_dict(), shell.state_dict()
    assert list(empty) == list(real)  # every tensor, persistent buffers included
    assert {n for n, _ in shell.named_buffers()} <= set(empty)
    for key, value in real.items():
        assert empty[key].shape == value.shape and empty[key].dtype == value.dtype, key
        assert empty[key].device.type == "cpu"
    assert shell.training  # like a built model
    shell.load_state_dict(real, strict=True)
    shell.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(shell(x), model(x))
    with pytest.raises(ValueError, match="cannot also start from weights_path"):
        get_model(name, initialise=False, weights_path=tmp_path / "w.pt", **kwargs)


def test_a_shell_whose_buffers_a_state_dict_would_miss_is_built_for_real(monkeypatch):
    """A buffer outside the state dict would keep the shell's garbage: such a model is
    built with its initialisation."""
    import fedrad.common.models as models

    class WithScratch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    spec = models._Spec(lambda *args: WithScratch(), "fc.weight", "fc.", "test model")
    monkeypatch.setitem(models._REGISTRY, "with-scratch", spec)
    shell = get_model("with-scratch", num_classes=2, initialise=False)
    assert torch.equal(shell.scale, torch.full((2,), 3.0))
