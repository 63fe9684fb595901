"""The registry of backbones and the classifier built on them.

Every classifier takes the screening contract as input: a float32 (H, W, 1)
unit image from :mod:`cxrscreen.normalise`. The conversion to what each
backbone's ImageNet weights expect (3 channels, its own scaling) is a layer
inside the model, so the saved ``.keras`` file is self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import lite

# input scaling modes: how a unit image u in [0, 1] becomes the backbone's input
#   lite: (255u - 127) / 128;  tf: 2u - 1;  torch: (u - mean) / std;  caffe: 255u - BGR mean;  raw255: 255u
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CAFFE_MEAN = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Backbone:
    name: str
    app: str          # keras.applications constructor name, or "" for the project's own
    scaling: str
    top_fraction: float = 0.25    # share of backbone layers unfrozen in phase 2
    lite: str = ""    # the project's own EfficientNet-Lite variant ("lite0", "lite2"), when app is ""


BACKBONES = {b.name: b for b in (
    Backbone("efficientnet_lite0", "", "lite", 0.30, lite="lite0"),
    Backbone("efficientnet_lite2", "", "lite", 0.30, lite="lite2"),
    Backbone("densenet121", "DenseNet121", "torch", 0.15),
    Backbone("resnet50v2", "ResNet50V2", "tf", 0.2),
    Backbone("resnet101v2", "ResNet101V2", "tf", 0.15),
    Backbone("vgg16", "VGG16", "caffe", 0.3),
    Backbone("convnext_tiny", "ConvNeXtTiny", "raw255", 0.15),
    Backbone("convnext_base", "ConvNeXtBase", "raw255", 0.1),
    Backbone("efficientnetv2b0", "EfficientNetV2B0", "raw255", 0.25),
    Backbone("mobilenetv2", "MobileNetV2", "tf", 0.3),
)}


class WeightsUnavailable(RuntimeError):
    """ImageNet weights cannot be had: offline and no --weights file."""


def weights_status(name: str) -> str:
    """A line for ``python -m training backbones``: where this backbone's ImageNet weights come from."""
    backbone = BACKBONES[name]
    if not backbone.app:
        path = lite.VARIANTS[backbone.lite].default_weights
        return f"present ({path.name})" if path.is_file() else \
            f"missing: run `python -m training convert-lite --variant {backbone.lite}`"
    cache = Path.home() / ".keras" / "models"
    cached = sorted(cache.glob(f"{backbone.app.lower()}*")) if cache.is_dir() else []
    cached += sorted(cache.glob(f"*{backbone.app.lower().replace('v2', '_v2')}*")) if cache.is_dir() else []
    return f"present (cached {cached[0].name})" if cached else "download on first use (needs the internet) or --weights FILE"


def _scaling_layers(x, mode: str):
    from keras import layers

    x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    if mode == "lite":
        return layers.Rescaling(255.0 / lite.INPUT_SCALE, offset=-lite.INPUT_OFFSET / lite.INPUT_SCALE,
                                name="input_scale")(x)
    if mode == "tf":
        return layers.Rescaling(2.0, offset=-1.0, name="input_scale")(x)
    if mode == "torch":
        return layers.Normalization(mean=list(_TORCH_MEAN), variance=[s * s for s in _TORCH_STD],
                                    name="input_scale")(x)
    if mode == "caffe":
        x = layers.Rescaling(255.0, name="input_to_255")(x)
        return layers.Normalization(mean=list(_CAFFE_MEAN), variance=[1.0, 1.0, 1.0], name="input_scale")(x)
    return layers.Rescaling(255.0, name="input_scale")(x)


def build_classifier(name: str, input_size: tuple[int, int] = (224, 224), *, weights: str | None = "imagenet",
                     dropout: float = 0.3, seed: int = 1337):
    """Backbone + global average pooling + dropout + one sigmoid unit (P(pneumonia)).

    ``weights``: ``"imagenet"`` (Lite0: the converted file under models/; keras.applications:
    Keras' download), a path to a weights file, or None (random init, for tests).
    Returns ``(model, backbone_layer_names)``.
    """
    import keras
    from keras import layers

    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    backbone = BACKBONES[name]
    inputs = keras.Input((*input_size, 1), name="unit_gray")
    x = _scaling_layers(inputs, backbone.scaling)
    before = None
    if not backbone.app:
        features = lite.lite_features(x, backbone.lite)
        model = keras.Model(inputs, features)
        names = [layer.name for layer in model.layers if layer.name.startswith(f"{backbone.lite}_")]
        if weights:
            lite.load_imagenet_weights_into(model, None if weights == "imagenet" else weights, backbone.lite)
    else:
        constructor = getattr(keras.applications, backbone.app)
        try:
            base = constructor(include_top=False, weights=weights, input_tensor=x)
        except Exception as exc:
            if weights == "imagenet":
                raise WeightsUnavailable(
                    f"cannot get ImageNet weights for {backbone.app}: {exc}. This machine may be offline: "
                    f"pass --weights FILE (a {backbone.app} no-top .h5 from keras.applications).") from None
            raise WeightsUnavailable(f"cannot load weights {weights} into {backbone.app}: {exc}") from None
        features = base.output
        before = {layer.name for layer in keras.Model(inputs, x).layers}
        names = [layer.name for layer in base.layers if layer.name not in before]
    pooled = layers.GlobalAveragePooling2D(name="head_pool")(features)
    pooled = layers.Dropout(dropout, seed=seed, name="head_dropout")(pooled)
    output = layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia")(pooled)
    return keras.Model(inputs, output, name=f"cxr_{name}"), names


def set_trainable(model, backbone_layers: list[str], top_fraction: float) -> int:
    """Freeze the backbone except its top ``top_fraction`` of layers; BatchNorm stays frozen.

    Returns the number of backbone layers made trainable.
    """
    from keras import layers

    cut = int(len(backbone_layers) * (1.0 - top_fraction))
    trainable = set(backbone_layers[cut:])
    count = 0
    for layer in model.layers:
        if layer.name in backbone_layers:
            layer.trainable = layer.name in trainable and not isinstance(layer, layers.BatchNormalization)
            count += layer.trainable
    return count
