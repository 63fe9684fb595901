"""Does an image look like the radiographs the model was trained on?

The model scores whatever it is given: a test pattern, a CT slice exported as a
secondary capture or a radiograph of a knee with an empty BodyPartExamined gets a
score like a chest, often a high one. This module measures how far an image is
from the training images *in the model's own feature space*: the pooled output
of its Grad-CAM layer (the 1280 features its classifier reads).

The reference (:class:`AppearanceReference`, saved beside the model as
``NAME.appearance.npz`` and named in the card's ``appearance`` section) holds
the mean of the training images' pooled features and their top principal axes.
An image's **appearance distance** is the length of what is left of its
features, centred, once their projection on those axes is taken away: chest
radiographs of the training population vary along those axes, other pictures
leave the subspace. The **limit** is the largest distance of any image of the
validation split (not used to fit the reference), so no validation image is
above it. An image above the limit is scored as usual, and its study gets a
caution: it may not be a frontal chest radiograph, or it comes from a device or
population unlike the training images. (Feature-space distance for out-of-
distribution inputs: Lee et al. 2018, NeurIPS; the residual outside the
principal subspace is its PCA form.)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError

COMPONENTS = 64      # principal axes kept; benchmarks/appearance.py shows the separation for 32, 64 and 128
SUFFIX = ".appearance.npz"


@dataclass(frozen=True)
class AppearanceReference:
    """Mean and principal axes of the training images' pooled features, and the distance limit."""

    mean: np.ndarray          # (channels,)
    axes: np.ndarray          # (components, channels), orthonormal rows
    limit: float              # the largest appearance distance of a validation image

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        """Appearance distance of each row of ``pooled`` (N, channels): the norm of the centred
        features minus their projection on the principal axes."""
        centred = np.asarray(pooled, dtype=np.float64) - self.mean
        return np.linalg.norm(centred - (centred @ self.axes.T) @ self.axes, axis=1)

    def caution(self, distance: float, name: str) -> str:
        """The study caution for an image at ``distance``; '' within the limit."""
        if not distance > self.limit:
            return ""
        return (f"image {name} is unlike the model's training radiographs (appearance distance "
                f"{distance:.2f}, over the limit {self.limit:.2f}): it may not be a frontal chest radiograph, "
                f"or it comes from a device or population the model did not learn from; read the score with "
                f"caution")

    # ------------------------------------------------------------------ fitting and files

    @classmethod
    def fit(cls, train: np.ndarray, validation: np.ndarray, components: int = COMPONENTS) -> "AppearanceReference":
        """Fit the mean and axes on the training images' pooled features, the limit on the validation ones."""
        train = np.asarray(train, dtype=np.float64)
        if len(train) <= components or len(validation) == 0:
            raise ValueError(f"an appearance reference needs more than {components} training images and some "
                             f"validation images (got {len(train)} and {len(validation)})")
        mean = train.mean(axis=0)
        _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
        # the limit is measured with the float32 values the file keeps, so it holds for the loaded reference
        mean, axes = (a.astype(np.float32).astype(np.float64) for a in (mean, vt[:components]))
        limit = float(cls(mean=mean, axes=axes, limit=0.0).distances(validation).max())
        return cls(mean=mean, axes=axes, limit=limit)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean.astype(np.float32), axes=self.axes.astype(np.float32),
                 limit=np.float64(self.limit))
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path | str, sha256: str = "") -> "AppearanceReference":
        """Read a reference file, checking it against the card's ``sha256`` when one is given."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"appearance reference {path} cannot be read ({exc.strerror or exc}); the model "
                             f"card names it", step="load-model") from None
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ModelError(f"appearance reference {path} does not match the sha256 its model card gives",
                             step="load-model")
        try:
            with np.load(io.BytesIO(data)) as arrays:
                mean, axes, limit = arrays["mean"], arrays["axes"], float(arrays["limit"])
        except (KeyError, ValueError, OSError) as exc:
            raise ModelError(f"appearance reference {path} is not a valid reference file: {exc}",
                             step="load-model") from None
        if axes.ndim != 2 or mean.shape != (axes.shape[1],) or not np.isfinite(limit) or limit <= 0:
            raise ModelError(f"appearance reference {path} has inconsistent shapes or limit "
                             f"(mean {mean.shape}, axes {axes.shape}, limit {limit})", step="load-model")
        return cls(mean=mean.astype(np.float64), axes=axes.astype(np.float64), limit=limit)


def reference_path(model_path: Path | str) -> Path:
    """``models/NAME.appearance.npz`` for ``models/NAME.keras``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + SUFFIX)
