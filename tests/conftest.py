"""Fixtures that build DICOM and image files; no test needs ../shared."""

from __future__ import annotations

import numpy as np
import pytest


def phantom(rows: int = 96, columns: int = 80, top: int = 4095) -> np.ndarray:
    """A chest-like phantom in attenuation units: dark lungs, bright mediastinum and border."""
    y, x = np.mgrid[0:rows, 0:columns]
    img = np.full((rows, columns), 0.75)
    for cx in (0.3, 0.7):
        lung = ((x / columns - cx) / 0.16) ** 2 + ((y / rows - 0.5) / 0.33) ** 2 < 1
        img[lung] = 0.2 + 0.1 * (y[lung] / rows)
    img += 0.02 * np.sin(x / 3.0)
    return np.clip(np.rint(img * top), 0, top).astype(np.uint16)


@pytest.fixture
def chest_pixels() -> np.ndarray:
    return phantom()


@pytest.fixture
def write_dicom(tmp_path):
    """write_dicom(pixels, name=..., **make_dicom kwargs) -> path of a Part-10 file."""
    from cxrscreen.testing import make_dicom, save

    def _write(pixels, name="image.dcm", **kwargs):
        kwargs.setdefault("seed", name)
        return save(make_dicom(pixels, **kwargs), tmp_path / name)

    return _write
