"""Which pixels a prediction used: Grad-CAM and SmoothGrad saliency (images in, heatmaps
out) and a heatmap drawn over an image (gradcam_figure.py draws the run figure
`gradcam.png` with them).

    >>> maps = gradcam(model, x)                 # doctest: +SKIP
    >>> maps.shape                               # doctest: +SKIP
    torch.Size([8, 28, 28])
    >>> rgb = overlay_heatmap(images[0], maps[0].numpy())   # (28, 28, 3) uint8  # doctest: +SKIP

Images go in exactly as the model sees them: float32 (N, C, H, W), already scaled and padded
(data.arrays.to_tensor). Both maps explain one class per image, by default the predicted one.

- Grad-CAM (Selvaraju et al. 2017): the output A (N, K, h, w) of one Conv2D layer (the last
  by default) with its activation, as Keras' Conv2D output includes it; each channel weighted
  by the mean gradient of the class's logit over its positions; ReLU of the weighted sum,
  upsampled (bilinear) to the input's size, each map stretched to [0, 1].
- SmoothGrad (Smilkov et al. 2017): |d logit / d input| averaged over `samples` noisy copies
  of the image, the largest over channels, each map stretched to [0, 1]. Any model.

Neither changes the model: an accelerated model (models.cpu_pass) is explained through a
plain copy (its fused C kernels compute no gradient through the block they fuse), and the
gradients are taken with torch.autograd.grad, so no parameter's .grad is touched.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from ..errors import UserError
from ..models.build import KerasSequential, with_relu
from ..models.modules import KerasSamePool2d
from ..models.cpu_pass import is_accelerated, plain
from ..models.modules import SeparableConv2d
from ..training.loop import module_device
from .image_figures import _ACTIVATIONS
from .receptive_field import layer_output, map_centres, resample_to_input

CHUNK = 256  # images per forward/backward pass: bounds the memory of the saved activations
HEATMAP_CMAP = "jet"  # blue (cold) to red (hot), as in the Grad-CAM paper's figures


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each convolution layer Grad-CAM can explain, in the model's order:
    every nn.Conv2d and every SeparableConv2d (counted once: its two convolutions are one
    Keras layer). A spec model's top-level layers go by their Keras names (conv2d_2)."""
    inner = {id(m) for s in model.modules() if isinstance(s, SeparableConv2d)
             for m in (s.depthwise, s.pointwise)}
    names = {}
    if isinstance(model, KerasSequential):
        for name, layer in zip(model.layer_names, model.layers):
            names[id(layer[0] if isinstance(layer, nn.Sequential) else layer)] = name
    return [(names.get(id(module), qualified), module)
            for qualified, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, SeparableConv2d)) and id(module) not in inner]


def conv_layer(model: nn.Module, layer: int | None) -> tuple[str, nn.Module]:
    """(name, module) of conv_layers(model)[layer] (None: the last); a UserError naming
    `layer` where the model has no Conv2D or the index is out of range."""
    layers = conv_layers(model)
    if not layers:
        raise UserError("Grad-CAM needs a Conv2D layer and this model has none; "
                        "saliency() explains any model", setting="layer")
    if layer is None:
        return layers[-1]
    if (isinstance(layer, bool) or not isinstance(layer, int)
            or not -len(layers) <= layer < len(layers)):
        raise UserError(f"layer must be 0 to {len(layers) - 1} (or -1 for the last): this "
                        f"model has {len(layers)} Conv2D layers, got {layer!r}", setting="layer")
    return layers[layer]


def explained_copy(model: nn.Module) -> nn.Module:
    """The model to take gradients through: a plain copy of an accelerated model (its fused
    first block computes no gradient, and a ReLU it moved after a Flatten would hide the
    layer's output); any other model itself."""
    return plain(copy.deepcopy(model)) if is_accelerated(model) else model


def _output_hook(model: nn.Module, module: nn.Module, store: list):
    """Register a forward hook that appends the layer's output with its activation to `store`.

    The activation is the next module of the same nn.Sequential where that is one (used only
    there): build_layer's (conv, ReLU) pairs. Where the builder moved a conv's ReLU after the
    max pool that follows it (build._pool_before_relu), the hook returns relu(conv output)
    instead of the output: maxpool(relu(z)) then ReLU computes the same values and gradients,
    and the gradient then reaches the layer's own (post-ReLU) output."""
    parents = dict(model.named_modules())
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for name, m in model.named_modules():
        if m is not module:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = parents.get(parent_name)
        if isinstance(parent, nn.Sequential):
            children = list(parent._modules)
            index = children.index(child) + 1
            after = parent[index] if index < len(children) else None
            if isinstance(after, _ACTIVATIONS) and uses[id(after)] == 1:
                return after.register_forward_hook(lambda mod, inputs, out: store.append(out))
        if isinstance(model, KerasSequential) and parent is model.layers:
            i = int(child)
            after = model.layers[i + 1] if i + 1 < len(model.layers) else None
            if with_relu(after) and isinstance(after[0], nn.MaxPool2d):
                def relu_hook(mod, inputs, out):
                    out = torch.relu(out)
                    store.append(out)
                    return out
                return module.register_forward_hook(relu_hook)
        break
    return module.register_forward_hook(lambda mod, inputs, out: store.append(out))


# Layers between a Conv2D without an activation of its own and the activation of its block
# (fastnet: Conv2D, MaxPooling2D, BatchNormalization, Activation): shape-keeping or pooling.
_BLOCK_STEPS = (nn.MaxPool2d, nn.AvgPool2d, KerasSamePool2d, nn.BatchNorm2d, nn.Dropout,
                nn.Dropout2d)


def _block_output(model: nn.Module, module: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM explains for the conv `module`: the conv itself where
    its output includes its activation (Conv2D(activation="relu"), or a ReLU the builder moved
    after the next max pool), else, in a spec model, its block's activation: the first
    activation layer after it, across pools, BatchNormalization and Dropout only. Grad-CAM
    needs the activated features: on a pre-activation output (before BatchNormalization)
    the weighted sum is often negative everywhere, and its ReLU an empty map."""
    if not isinstance(model, KerasSequential):
        return module
    layers = list(model.layers)
    index = next((i for i, layer in enumerate(layers)
                  if layer is module or (isinstance(layer, nn.Sequential) and layer[0] is module)),
                 None)
    if index is None or with_relu(layers[index]) or (
            index + 1 < len(layers) and with_relu(layers[index + 1])
            and isinstance(layers[index + 1][0], nn.MaxPool2d)):
        return module
    for layer in layers[index + 1:]:
        if isinstance(layer, _ACTIVATIONS):
            return layer
        if not isinstance(layer, _BLOCK_STEPS):
            break
    return module


def _check_images(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"images: expected a float tensor (N, C, H, W) as the model sees it, got "
                        f"{x.dtype} {tuple(x.shape)}", setting="images")
    return x


def _check_target(target, n: int, classes: int, device) -> torch.Tensor:
    t = torch.as_tensor(target).long().reshape(-1).to(device)
    if len(t) != n:
        raise UserError(f"target: expected {n} class indices (one per image), got {len(t)}",
                        setting="target")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= classes):
        raise UserError(f"target: class indices must be 0 to {classes - 1}, got "
                        f"{int(t.min())}..{int(t.max())}", setting="target")
    return t


def _targets(target, logits: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """The classes to explain for the chunk of images from `start` whose logits (n', classes)
    are given: the caller's `target` (checked against all n images), or the predicted ones."""
    if target is None:
        return logits.argmax(1)
    t = _check_target(target, n, logits.shape[1], logits.device)
    return t[start:start + len(logits)]


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map (N, H, W) stretched to [0, 1] (min to 0, max to 1); a flat map becomes 0."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


SATURATE = 0.99  # saliency: values above each map's 99th percentile show as its maximum


def _saturate(maps: torch.Tensor) -> torch.Tensor:
    """Each map (N, H, W) clipped at its SATURATE quantile: input gradients have a few sharp
    peaks, which would otherwise leave the rest of the map near zero (and near invisible)."""
    top = torch.quantile(maps.flatten(1), SATURATE, dim=1).view(-1, 1, 1)
    return torch.minimum(maps, top)


class _GradientMode:
    """Gradients on, whatever the caller's context (torch.no_grad, inference_mode, autocast);
    `model` the one to explain through (explained_copy, made here: a copy made in inference
    mode would hold inference tensors, which autograd refuses), in eval mode; its training
    mode restored after."""

    def __init__(self, model: nn.Module):
        self.original = model

    def __enter__(self):
        self.device = module_device(self.original)
        with contextlib.ExitStack() as stack:
            for context in (torch.inference_mode(False), torch.enable_grad(),
                            torch.autocast(self.device.type, enabled=False)):
                stack.enter_context(context)
            self.model = explained_copy(self.original)
            self.was_training = self.model.training
            self.model.eval()
            stack.callback(self.model.train, self.was_training)
            self.stack = stack.pop_all()  # left open until __exit__
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def gradcam(model: nn.Module, images, target=None, layer: int | None = None) -> torch.Tensor:
    """Grad-CAM heatmaps (N, H, W) float32 in [0, 1] on the CPU, at the input's size.

    images: float32 (N, C, H, W) as the model sees them. target: the class (N,) to explain
    for each image, default the predicted one. layer: index into conv_layers(model) (the
    Conv2D layers in order; negative counts from the end), default the last; a UserError
    naming `layer` when out of range or when the model has no Conv2D.

    >>> import fashion_cnn as fc
    >>> gradcam(fc.build_model(fc.get_model_spec("model1")), torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 28, 28])
    """
    x_all = _check_images(images)
    conv_layer(model, layer)  # refused before any copy
    outputs = []
    with _GradientMode(model) as mode:
        work = mode.model
        _, module = conv_layer(work, layer)
        module = _block_output(work, module)
        centres = map_centres(work, module, tuple(x_all.shape)) if len(x_all) else None
        store: list[torch.Tensor] = []
        handle = _output_hook(work, module, store)
        try:
            for start in range(0, len(x_all), CHUNK):
                store.clear()
                x = x_all[start:start + CHUNK].to(mode.device, torch.float32).clone()
                # the input needs a gradient so that the layer's output is in the graph even
                # when every parameter is frozen; its own gradient is never computed
                x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
                logits = work(x)
                t = _targets(target, logits, len(x_all), start)
                if not store or store[-1].dim() != 4:
                    raise UserError("layer: the chosen Conv2D layer did not run in the model's "
                                    "forward pass", setting="layer")
                act = store[-1]  # (n, K, h, w)
                # each image's score depends only on its own activations (eval mode), so the
                # gradient of the sum is each image's own gradient
                score = logits.float().gather(1, t[:, None]).sum()
                grad, = torch.autograd.grad(score, act)
                weights = grad.float().mean(dim=(2, 3), keepdim=True)        # (n, K, 1, 1)
                cam = torch.relu((weights * act.detach().float()).sum(1, keepdim=True))
                cam = resample_to_input(cam, centres, tuple(x.shape[2:]))
                outputs.append(_unit(cam[:, 0]).cpu())
        finally:
            handle.remove()
    if not outputs:
        return torch.zeros((0,) + tuple(x_all.shape[2:]), dtype=torch.float32)
    return torch.cat(outputs).contiguous()


def saliency(model: nn.Module, images, target=None, samples: int = 16, noise: float = 0.15,
             seed: int = 0) -> torch.Tensor:
    """SmoothGrad saliency (N, H, W) float32 in [0, 1] on the CPU: |d logit / d input|
    averaged over `samples` copies of each image with Gaussian noise of standard deviation
    `noise` x (the image's max - min), the largest over channels, each map stretched to
    [0, 1] with its top 1 % saturated (SATURATE). The noise comes from a
    torch.Generator seeded with `seed` (drawn on the CPU), so a call is reproducible on any
    device. noise=0 and samples=1: the plain input gradient. Works for any model.

    >>> import fashion_cnn as fc
    >>> saliency(fc.build_model(fc.get_model_spec("dense")), torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 28, 28])
    """
    x_all = _check_images(images)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"samples={samples!r}: must be a whole number of at least 1",
                        setting="samples")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise UserError(f"noise={noise!r}: must be a finite fraction >= 0 of the image's range",
                        setting="noise")
    generator = torch.Generator().manual_seed(int(seed))
    outputs = []
    with _GradientMode(model) as mode:
        work = mode.model
        for start in range(0, len(x_all), CHUNK):
            # a copy: the caller's tensor may be an inference tensor, which autograd refuses
            x = x_all[start:start + CHUNK].to(mode.device, torch.float32).clone()
            with torch.no_grad():
                logits = work(x.contiguous(memory_format=torch.channels_last))
            t = _targets(target, logits, len(x_all), start)
            span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
            total = torch.zeros_like(x)
            for _ in range(samples):
                eps = torch.randn(x.shape, generator=generator).to(mode.device)
                noisy = (x + noise * span * eps).contiguous(memory_format=torch.channels_last)
                noisy.requires_grad_(True)
                score = work(noisy).float().gather(1, t[:, None]).sum()
                grad, = torch.autograd.grad(score, noisy)
                total += grad.float().abs()
            outputs.append(_unit(_saturate((total / samples).amax(dim=1))).cpu())
    if not outputs:
        return torch.zeros((0,) + tuple(x_all.shape[2:]), dtype=torch.float32)
    return torch.cat(outputs).contiguous()


def overlay_heatmap(image, heatmap, alpha: float = 0.5, *,
                    cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """`heatmap` (h, w) in [0, 1], resized to the image's size (Pillow bilinear) and coloured
    with matplotlib's `cmap`, blended over `image`: (1 - alpha) x image + alpha x colour.

    image: (H, W) or (H, W, 3), uint8 or float in [0, 1]. Returns (H, W, 3) uint8 RGB.

    >>> overlay_heatmap(np.zeros((28, 28), np.uint8), np.ones((7, 7))).shape
    (28, 28, 3)
    """
    from PIL import Image

    picture = np.asarray(image)
    if picture.ndim == 3 and picture.shape[2] in (1, 4):
        picture = picture[..., :1] if picture.shape[2] == 1 else picture[..., :3]
    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[..., 0]
    if picture.ndim not in (2, 3) or picture.shape[2:] not in ((), (3,)) or not picture.size:
        raise UserError(f"image: expected (H, W) or (H, W, 3), got {picture.shape}",
                        setting="image")
    rgb = (picture.astype(np.float32) / 255.0 if picture.dtype == np.uint8
           else np.nan_to_num(picture.astype(np.float32)).clip(0.0, 1.0))
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or not heat.size:
        raise UserError(f"heatmap: expected (h, w), got {heat.shape}", setting="heatmap")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha={alpha!r}: must be 0 to 1", setting="alpha")
    height, width = rgb.shape[:2]
    heat = np.nan_to_num(heat).clip(0.0, 1.0)
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(
            (width, height), Image.Resampling.BILINEAR)).clip(0.0, 1.0)
    colour = colormaps[cmap](heat)[..., :3].astype(np.float32)
    blend = (1.0 - alpha) * rgb + alpha * colour
    return (blend.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)


def explain_maps(model: nn.Module, x: torch.Tensor, target=None,
                 layer: int | None = None) -> tuple[torch.Tensor, str]:
    """Grad-CAM of `layer` (default the last Conv2D), or SmoothGrad saliency for a model
    without a Conv2D when no layer is asked for; and a name for what was drawn ("Grad-CAM of
    conv2d_2")."""
    if layer is None and not conv_layers(model):
        return saliency(model, x, target), "SmoothGrad saliency (the model has no Conv2D layer)"
    name, _ = conv_layer(model, layer)
    out = module = None
    if len(x):
        with _GradientMode(model) as mode:  # the plain copy's layer runs in every forward pass
            module = _block_output(mode.model, conv_layer(mode.model, layer)[1])
            out = layer_output(mode.model, module, x[:1].to(mode.device))
    size = f" ({out.shape[2]}x{out.shape[3]} map)" if out is not None else ""
    if module is not None and not isinstance(module, (nn.Conv2d, SeparableConv2d)):
        name = f"{name}'s block"  # explained after its pool, BatchNormalization and activation
    return gradcam(model, x, target, layer), f"Grad-CAM of {name}{size}"
