"""Grad-CAM heatmaps (Selvaraju et al. 2017) and their overlays.

:func:`find_gradcam_layer` picks the last layer with a spatial (4-D) output,
whatever the backbone. :class:`GradCam` computes, in one compiled pass per
batch, the model's scores and the heatmaps from the gradient of the logit
(pre-sigmoid), so confident predictions do not saturate to zero gradients; for
the pooled head every model of this project has, that gradient is known in
closed form and no backend-specific differentiation is needed.
For an ensemble (a model whose layers include the member models, see
``training/ensemble.py``) the score is the mean of the members' probabilities,
exactly what the ensemble predicts, and the heatmap the mean of the members'
normalised heatmaps. Drawing the overlay is a separate, pure step (:func:`overlay`).
"""

from __future__ import annotations

import numpy as np

from .infer import pad_batch


def members(model) -> list:
    """The member models of an ensemble, or ``[model]`` for a single model."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested or [model]


def find_gradcam_layer(model) -> str:
    """The name of the last layer whose output is a 4-D feature map (batch, h, w, channels);
    for an ensemble, that layer in its first member (members share a backbone's layer names)."""
    model = members(model)[0]
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and layer.__class__.__name__ != "InputLayer" and shape[1] and shape[1] > 1:
            return layer.name
    raise ValueError(f"model {model.name} has no convolutional feature map for Grad-CAM")


class GradCam:
    """Scores and Grad-CAM heatmaps for batches of model inputs, on any Keras backend.

    Every model this project trains ends in the same head: the feature map, global average
    pooling, dropout (the identity when screening) and one sigmoid Dense unit. There the gradient
    of the logit with respect to the feature map is the Dense kernel divided by h*w at every
    position, so Grad-CAM's channel weights are the kernel (up to that constant, which the unit
    peak removes) and the heatmap is ReLU(features . kernel): exactly Grad-CAM, computed from one
    compiled forward pass that returns each member's feature map and score, with no gradient, so
    it runs on the TensorFlow, JAX or PyTorch backend and on whatever device that backend uses.
    A model with any other head gets the gradient from TensorFlow's GradientTape (TensorFlow
    backend only; elsewhere a clear error).
    """

    def __init__(self, model, layer_name: str | None = None, batch_size: int | None = None) -> None:
        self.layer_name = layer_name or find_gradcam_layer(model)
        self.batch_size = batch_size      # the run's full batch: smaller ones are padded (infer.bucket_size)
        parts = members(model)
        kernels = [_pooled_head_kernel(member, self.layer_name) for member in parts]
        if all(kernel is not None for kernel in kernels):
            self._run = _forward_cam(model, parts, self.layer_name, kernels)
            self.method = "forward"
        else:
            self._run = _gradient_cam(model, parts, self.layer_name)
            self.method = "gradient"

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores (N,), heatmaps (N, h, w) in [0, 1])`` at the feature-map resolution."""
        scores, cams, _ = self.run(batch)
        return scores, cams

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(scores, heatmaps, pooled)``: ``pooled`` (N, channels) is the global average of the (first)
        member's feature map, what its classifier reads (:mod:`cxrscreen.appearance` measures it); None
        on the gradient path."""
        batch = np.asarray(batch, dtype=np.float32)
        n = len(batch)
        out = self._run(pad_batch(batch, self.batch_size))
        scores = np.asarray(out[0], dtype=np.float64).reshape(-1)[:n]
        cams = np.asarray(out[1], dtype=np.float32)[:n]
        return scores, cams, (np.asarray(out[2], dtype=np.float64)[:n] if len(out) > 2 else None)


def _unit_peak(cams: np.ndarray) -> np.ndarray:
    """Each heatmap divided by its maximum; an all-zero heatmap stays zero."""
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def _pooled_head_kernel(member, layer_name: str) -> np.ndarray | None:
    """The Dense kernel (channels,) when everything after ``layer_name`` in ``member`` is global
    average pooling of it, dropout and one Dense unit; None for any other head."""
    from keras import layers

    names = [layer.name for layer in member.layers]
    if layer_name not in names:
        raise ValueError(f"model {member.name} has no layer {layer_name!r} for Grad-CAM")
    after = member.layers[names.index(layer_name) + 1:]
    if len(after) < 2:
        return None
    pool, middle, final = after[0], after[1:-1], after[-1]
    if not (isinstance(pool, layers.GlobalAveragePooling2D) and not pool.keepdims
            and pool.data_format == "channels_last" and pool.input is member.get_layer(layer_name).output):
        return None
    if any(not isinstance(layer, layers.Dropout) for layer in middle):
        return None
    if not (isinstance(final, layers.Dense) and final.units == 1 and final.output is member.outputs[0]):
        return None
    return np.asarray(final.kernel, dtype=np.float32)[:, 0]


def _forward_cam(model, parts: list, layer_name: str, kernels: list[np.ndarray]):
    """Grad-CAM for pooled heads: one compiled call for every member's feature map and score."""
    import keras

    inputs = keras.Input(model.input_shape[1:])
    outputs = []
    for member in parts:
        tap = keras.Model(member.inputs, [member.get_layer(layer_name).output, member.outputs[0]])
        outputs.extend(tap(inputs))
    taps = keras.Model(inputs, outputs)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = taps.predict_on_batch(batch)
        scores = np.mean([np.asarray(p, dtype=np.float64).reshape(-1) for p in out[1::2]], axis=0)
        cams = [_unit_peak(np.maximum(np.asarray(f, dtype=np.float32) @ kernel, 0.0))
                for f, kernel in zip(out[0::2], kernels)]
        return scores, _unit_peak(np.mean(cams, axis=0)), np.asarray(out[0], dtype=np.float32).mean(axis=(1, 2))

    return run


def _gradient_cam(model, parts: list, layer_name: str):
    """Grad-CAM by automatic differentiation of the logit, for heads that are not a pooled Dense."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"Grad-CAM for model {model.name}: its head after {layer_name!r} is not global "
                         f"pooling and one Dense unit, and other heads need the TensorFlow backend "
                         f"(KERAS_BACKEND is {keras.backend.backend()!r})")
    import tensorflow as tf

    heads = []
    for member in parts:
        final = member.layers[-1]
        if final.__class__.__name__ != "Dense":
            raise ValueError(f"Grad-CAM expects {member.name} to end in a Dense layer")
        extractor = keras.Model(member.inputs, [member.get_layer(layer_name).output, final.input])
        heads.append((extractor, final))

    def tf_unit_peak(cam):
        return tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))

    def one(extractor, final, x):
        with tf.GradientTape() as tape:
            features, pooled = extractor(x, training=False)
            tape.watch(features)
            logits = tf.matmul(tf.cast(pooled, tf.float32), tf.cast(final.kernel, tf.float32)) + \
                tf.cast(final.bias, tf.float32)
            logit = logits[:, 0]
        grads = tape.gradient(logit, features)
        weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2))
        cam = tf.nn.relu(tf.reduce_sum(tf.cast(features, tf.float32) * weights[:, None, None, :], axis=-1))
        return tf.sigmoid(logit), tf_unit_peak(cam)

    @tf.function(reduce_retracing=True)
    def run(x):
        results = [one(extractor, final, x) for extractor, final in heads]
        scores = tf.add_n([score for score, _ in results]) / len(results)
        cams = tf.add_n([cam for _, cam in results]) / len(results)
        return scores, tf_unit_peak(cams)

    return run


def upsample(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a heatmap to (rows, columns)."""
    import cv2

    return np.clip(cv2.resize(heatmap.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)


def overlay(unit: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture of the unit image with the heatmap in a perceptual colormap (inferno).

    Where the heatmap is weak the radiograph shows through (opacity scales with it).
    """
    import cv2

    heat = upsample(heatmap, unit.shape[:2])
    gray = (np.clip(unit, 0, 1) * 255).astype(np.uint8)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    base = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    weight = (alpha * heat)[..., None]
    return (base * (1 - weight) + colour.astype(np.float32) * weight).astype(np.uint8)
