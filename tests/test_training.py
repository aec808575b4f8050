"""Tests for the local training loop (fedrad.common.training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedrad.common.errors import ConfigError, FedradError
from fedrad.common.models import get_model
from fedrad.common.training import (
    TrainResult,
    logit_adjustment,
    normalize_batch,
    predict_scores,
    random_affine,
    select_device,
    train_local,
)

SIZE = 12


class TinyNet(nn.Module):
    """A few-thousand-parameter CNN with both kinds of BatchNorm (fast on a CPU)."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable: class 1 has a bright square in the middle, class 0 does not."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 2
    images = rng.integers(0, 90, size=(n, SIZE, SIZE), dtype=np.uint8)
    images[labels == 1, 3:9, 3:9] = rng.integers(170, 255, size=(int(labels.sum()), 6, 6))
    return images, labels


def tiny_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def train(model: nn.Module, images, labels, **overrides) -> TrainResult:
    kwargs = dict(
        epochs=1, batch_size=16, learning_rate=0.05, optimizer="sgd", device="cpu", seed=0
    )
    kwargs.update(overrides)
    return train_local(model, images, labels, **kwargs)


# --------------------------------------------------------------------------- devices


def test_select_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        select_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        select_device("cuda")


# --------------------------------------------------------------------------- batches


def test_normalize_batch():
    batch = torch.tensor([[[0, 255], [127, 64]]], dtype=torch.uint8)
    x = normalize_batch(batch, torch.device("cpu"))
    assert x.shape == (1, 1, 2, 2)
    assert x.dtype == torch.float32
    expected = (batch.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[:, 0], expected)
    assert x[0, 0, 0, 0].item() == pytest.approx(-2.0)
    assert x[0, 0, 0, 1].item() == pytest.approx(2.0)
    # Channels-last strides (what cuDNN looks at), same values.
    cl = normalize_batch(batch, torch.device("cpu"), channels_last=True)
    assert cl.shape == (1, 1, 2, 2)
    assert cl.stride(1) == 1
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, x)


# --------------------------------------------------------------------------- training


def test_training_reduces_the_loss_and_separates_the_classes():
    images, labels = make_data()
    model = tiny_model()
    first = train(model, images, labels)
    for epoch in range(1, 6):
        last = train(model, images, labels, seed=epoch)
    assert np.isfinite(first.mean_loss) and np.isfinite(last.mean_loss)
    assert last.mean_loss < 0.5 * first.mean_loss
    scores = predict_scores(model, images, device="cpu")
    accuracy = float(((scores[:, 1] > 0.5).astype(np.int64) == labels).mean())
    assert accuracy >= 0.95


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("adamw", 1e-2)])
def test_adaptive_optimizers_train(optimizer, lr):
    images, labels = make_data()
    model = tiny_model()
    result = train(
        model, images, labels, epochs=6, optimizer=optimizer, learning_rate=lr, weight_decay=1e-4
    )
    scores = predict_scores(model, images, device="cpu")
    assert np.isfinite(result.mean_loss)
    assert float(((scores[:, 1] > 0.5) == labels).mean()) >= 0.9


def test_result_counts_samples_not_sample_epochs():
    images, labels = make_data(n=40)
    result = train(tiny_model(), images, labels, epochs=3)
    assert result.num_examples == 40
    assert result.epochs == 3
    assert result.seconds > 0
    # 3 epochs x 40 images went through.
    assert result.images_per_second * result.seconds == pytest.approx(120, rel=1e-6)
    capped = train(tiny_model(), images, labels, epochs=2, max_batches=1)
    assert capped.num_examples == 40
    assert capped.images_per_second * capped.seconds == pytest.approx(32, rel=1e-6)


def test_steps_train_that_many_batches_over_as_many_passes_as_it_takes():
    images, labels = make_data(n=40)  # batch 16: 3 batches a pass (16, 16, 8)
    result = train(tiny_model(), images, labels, epochs=5, steps=7)  # steps override epochs
    assert result.epochs == 3  # two whole passes and one batch of a third
    assert result.images_per_second * result.seconds == pytest.approx(40 + 40 + 16, rel=1e-6)
    short = train(tiny_model(), images, labels, steps=2)
    assert short.epochs == 1
    assert short.images_per_second * short.seconds == pytest.approx(32, rel=1e-6)
    # Whole passes as steps are the same training as that many epochs, batch for batch.
    a, b = tiny_model(3), tiny_model(3)
    train(a, images, labels, epochs=2, seed=5)
    train(b, images, labels, steps=6, seed=5)
    for (key, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), key


class _PriorOnly(nn.Module):
    """Logits that ignore the image: a learnable per-class bias."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2)


def test_logit_adjustment_is_the_smoothed_log_prior():
    offset = logit_adjustment(torch.tensor([0, 0, 0, 1]), 2, 1.0)
    assert offset.dtype == torch.float32
    np.testing.assert_allclose(offset.numpy(), np.log([4 / 6, 2 / 6]), rtol=1e-6)
    lacking = logit_adjustment(torch.tensor([0, 0]), 3, 2.0)  # a class the site lacks
    np.testing.assert_allclose(lacking.numpy(), 2 * np.log([3 / 5, 1 / 5, 1 / 5]), rtol=1e-6)


def test_logit_adjusted_training_learns_no_class_prior():
    """A model that can only learn the class mix learns it under cross-entropy, and learns
    (almost) nothing under logit adjustment: the site's prior is taken out of the loss."""
    images, _ = make_data(n=96)
    labels = (np.arange(96) % 4 != 0).astype(np.int64)  # 72 of 96 in class 1: odds 3
    gaps = {}
    for strength in (0.0, 1.0):
        model = _PriorOnly()
        train(model, images, labels, batch_size=96, steps=300, learning_rate=1.0,
              momentum=0.0, logit_adjust=strength)  # gradient descent, to convergence
        gaps[strength] = float(model.bias[1] - model.bias[0])
    assert gaps[0.0] == pytest.approx(np.log(3), abs=1e-3)
    # What remains is the smoothing: log(3) - log(73 / 25).
    assert gaps[1.0] == pytest.approx(np.log(3) - np.log(73 / 25), abs=1e-3)


def test_the_trained_model_keeps_no_gradients():
    """The model leaves training without its gradients (a second model-sized buffer)."""
    model = tiny_model()
    images, labels = make_data(n=40)
    train(model, images, labels)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.head[3].bias.fill_(float("nan"))
    with pytest.raises(FedradError, match="learning-rate"):  # diverges after a backward pass
        train(model, images, labels)
    assert all(p.grad is None for p in model.parameters())  # an error leaves none either


def test_lone_last_sample_is_left_out():
    # 33 = 2 x 16 + 1: a batch of one would break BatchNorm1d in training mode.
    images, labels = make_data(n=33)
    result = train(tiny_model(), images, labels)
    assert result.num_examples == 33
    assert result.images_per_second * result.seconds == pytest.approx(32, rel=1e-6)


def test_same_seed_same_weights_on_cpu():
    images, labels = make_data()
    a, b, c = tiny_model(7), tiny_model(7), tiny_model(7)
    ra = train(a, images, labels, epochs=2, seed=11)
    rb = train(b, images, labels, epochs=2, seed=11)
    train(c, images, labels, epochs=2, seed=12)
    assert ra.mean_loss == rb.mean_loss
    for (key, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), key
    assert not all(
        torch.equal(wa, wc)
        for wa, wc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


# --------------------------------------------------------------------------- augmentation


def _batch(images: np.ndarray) -> torch.Tensor:
    return normalize_batch(torch.from_numpy(images), torch.device("cpu"))


def test_random_affine_moves_each_image_within_its_ranges():
    rng = np.random.default_rng(0)
    images = np.zeros((6, 32, 32), dtype=np.uint8)
    images[:, 12:20, 12:20] = 255  # a bright square on black
    images[5] = rng.integers(0, 256, size=(32, 32))
    x = _batch(images)
    out = random_affine(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    black = float(_batch(np.zeros((1, 2, 2), np.uint8))[0, 0, 0, 0])
    white = float(_batch(np.full((1, 2, 2), 255, np.uint8))[0, 0, 0, 0])
    # outside the map is black, never below it; bilinear never overshoots white
    assert float(out.min()) >= black - 1e-5 and float(out.max()) <= white + 1e-5
    # every image changed, each differently; the square's area stays within the zoom range
    for i in range(5):
        assert not torch.allclose(out[i], x[i], atol=1e-3)
        bright = float(((out[i] - black) / (white - black)).sum())
        assert 64 * 0.85**2 * 0.9 <= bright <= 64 * 1.15**2 * 1.1, (i, bright)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    # the same generator seed, the same maps; another seed, other maps
    again = random_affine(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    other = random_affine(x, torch.Generator().manual_seed(4))
    assert not torch.allclose(out, other, atol=1e-3)


def test_random_affine_keeps_laterality():
    """No flips: a bright left half stays mostly on the left."""
    images = np.zeros((16, 32, 32), dtype=np.uint8)
    images[:, :, :16] = 255
    out = random_affine(_batch(images), torch.Generator().manual_seed(0))
    left, right = out[..., :16].mean(dim=(1, 2, 3)), out[..., 16:].mean(dim=(1, 2, 3))
    assert bool((left > right).all())


def test_affine_augmentation_trains_reproducibly_and_differs_from_none():
    images, labels = make_data()
    a, b, c = tiny_model(5), tiny_model(5), tiny_model(5)
    ra = train(a, images, labels, epochs=2, augment="affine")
    rb = train(b, images, labels, epochs=2, augment="affine")
    rc = train(c, images, labels, epochs=2, augment="none")
    assert ra.mean_loss == rb.mean_loss and np.isfinite(ra.mean_loss)
    for (key, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), key
    assert ra.mean_loss != rc.mean_loss
    with pytest.raises(ConfigError, match="augment must be one of none, affine"):
        train(tiny_model(), images, labels, augment="mixup")


def _distance(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    return (
        sum(float((p.detach() - start[name]).pow(2).sum()) for name, p in model.named_parameters())
        ** 0.5
    )


def test_proximal_term_keeps_weights_near_the_start():
    images, labels = make_data()
    free, prox = tiny_model(3), tiny_model(3)
    start = {k: v.detach().clone() for k, v in free.named_parameters()}
    train(free, images, labels, epochs=3)
    result = train(prox, images, labels, epochs=3, proximal_mu=5.0)
    assert np.isfinite(result.mean_loss)
    assert 0 < _distance(prox, start) < 0.7 * _distance(free, start)


def test_registry_model_trains_and_stays_float32_on_cpu():
    images, labels = make_data(n=8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # 16 px
    model = get_model("resnet18", num_classes=2, image_size=16, stem="standard")
    result = train(model, images, labels, batch_size=4, max_batches=2)
    assert np.isfinite(result.mean_loss)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.training


def test_memmap_input(tmp_path):
    images, labels = make_data(n=32)
    path = tmp_path / "images.u8"
    stored = np.memmap(path, dtype=np.uint8, mode="w+", shape=images.shape)
    stored[:] = images
    stored.flush()
    readonly = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)
    result = train(tiny_model(), readonly, labels)
    assert result.num_examples == 32
    scores = predict_scores(tiny_model(), readonly, device="cpu", batch_size=5)
    assert scores.shape == (32, 2)


# --------------------------------------------------------------------------- errors


def test_empty_dataset():
    images = np.zeros((0, SIZE, SIZE), dtype=np.uint8)
    with pytest.raises(FedradError) as info:
        train(tiny_model(), images, np.zeros(0, dtype=np.int64))
    assert info.value.code == "empty-dataset"


def test_nan_loss_is_reported_as_divergence():
    images, labels = make_data(n=32)
    model = tiny_model()
    with torch.no_grad():
        model.head[3].bias.fill_(float("nan"))
    with pytest.raises(FedradError, match="learning-rate") as info:
        train(model, images, labels)
    assert info.value.code == "diverged"


def test_bad_inputs():
    images, labels = make_data(n=32)
    with pytest.raises(ConfigError, match="optimizer"):
        train(tiny_model(), images, labels, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="epochs"):
        train(tiny_model(), images, labels, epochs=0)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(tiny_model(), images, labels, learning_rate=0.0)
    for steps in (0, True, 2.5):
        with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
            train(tiny_model(), images, labels, steps=steps)
    for strength in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="logit_adjust must be a number >= 0"):
            train(tiny_model(), images, labels, logit_adjust=strength)
    with pytest.raises(FedradError, match="uint8") as info:
        train(tiny_model(), images.astype(np.float32) / 255, labels)
    assert info.value.code == "bad-dataset"
    with pytest.raises(FedradError, match="one per image"):
        train(tiny_model(), images, labels[:-1])
    with pytest.raises(FedradError, match="num-classes"):
        train(tiny_model(), images, labels + 1)  # labels 1..2 for a 2-class model
    with pytest.raises(FedradError, match=">= 0"):
        train(tiny_model(), images, labels - 1)


# --------------------------------------------------------------------------- prediction


def test_predict_scores_are_probabilities_in_order():
    images, labels = make_data(n=21)
    model = tiny_model()
    train(model, images, labels, epochs=3)
    model.train()
    scores = predict_scores(model, images, device="cpu", batch_size=8)
    assert scores.shape == (21, 2)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    assert (scores >= 0).all()
    assert model.training  # mode restored
    # Batching does not change the answer (eval mode: BatchNorm uses running statistics).
    single = predict_scores(model, images[5:6], device="cpu")
    np.testing.assert_allclose(single[0], scores[5], atol=1e-5)
    empty = predict_scores(model, images[:0], device="cpu")
    assert empty.shape == (0, 2)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_channels_last_training():
    images, labels = make_data(n=64)
    images = np.pad(images, ((0, 0), (10, 10), (10, 10)))  # 32 px
    device = select_device("cuda")
    model = get_model("resnet18", num_classes=2, image_size=32)
    result = train_local(
        model,
        images,
        labels,
        epochs=2,
        batch_size=16,
        learning_rate=0.05,
        optimizer="sgd",
        device=device,
        amp=True,
        channels_last=True,
        proximal_mu=0.01,
    )
    assert np.isfinite(result.mean_loss)
    assert result.num_examples == 64
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in params)
    assert all(p.is_contiguous() for p in params)  # state dicts leave in the default layout
    scores = predict_scores(model, images, device=device)
    assert scores.dtype == np.float64 and scores.shape == (64, 2)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pinned_staging_path_matches_device_resident(monkeypatch):
    import fedrad.common.training as training

    images, labels = make_data(n=50)
    device = select_device("cuda")
    model = tiny_model()
    train_local(
        model,
        images,
        labels,
        epochs=1,
        batch_size=16,
        learning_rate=0.05,
        optimizer="sgd",
        device=device,
    )
    resident = predict_scores(model, images, device=device, batch_size=16, amp=False)
    monkeypatch.setattr(training, "DEVICE_RESIDENT_FRACTION", 0.0)  # too big: stage on host
    staged = predict_scores(model, images, device=device, batch_size=16, amp=False)
    np.testing.assert_allclose(staged, resident, atol=1e-6)
    result = train_local(
        model,
        images,
        labels,
        epochs=2,
        batch_size=16,
        learning_rate=0.05,
        optimizer="sgd",
        device=device,
    )
    assert np.isfinite(result.mean_loss)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 2),  # docker run --cpus 1.5: two threads
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity mask
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cpu_budget_honours_a_container_quota(tmp_path, files, expected) -> None:
    import os

    from fedrad.common.training import cpu_budget

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    assert cpu_budget(str(tmp_path)) == (cores if expected is None else min(cores, expected))
