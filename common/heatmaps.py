"""Where the model looked: Grad-CAM for the CNNs, attention rollout for the transformer.

Every function returns one map per image, ``float32`` in [0, 1] at the model's input size,
higher where the evidence for the explained class is.  The method follows the model:

``gradcam`` (ResNet-18/50, DenseNet-121)
    Grad-CAM (Selvaraju et al., 2017) on the last convolutional block named in
    :data:`CAM_LAYERS`: the block's activations weighted by the spatial mean of the class
    score's gradient, summed over channels, ReLU, upsampled bilinearly to the input size.
    On small inputs the last block's map can be 1x1 or 2x2 (ResNet at 28 px with the
    standard stem: 1x1), which says nothing about where; :func:`cam_layer` then takes the
    deepest earlier block of :data:`CAM_FALLBACKS` whose map is at least
    :data:`MIN_CAM_SIDE` pixels a side.
``attention-rollout`` (vit_tiny)
    Attention rollout (Abnar and Zuidema, 2020): every encoder layer's attention, averaged
    over heads, mixed with the identity for the residual path (``0.5 A + 0.5 I``,
    rows renormalised) and multiplied through the layers; the class token's row over the
    patch tokens, as a patch grid upsampled to the input size.

Each map is min-max scaled per image (a map with no positive evidence is all zeros).
:func:`overlay_png` writes one map over its image as a PNG, :func:`heatmap_grid_png` a
figure of several (the paper's Figures 2-4).

Maps are computed in float32 (no autocast), in evaluation mode, and leave the model's
parameters, gradients and mode as they were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, FedradError

__all__ = [
    "CAM_LAYERS",
    "CAM_FALLBACKS",
    "MIN_CAM_SIDE",
    "cam_layer",
    "ATTENTION_MODELS",
    "heatmap_method",
    "grad_cam",
    "GradCam",
    "attention_maps",
    "attention_rollout",
    "rollout",
    "rollout_maps",
    "compute_heatmaps",
    "colorize",
    "overlay_png",
    "heatmap_grid_png",
]

#: The layer whose output Grad-CAM explains, per CNN of the registry: the last block before
#: global pooling (for DenseNet its final BatchNorm, before the functional ReLU).
CAM_LAYERS: dict[str, str] = {
    "resnet18": "layer4",
    "resnet50": "layer4",
    "densenet121": "features.norm5",
}

#: Earlier blocks Grad-CAM may explain instead when the last one's map is too small.
CAM_FALLBACKS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer3", "layer2", "layer1"),
    "resnet50": ("layer3", "layer2", "layer1"),
    "densenet121": ("features.denseblock3", "features.denseblock2", "features.denseblock1"),
}
#: The smallest side of a Grad-CAM map that still localises (see :func:`cam_layer`).
MIN_CAM_SIDE = 4

#: Registry models explained by attention rollout.
ATTENTION_MODELS: frozenset[str] = frozenset({"vit_tiny"})


def heatmap_method(model_name: str) -> str:
    """``"gradcam"`` or ``"attention-rollout"`` for a registry model name.

    Raises
    ------
    ConfigError
        For a model with no heatmap method (add it to :data:`CAM_LAYERS`).
    """
    if model_name in CAM_LAYERS:
        return "gradcam"
    if model_name in ATTENTION_MODELS:
        return "attention-rollout"
    raise ConfigError(
        f"no heatmap method for model {model_name!r}; CNNs need their last convolutional "
        f"block in CAM_LAYERS (known: {', '.join(sorted(CAM_LAYERS))}), transformers "
        f"ATTENTION_MODELS (known: {', '.join(sorted(ATTENTION_MODELS))})"
    )


def cam_layer(model: nn.Module, model_name: str, image_size: int) -> str:
    """The block Grad-CAM explains for ``model`` at ``image_size`` px.

    The last block of :data:`CAM_LAYERS`, unless its map is smaller than
    :data:`MIN_CAM_SIDE` a side; then the deepest block of :data:`CAM_FALLBACKS` that
    reaches it (the shallowest one when none does).  Found with one forward pass of a
    blank image.
    """
    if model_name not in CAM_LAYERS:
        heatmap_method(model_name)  # raises the clear error
    candidates = (CAM_LAYERS[model_name], *CAM_FALLBACKS.get(model_name, ()))
    modules = dict(model.named_modules())
    sides: dict[str, int] = {}
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: sides.__setitem__(name, min(out.shape[-2:])))
        for name in candidates if name in modules]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 1, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for name in candidates:
        if sides.get(name, 0) >= MIN_CAM_SIDE:
            return name
    return candidates[-1] if candidates[-1] in sides else candidates[0]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``[H, W]`` map of ``[B, H, W]`` to [0, 1]; flat maps become 0.

    A map whose spread is below float32 rounding of its values (a constant map upsampled
    from 1x1, say) counts as flat, so rounding noise is never stretched into a pattern.
    """
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)
    out = torch.where(span > 1e-5 * scale, (maps - lo) / span.clamp_min(1e-30),
                      torch.zeros_like(maps))
    return out.clamp_(0.0, 1.0)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(
            f"heatmaps need a normalised image batch of shape [B, C, H, W]; got {shape}"
        )


def _targets(logits: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None
             ) -> torch.Tensor:
    b, c = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b or int(t.min()) < 0 or int(t.max()) >= c:
        raise ConfigError(
            f"target must be a class index in 0..{c - 1} (one, or one per image of the "
            f"batch of {b}); got {target!r}"
        )
    return t


class _ModeGuard:
    """Evaluation mode, float32 and gradients on; restores the model's mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.grad = torch.enable_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        self.model.train(self.was_training)


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layer: str | nn.Module,
    target: int | Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of ``x`` for ``target`` (default: each image's predicted class).

    Parameters
    ----------
    model:
        A CNN classifier returning logits ``[B, C]``.
    x:
        Normalised input ``[B, C_in, H, W]`` on the model's device.
    layer:
        The explained layer: a module, or its dotted name in ``model.named_modules()``
        (see :data:`CAM_LAYERS`).  Its output must be ``[B, K, h, w]``.
    target:
        Class index, one per image, or None for the predicted class.

    Returns
    -------
    (maps, logits)
        ``maps``: float32 ``[B, H, W]`` in [0, 1] on ``x``'s device; ``logits``: the
        forward pass's ``[B, C]`` logits (detached).
    """
    _check_input(x)
    cam = GradCam(model, layer)
    with _ModeGuard(model):
        logits = cam.forward(x)
        maps = cam.maps(target)
    return maps, logits.detach()


class GradCam:
    """Grad-CAM in two steps, so one forward pass serves both prediction and explanation.

    :meth:`forward` runs the model with gradients recorded and keeps the explained layer's
    activations; :meth:`maps` then backpropagates the class score to them.  Call
    :meth:`forward` with the model in evaluation mode and gradients enabled (as
    :func:`grad_cam` does); parameters never receive gradients.

    Parameters
    ----------
    model:
        A CNN classifier returning logits ``[B, C]``.
    layer:
        The explained layer: a module or its dotted name (see :data:`CAM_LAYERS`).
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module) -> None:
        if isinstance(layer, str):
            modules = dict(model.named_modules())
            if layer not in modules:
                raise ConfigError(f"the model has no layer {layer!r} to explain with Grad-CAM")
            self.module = modules[layer]
        else:
            self.module = layer
        self.model = model
        self.layer_name = layer if isinstance(layer, str) else type(layer).__name__
        self._acts: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._size: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
        """Logits ``[B, C]`` of ``x`` (with the graph kept for :meth:`maps`).

        ``amp``: bf16 autocast (CUDA); the maps are then computed from bf16 activations.
        """
        _check_input(x)
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
            captured.append(out)
            # A clone, so that an in-place op after the layer (DenseNet's functional ReLU)
            # cannot overwrite the activations Grad-CAM weighs.
            return out.clone()

        handle = self.module.register_forward_hook(hook)
        try:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                enabled=amp):
                logits = self.model(x.detach().float())
        finally:
            handle.remove()
        if not captured or captured[-1].ndim != 4:
            raise ConfigError(
                f"Grad-CAM needs a layer with [B, K, h, w] output; {self.layer_name!r} gave "
                f"{tuple(captured[-1].shape) if captured else 'nothing'}"
            )
        self._acts, self._logits = captured[-1], logits
        self._size = (int(x.shape[-2]), int(x.shape[-1]))
        return logits

    def maps(self, target: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[B, H, W]`` maps in [0, 1] for ``target`` (default: predicted class)."""
        if self._acts is None or self._logits is None:
            raise ConfigError("GradCam.maps() needs a forward() first")
        acts, logits = self._acts, self._logits
        self._acts = self._logits = None  # one explanation per forward pass
        cls = _targets(logits.detach(), target)
        score = logits.float().gather(1, cls[:, None]).sum()
        (grads,) = torch.autograd.grad(score, acts)
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts.detach().float()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=self._size, mode="bilinear", align_corners=False)
        return _normalise(cam[:, 0])


def _vit_layers(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or not all(hasattr(b, "self_attention") for b in layers):
        raise ConfigError(
            "attention maps need a torchvision VisionTransformer (encoder.layers[*]"
            ".self_attention); this model is not one"
        )
    return list(layers)


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every encoder layer's attention weights for ``x``, and the logits.

    The model's attention modules are asked for their per-head weights through forward
    hooks (torchvision calls them with ``need_weights=False``); its outputs are unchanged.

    Returns
    -------
    (attentions, logits)
        One float32 ``[B, heads, T, T]`` tensor per layer (``T`` = 1 + patches, the class
        token first) and the ``[B, C]`` logits.
    """
    _check_input(x)
    layers = _vit_layers(model)
    weights: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def post(_m: nn.Module, _a: object, out: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        if out[1] is None:
            raise FedradError("no-attention", "the attention module returned no weights")
        weights.append(out[1].float())

    handles = []
    for block in layers:
        handles.append(block.self_attention.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.self_attention.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        logits = model(x.float())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return weights, logits


def rollout(attentions: Sequence[torch.Tensor], *, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through layers: ``prod_l (residual I + (1 - residual) mean_h A_l)``.

    Parameters
    ----------
    attentions:
        Per layer ``[B, heads, T, T]`` (or ``[B, T, T]``, already fused) row-stochastic
        attention, first layer first.
    residual:
        Weight of the identity (the residual connection), in [0, 1].

    Returns
    -------
    torch.Tensor
        ``[B, T, T]``: row ``i`` says how much of token ``i``'s last-layer representation
        flows from each input token.  Rows sum to 1.
    """
    if not attentions:
        raise ConfigError("rollout needs the attention of at least one layer")
    if not 0.0 <= residual <= 1.0:
        raise ConfigError(f"residual must be in [0, 1], got {residual!r}")
    result: torch.Tensor | None = None
    for att in attentions:
        a = att.mean(dim=1) if att.ndim == 4 else att
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None
    return result


def attention_rollout(
    model: nn.Module, x: torch.Tensor, *, residual: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-rollout maps of a VisionTransformer for ``x`` (class token over patches).

    Returns
    -------
    (maps, logits)
        float32 ``[B, H, W]`` in [0, 1] on ``x``'s device, and the ``[B, C]`` logits.
    """
    attentions, logits = attention_maps(model, x)
    return rollout_maps(attentions, tuple(x.shape[-2:]), residual=residual), logits


def rollout_maps(attentions: Sequence[torch.Tensor], size: tuple[int, int], *,
                 residual: float = 0.5) -> torch.Tensor:
    """The class token's rollout over the patch grid, upsampled to ``size``: ``[B, H, W]``."""
    flow = rollout(attentions, residual=residual)[:, 0, 1:]  # class token <- patches
    patches = flow.shape[-1]
    grid = int(round(patches**0.5))
    if grid * grid != patches:
        raise FedradError("bad-grid", f"{patches} patch tokens do not form a square grid")
    maps = flow.reshape(-1, 1, grid, grid).float()
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return _normalise(maps[:, 0])


def compute_heatmaps(
    model: nn.Module,
    model_name: str,
    x: torch.Tensor,
    *,
    target: int | Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The registry model's heatmaps for ``x``: float32 ``[B, H, W]`` in [0, 1].

    Grad-CAM explains ``target`` (default: the predicted class); attention rollout does
    not depend on the class, so ``target`` is ignored for the transformer.
    """
    method = heatmap_method(model_name)
    if method == "gradcam":
        layer = cam_layer(model, model_name, int(x.shape[-1]))
        maps, _ = grad_cam(model, x, layer=layer, target=target)
    else:
        maps, _ = attention_rollout(model, x)
    return maps


# ------------------------------------------------------------------------------ pictures


def _colormap(name: str) -> np.ndarray:
    try:
        from matplotlib import colormaps
    except ImportError as e:  # a dependency of fedrad; guard for trimmed installs
        raise FedradError(
            "missing-dependency", "heatmap pictures need matplotlib: pip install matplotlib"
        ) from e
    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _as_unit(image: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D [H, W] array; got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} holds NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def colorize(
    image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet",
    size: int | None = None,
) -> np.ndarray:
    """Blend a [0, 1] heatmap (coloured by ``cmap``) over a grey image; uint8 ``[H, W, 3]``.

    ``image`` is ``[H, W]``, uint8 or float in [0, 1]; ``heat`` is ``[H, W]`` in [0, 1] at
    the same size.  With ``size``, both are resized (bilinear) to ``size x size`` first.
    """
    from PIL import Image

    img = _as_unit(image, "image")
    hm = _as_unit(heat, "heat")
    if img.shape != hm.shape:
        raise ConfigError(f"image {img.shape} and heatmap {hm.shape} must have the same shape")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
    if size is not None and img.shape != (size, size):
        def _resize(a: np.ndarray) -> np.ndarray:
            pic = Image.fromarray(a.astype(np.float32), mode="F")
            return np.asarray(pic.resize((size, size), Image.Resampling.BILINEAR))

        img, hm = np.clip(_resize(img), 0, 1), np.clip(_resize(hm), 0, 1)
    lut = _colormap(cmap)
    coloured = lut[np.rint(hm * 255).astype(np.uint8)].astype(np.float32)
    grey = (img * 255.0)[..., None]
    # The heat colour shows where the map is high; the radiograph stays visible elsewhere.
    weight = (alpha * hm)[..., None]
    out = grey * (1.0 - weight) + coloured * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_png(
    path: str | os.PathLike[str], image: np.ndarray, heat: np.ndarray, *,
    alpha: float = 0.6, cmap: str = "jet", size: int = 256,
) -> Path:
    """Write ``image`` with ``heat`` over it as an RGB PNG of ``size x size``; returns the path.

    Left half: the image as the model saw it; right half: the overlay (so the finding is
    not hidden under the colour).
    """
    from PIL import Image

    path = Path(path)
    img = _as_unit(image, "image")
    grey = colorize(img, np.zeros_like(img), alpha=0.0, size=size)
    over = colorize(img, heat, alpha=alpha, cmap=cmap, size=size)
    gap = np.full((size, 4, 3), 255, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([grey, gap, over], axis=1)).save(path, format="PNG")
    return path


def heatmap_grid_png(
    path: str | os.PathLike[str],
    images: Sequence[np.ndarray],
    heats: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    suptitle: str = "",
    alpha: float = 0.6,
    cmap: str = "jet",
    columns: int = 4,
) -> Path:
    """A figure of images over their heatmaps (two rows per row of ``columns``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    if not (len(images) == len(heats) == len(titles)) or not images:
        raise ConfigError(
            f"give as many images, heatmaps and titles (at least one); got {len(images)}, "
            f"{len(heats)}, {len(titles)}"
        )
    n = len(images)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(2.4 * cols, 2.5 * 2 * rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, hm, title) in enumerate(zip(images, heats, titles, strict=True)):
        r, c = divmod(i, cols)
        axes[2 * r, c].imshow(_as_unit(img, "image"), cmap="gray", vmin=0, vmax=1)
        axes[2 * r, c].set_title(title, fontsize=8)
        axes[2 * r + 1, c].imshow(colorize(img, hm, alpha=alpha, cmap=cmap))
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
