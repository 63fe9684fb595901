"""Grad-CAM heatmaps (Selvaraju et al. 2017) and their overlays.

:func:`find_gradcam_layer` picks the last layer with a spatial (4-D) output,
whatever the backbone. :class:`GradCam` computes, in one compiled pass per
batch, the model's scores and the heatmaps, using the gradient of the logit
(pre-sigmoid) so confident predictions do not saturate to zero gradients.
For an ensemble (a model whose layers include the member models, see
``training/ensemble.py``) the score is the mean of the members' probabilities,
exactly what the ensemble predicts, and the heatmap the mean of the members'
normalised heatmaps. Drawing the overlay is a separate, pure step (:func:`overlay`).
"""

from __future__ import annotations

import numpy as np


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
    """Scores and Grad-CAM heatmaps for batches of model inputs (TensorFlow backend)."""

    def __init__(self, model, layer_name: str | None = None) -> None:
        import keras
        import tensorflow as tf

        self.layer_name = layer_name or find_gradcam_layer(model)
        heads = []
        for member in members(model):
            final = member.layers[-1]
            if final.__class__.__name__ != "Dense":
                raise ValueError(f"Grad-CAM expects {member.name} to end in a Dense layer")
            extractor = keras.Model(member.inputs, [member.get_layer(self.layer_name).output, final.input])
            heads.append((extractor, final))

        def _unit_peak(cam):
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
            return tf.sigmoid(logit), _unit_peak(cam)

        @tf.function(reduce_retracing=True)
        def _run(x):
            results = [one(extractor, final, x) for extractor, final in heads]
            scores = tf.add_n([score for score, _ in results]) / len(results)
            cams = tf.add_n([cam for _, cam in results]) / len(results)
            return scores, _unit_peak(cams)

        self._run = _run

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores (N,), heatmaps (N, h, w) in [0, 1])`` at the feature-map resolution."""
        scores, cams = self._run(np.asarray(batch, dtype=np.float32))
        return np.asarray(scores, dtype=np.float64), np.asarray(cams, dtype=np.float32)


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
