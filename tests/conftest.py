"""Fixtures that build DICOM and image files; no test needs ../shared."""

from __future__ import annotations

import numpy as np
import pytest


def pdf_text(path) -> str:
    """The text of every page of a PDF (reports, the worklist), every run of white space one space:
    a phrase reads the same wherever a table cell or a paragraph wrapped it."""
    from pypdf import PdfReader

    return " ".join(" ".join(page.extract_text() for page in PdfReader(path).pages).split())


def phantom(rows: int = 96, columns: int = 80, top: int = 4095) -> np.ndarray:
    """A chest-like phantom in attenuation units: dark lungs, bright mediastinum and border."""
    y, x = np.mgrid[0:rows, 0:columns]
    img = np.full((rows, columns), 0.75)
    for cx in (0.3, 0.7):
        lung = ((x / columns - cx) / 0.16) ** 2 + ((y / rows - 0.5) / 0.33) ** 2 < 1
        img[lung] = 0.2 + 0.1 * (y[lung] / rows)
    img += 0.02 * np.sin(x / 3.0)
    return np.clip(np.rint(img * top), 0, top).astype(np.uint16)


@pytest.fixture(scope="session")
def model():
    """The bundled default model, loaded once for the whole run (no test changes it)."""
    from cxrscreen.infer import load_model

    return load_model()


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


def colour_versions(side: int = 320) -> dict[str, np.ndarray]:
    """RGB uint8 versions of a grey phantom chest: what a radiograph may look like in colour (grey, a
    tinted or colour-cast film scan, colour annotations) and colour pictures made from it (a heatmap
    overlay over all of it, a rainbow)."""
    import cv2

    grey = phantom(side, side).astype(np.float32) / 4095
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    across, down = np.meshgrid(ramp, ramp)

    def rgb(r, g, b):
        return (np.clip(np.dstack([r, g, b]), 0, 1) * 255).round().astype(np.uint8)

    versions = {
        "grey": rgb(grey, grey, grey),
        # a film scanned in colour: neutral shadows, warm mid-tones, cream highlights
        "sepia": rgb(grey ** 0.9, grey * 0.85 + 0.03 * np.sin(np.pi * grey), 0.7 * grey ** 1.3),
        # a photograph of a film with a colour cast that drifts across it (+-0.03 in B-Y and R-Y)
        "cast": rgb(grey + 0.03 * (1 - 2 * down), grey - 0.02 * (across - down), grey + 0.03 * (2 * across - 1)),
    }
    marked = versions["grey"].copy()
    cv2.arrowedLine(marked, (side // 4, side // 4), (side // 2, side // 2), (255, 0, 0), 3)
    cv2.putText(marked, "R PORTABLE", (side // 20, side // 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 0), 2)
    cv2.line(marked, (side // 5, 4 * side // 5), (4 * side // 5, 4 * side // 5), (255, 255, 0), 2)
    cv2.putText(marked, "112 mm", (side // 2 - 30, 4 * side // 5 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (255, 255, 0), 1)
    versions["annotated"] = marked
    heat = np.exp(-((across - 0.35) ** 2 + (down - 0.5) ** 2) / 0.08)
    jet = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1].astype(np.float32) / 255
    versions["heatmap overlay"] = rgb(*np.moveaxis(0.6 * grey[..., None] + 0.4 * jet, -1, 0))
    hue = (across * 179).astype(np.uint8)
    hsv = np.dstack([hue, np.full_like(hue, 200), (grey * 255).astype(np.uint8)])
    versions["rainbow"] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return versions


def latin1_named(folder, name: str, data: bytes):
    """Write ``data`` to a file whose name is ``name`` in Latin-1 bytes (not valid UTF-8), as an SMB or
    NFS share with Latin-1 names shows them; skips where the filesystem refuses such names."""
    import os

    try:
        path = os.fsencode(folder) + b"/" + name.encode("latin-1")
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        pytest.skip(f"this filesystem refuses names that are not UTF-8: {exc}")
    return os.fsdecode(path)


def die_in_a_report_process(path, result, *, dicom, version=1, **kwargs):
    """Stands in for ``cxrscreen.pipeline.make_report`` in the test of a report process that dies (the
    OOM killer): exits at once in a report process, and writes the PDF report anywhere else."""
    import multiprocessing
    import os

    from cxrscreen.report import write_study_report

    if multiprocessing.parent_process() is not None:
        os._exit(9)
    write_study_report(path, result, **kwargs)


def signal_a_report_process():
    """Sends SIGINT and SIGTERM to the report process it runs in (what a terminal's Ctrl-C and systemd's
    stop do to every process of the group), and says where it ran: "report process" only if it lived on."""
    import multiprocessing
    import os
    import signal

    if multiprocessing.parent_process() is None:
        return "screening process"      # a dead report process's task, written again by the parent
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    return "report process"
