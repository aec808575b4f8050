"""Model registry: the networks a federation can train.

Torchvision-style: :func:`list_models` names what is available and :func:`get_model` builds
one with keyword-only arguments::

    model = get_model("densenet121", num_classes=2, in_channels=1, image_size=64)

Every model takes ``in_channels``-channel input (1 for greyscale radiographs) through a
replaced first convolution, and is built with random weights: nothing is ever downloaded.
A local state dict (for example torchvision's ImageNet weights saved by the site) can be
loaded with ``weights_path``; 3-channel first-layer weights are summed into one channel.

``stem`` picks the first layers of the CNNs:

``"standard"``
    torchvision's 7x7 stride-2 convolution followed by a 3x3 stride-2 max-pool (input / 4).
``"small"``
    a 3x3 stride-1 convolution and no max-pool, as MedMNIST and CIFAR models use for 28-64 px
    inputs; about 16x the compute of ``"standard"`` at the same input size.
``"auto"``
    ``"small"`` when ``image_size <= 32``, else ``"standard"``.

The vision transformer embeds patches instead, so ``stem`` does not change it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from .config import Settings
from .errors import ConfigError, FedradError

__all__ = [
    "list_models",
    "model_from_settings",
    "norm_state_keys",
    "get_model",
    "load_weights",
    "resolve_stem",
    "vit_patch_size",
    "STEMS",
]

logger = logging.getLogger(__name__)

STEMS: tuple[str, ...] = ("auto", "standard", "small")

# vit_tiny: DeiT-Tiny's width (192, 3 heads, MLP 768) with half its depth so it trains on a CPU.
VIT_TINY_HIDDEN = 192
VIT_TINY_LAYERS = 6
VIT_TINY_HEADS = 3
VIT_TINY_MLP = 768


@dataclass(frozen=True)
class _Spec:
    builder: Callable[[int, int, int, str], nn.Module]
    first_conv: str  # state-dict key of the first convolution's weight
    classifier: str  # state-dict key prefix of the classification head
    description: str
    #: built on the meta device when its weights are to be loaded (``initialise=False``):
    #: worth it where the random initialisation is most of the build (ResNet-18 on one
    #: core: 90 ms built, 16 ms as a shell), not where building the modules is (DenseNet-121:
    #: ~70 ms either way, plus 15 ms to give the shell its storage)
    shell_on_meta: bool = True


def _kaiming_conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, padding: int
) -> nn.Conv2d:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size=kernel, stride=stride, padding=padding, bias=False
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _stem_conv(in_channels: int, out_channels: int, stem: str) -> nn.Conv2d:
    if stem == "small":
        return _kaiming_conv(in_channels, out_channels, 3, 1, 1)
    return _kaiming_conv(in_channels, out_channels, 7, 2, 3)


def _build_resnet(arch: str) -> Callable[[int, int, int, str], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, stem: str) -> nn.Module:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        model.conv1 = _stem_conv(in_channels, model.conv1.out_channels, stem)
        if stem == "small":
            model.maxpool = nn.Identity()
        return model

    return build


def _stem_output_size(image_size: int, stem: str) -> int:
    if stem == "small":
        return image_size
    after_conv = (image_size + 2 * 3 - 7) // 2 + 1
    return (after_conv + 2 * 1 - 3) // 2 + 1


def _build_densenet(arch: str) -> Callable[[int, int, int, str], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, stem: str) -> nn.Module:
        # Three 2x2 average-pool transitions follow the stem: they need 8 px to work on.
        if _stem_output_size(image_size, stem) < 8:
            smallest = 8 if stem == "small" else 29
            raise ConfigError(
                f"{arch} with the '{stem}' stem needs image-size >= {smallest}, got "
                f"{image_size}; use stem='small' or a larger image-size"
            )
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        old = model.features.conv0
        conv = _stem_conv(in_channels, old.out_channels, stem)
        nn.init.kaiming_normal_(conv.weight)  # torchvision's DenseNet initialisation
        model.features.conv0 = conv
        if stem == "small":
            model.features.pool0 = nn.Identity()
        return model

    return build


def vit_patch_size(image_size: int) -> int:
    """Patch size dividing ``image_size`` into a grid of 8x8 to 16x16 patches.

    The grid closest to 12x12 is chosen (224 px -> 16 px patches, 14x14 grid; 28 px -> 2 px,
    14x14; 64 px -> 8 px, 8x8), the fewer tokens on a tie.

    Raises
    ------
    ConfigError
        When no patch size divides ``image_size`` into such a grid (a prime size like 31).
    """
    candidates = [
        p for p in range(1, image_size + 1) if image_size % p == 0 and 8 <= image_size // p <= 16
    ]
    if not candidates:
        near = [
            s
            for s in range(max(8, image_size - 8), image_size + 9)
            if any(s % p == 0 and 8 <= s // p <= 16 for p in range(1, s + 1))
        ]
        raise ConfigError(
            f"vit_tiny needs an image-size that splits into 8 to 16 patches per side; "
            f"{image_size} does not. Nearby sizes that do: {', '.join(map(str, near[:6]))}"
        )
    return min(candidates, key=lambda p: (abs(image_size // p - 12), image_size // p))


def _build_vit_tiny(num_classes: int, in_channels: int, image_size: int, stem: str) -> nn.Module:
    patch = vit_patch_size(image_size)
    model = torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=patch,
        num_layers=VIT_TINY_LAYERS,
        num_heads=VIT_TINY_HEADS,
        hidden_dim=VIT_TINY_HIDDEN,
        mlp_dim=VIT_TINY_MLP,
        num_classes=num_classes,
    )
    conv = nn.Conv2d(in_channels, VIT_TINY_HIDDEN, kernel_size=patch, stride=patch)
    fan_in = in_channels * patch * patch
    nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))  # as torchvision does
    nn.init.zeros_(conv.bias)
    model.conv_proj = conv
    return model


_REGISTRY: dict[str, _Spec] = {
    "resnet18": _Spec(
        _build_resnet("resnet18"), "conv1.weight", "fc.", "torchvision ResNet-18 (11 M parameters)"
    ),
    "resnet50": _Spec(
        _build_resnet("resnet50"), "conv1.weight", "fc.", "torchvision ResNet-50 (24 M parameters)"
    ),
    "densenet121": _Spec(
        _build_densenet("densenet121"),
        "features.conv0.weight",
        "classifier.",
        "torchvision DenseNet-121 (7 M parameters)",
        shell_on_meta=False,
    ),
    "vit_tiny": _Spec(
        _build_vit_tiny,
        "conv_proj.weight",
        "heads.",
        "torchvision VisionTransformer, 6 layers, width 192, 3 heads (3 M "
        "parameters); patch size chosen for an 8x8 to 16x16 grid",
    ),
}


def list_models() -> list[str]:
    """Return the names :func:`get_model` accepts, sorted."""
    return sorted(_REGISTRY)


def resolve_stem(stem: str, image_size: int) -> str:
    """Return ``"standard"`` or ``"small"`` for a ``stem`` setting (``"auto"`` resolved)."""
    if stem not in STEMS:
        raise ConfigError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
    if stem == "auto":
        return "small" if image_size <= 32 else "standard"
    return stem


def get_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 64,
    stem: str = "auto",
    weights_path: str | os.PathLike[str] | None = None,
    initialise: bool = True,
) -> nn.Module:
    """Build a registered model with random weights, or with a local state dict.

    Parameters
    ----------
    name:
        A name from :func:`list_models`.
    num_classes:
        Outputs of the classification head (>= 2).
    in_channels:
        Input channels (1 for greyscale images).
    image_size:
        Square input size in pixels; the vision transformer is built for exactly this size.
    stem:
        ``"auto"``, ``"standard"`` or ``"small"`` (see the module documentation).
    weights_path:
        Optional local ``.pt``/``.pth`` state dict to start from (see :func:`load_weights`).
    initialise:
        False: the parameters and buffers are allocated but hold whatever memory held,
        for a caller that loads a complete state dict into the model next
        (``load_state_dict(..., strict=True)``) or only reads its keys and shapes.  The
        random initialisation is skipped (the model is built on the meta device and then
        given CPU storage), which is most of the time a ResNet takes to build.

    Returns
    -------
    torch.nn.Module
        The model, on the CPU, in float32, in training mode.

    Raises
    ------
    ConfigError
        For an unknown name, or a bad ``num_classes``, ``in_channels``, ``image_size`` or
        ``stem``.
    FedradError
        ``"bad-weights"`` when ``weights_path`` is missing, unreadable or does not fit.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"Unknown model {name!r}; choose one of: {', '.join(list_models())}")
    for key, value, minimum in (
        ("num_classes", num_classes, 2),
        ("in_channels", in_channels, 1),
        ("image_size", image_size, 8),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    resolved = resolve_stem(stem, image_size)
    if not initialise:
        if weights_path is not None and str(weights_path) != "":
            raise ValueError("a model built to have weights loaded into it (initialise=False) "
                             "cannot also start from weights_path")
        return _shell(spec, num_classes, in_channels, image_size, resolved)
    model = spec.builder(num_classes, in_channels, image_size, resolved)
    logger.debug(
        "built %s (stem %s, %d px, %d channels, %d classes)",
        name,
        resolved,
        image_size,
        in_channels,
        num_classes,
    )
    if weights_path is not None and str(weights_path) != "":
        load_weights(model, weights_path, name=name)
    return model


def _shell(spec: _Spec, num_classes: int, in_channels: int, image_size: int,
           stem: str) -> nn.Module:
    """``spec``'s model with storage for every tensor and no initialisation (see get_model)."""
    if not spec.shell_on_meta:
        return spec.builder(num_classes, in_channels, image_size, stem)
    with torch.device("meta"):
        model = spec.builder(num_classes, in_channels, image_size, stem)
    kept = set(model.state_dict())
    if any(name not in kept for name, _ in model.named_buffers()):
        # a buffer no state dict carries would keep the shell's garbage: build it for real
        return spec.builder(num_classes, in_channels, image_size, stem)
    return model.to_empty(device="cpu")


def _unwrap_state_dict(obj: object) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return None
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _adapt_first_conv(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Map first-layer weights onto the model's channel count; None when impossible."""
    if (
        weight.ndim != 4
        or weight.shape[0] != target.shape[0]
        or weight.shape[2:] != target.shape[2:]
    ):
        return None
    have, want = weight.shape[1], target.shape[1]
    if have == want:
        return weight
    if have == 3 and want == 1:
        # Greyscale transfer: a grey pixel g seen as RGB (g, g, g) gives the same response.
        return weight.sum(dim=1, keepdim=True)
    if have == 1:
        return weight.repeat(1, want, 1, 1) / want
    return None


def load_weights(
    model: nn.Module, weights_path: str | os.PathLike[str], *, name: str | None = None
) -> list[str]:
    """Load a local state dict into ``model`` in place.

    The first convolution is adapted when the channel count differs (3 -> 1 by summing over
    the input channels, 1 -> C by spreading); classification-head tensors whose shape differs
    (a different number of classes) are skipped and keep their random initialisation.  A
    first convolution with another kernel size (``"small"`` stem vs ImageNet weights) is also
    skipped, with a warning.  Any other missing, extra or mismatched tensor is an error: the
    file is for another architecture (or another image size, for the vision transformer).

    Parameters
    ----------
    model:
        A model built by :func:`get_model`.
    weights_path:
        A ``.pt``/``.pth`` file holding a state dict (``torch.save(model.state_dict(), p)``);
        a checkpoint dict with a ``"state_dict"``/``"model_state_dict"``/``"model"`` entry and
        ``module.``-prefixed keys are also accepted.  Read with ``weights_only=True``.
    name:
        The registry name of ``model``, which tells where its first conv and head are; found
        from the model's layout when omitted.

    Returns
    -------
    list[str]
        The state-dict keys that were skipped (kept their initial values).

    Raises
    ------
    FedradError
        ``"bad-weights"``: the file is missing or unreadable, holds no state dict, or does
        not fit the model.  The message names no path (the path is in ``local_detail``).
    """
    path = Path(weights_path)
    spec = _REGISTRY.get(name) if name else None
    expected = (
        f"a state dict for {name or 'this model'} saved with torch.save(model.state_dict(), path)"
    )
    if not path.is_file():
        raise FedradError(
            "bad-weights",
            f"The weights file does not exist; expected {expected}. Check the "
            "weights-path setting in the site's configuration.",
            local_detail=f"missing weights file: {path}",
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise FedradError(
            "bad-weights",
            f"The weights file could not be read ({type(e).__name__}); expected {expected}.",
            local_detail=f"torch.load failed for {path}: {e}",
        ) from e
    source = _unwrap_state_dict(raw)
    if source is None:
        raise FedradError(
            "bad-weights",
            f"The weights file holds no tensors; expected {expected}.",
            local_detail=f"no state dict in {path} (type {type(raw).__name__})",
        )

    target = model.state_dict()
    first_conv = (
        spec.first_conv
        if spec
        else next((k for k, v in target.items() if k.endswith("weight") and v.ndim == 4), "")
    )
    classifier = spec.classifier if spec else ""
    if not classifier:
        last_key = next(reversed(target))
        classifier = last_key.rsplit(".", 1)[0] + "."

    loadable: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    problems: list[str] = []
    for key, want in target.items():
        if key not in source:
            if key.startswith(classifier):
                skipped.append(key)
            else:
                problems.append(f"{key} missing")
            continue
        have = source[key]
        if key == first_conv:
            adapted = _adapt_first_conv(have, want)
            if adapted is None:
                logger.warning(
                    "weights: first convolution %s has shape %s, the model needs %s;"
                    " it keeps its random initialisation",
                    key,
                    tuple(have.shape),
                    tuple(want.shape),
                )
                skipped.append(key)
            else:
                if adapted.shape[1] != have.shape[1]:
                    logger.info(
                        "weights: first convolution adapted from %d to %d input channels",
                        have.shape[1],
                        want.shape[1],
                    )
                loadable[key] = adapted
            continue
        if have.shape != want.shape:
            if key.startswith(classifier):
                skipped.append(key)
            else:
                problems.append(
                    f"{key} has shape {tuple(have.shape)}, expected {tuple(want.shape)}"
                )
            continue
        loadable[key] = have
    unexpected = [k for k in source if k not in target]
    problems.extend(f"{k} unexpected" for k in unexpected)

    if not loadable or problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        detail = shown if problems else "no tensor name matches the model"
        raise FedradError(
            "bad-weights",
            f"The weights file does not fit the model ({detail}); expected "
            f"{expected}, with the same model name and image size.",
            local_detail=f"weights file {path}: {len(problems)} mismatches",
        )
    classifier_skipped = [k for k in skipped if k.startswith(classifier)]
    if classifier_skipped:
        logger.info(
            "weights: classifier layers kept their random initialisation (shape "
            "differs or absent): %s",
            ", ".join(classifier_skipped),
        )
    model.load_state_dict(loadable, strict=False)
    logger.info("weights: loaded %d of %d tensors", len(loadable), len(target))
    return skipped


def model_from_settings(settings: Settings, *, weights_path: str | None = None,
                        initialise: bool = True) -> nn.Module:
    """Build the run's model: ``settings.model`` with its classes, input size and stem.

    ``initialise=False``: a shell to load a complete state dict into (see :func:`get_model`).
    """
    return get_model(settings.model, num_classes=settings.num_classes, in_channels=1,
                     image_size=settings.image_size, stem=settings.stem,
                     weights_path=weights_path, initialise=initialise)


#: Module types whose parameters and buffers FedBN keeps at each site.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def norm_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of ``model``'s normalisation layers (BatchNorm, LayerNorm, GroupNorm).

    Their weights, biases and running statistics: what FedBN keeps at each site.
    """
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            prefix = f"{name}." if name else ""
            keys.extend(prefix + k for k in module.state_dict(keep_vars=True))
    return keys
