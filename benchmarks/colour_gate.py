"""Where the colour gate's limit comes from, and what it costs, in one run.

    python benchmarks/colour_gate.py [--fullres ../shared/data/fullres] [--data ../shared/data/chest_xray/test]

1. Separation. :func:`cxrscreen.normalise.colour_fraction` on what a radiograph may look like in colour
   and on colour pictures, each group's range printed beside the limit
   (:data:`cxrscreen.normalise.COLOUR_PICTURE_FRACTION`) and the margin to it:

   * radiographs (the 24 full-resolution originals in ../shared, saved as 8-bit JPEG after each change):
     grey; a sepia, a blue and a green film base; a colour cast drifting across the image (a photograph
     of a film, +-0.03 and +-0.05 in B-Y and R-Y: the stronger one is the edge, partly skipped);
     red/green annotations; yellow measurement lines and
     labels (six of each, thick);
   * the reports' own Grad-CAM overlays of those radiographs (the default model's heatmaps), and a
     jet overlay over all of the image;
   * colour pictures: pydicom-data's palette photograph (OT-PAL-8-face) and colour-bar secondary
     captures, and scikit-image's bundled photographs when scikit-image is installed (it is not a
     dependency: ``pip install scikit-image`` to include them).

2. Cost. Selection decodes every colour JPEG/PNG once more (a large JPEG at a quarter of its size) to
   measure it: ``scan()`` of the test split's JPEGs (RGB files of grey pictures) with the gate and with it
   switched off, and the ratio.

Without ../shared the radiograph groups are left out and part 2 uses the bundled samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def jpeg_round_trip(rgb: np.ndarray, quality: int = 85) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def to_rgb(r, g, b) -> np.ndarray:
    return (np.clip(np.dstack([r, g, b]), 0, 1) * 255).round().astype(np.uint8)


def radiograph_versions(grey: np.ndarray, rng) -> dict[str, np.ndarray]:
    """Colour versions of one grey radiograph (float [0, 1]) that are still radiographs."""
    import cv2

    h, w = grey.shape
    down, across = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    out = {"grey": to_rgb(grey, grey, grey),
           "sepia film": to_rgb(grey ** 0.9, grey * 0.85 + 0.03 * np.sin(np.pi * grey), 0.7 * grey ** 1.3),
           "blue film": to_rgb(grey * 0.8, grey * 0.9, grey + 0.08),
           "green film": to_rgb(grey * 0.85, grey, grey * 0.8)}
    for amp in (0.03, 0.05):
        red, blue = grey + amp * (1 - 2 * down), grey + amp * (2 * across - 1)
        out[f"cast +-{amp}" + (" (edge)" if amp > 0.03 else "")] = to_rgb(red, (grey - 0.299 * red - 0.114 * blue) / 0.587, blue)
    marked = out["grey"].copy()
    cv2.arrowedLine(marked, (w // 4, h // 4), (w // 2, h // 2), (255, 0, 0), max(2, w // 200))
    cv2.putText(marked, "R  PORTABLE 08:14", (w // 20, h // 10), cv2.FONT_HERSHEY_SIMPLEX, w / 900,
                (0, 255, 0), max(2, w // 400))
    out["arrow and text"] = marked
    lines = out["grey"].copy()
    for _ in range(6):
        cv2.line(lines, tuple(int(v) for v in rng.integers(0, (w, h))), tuple(int(v) for v in rng.integers(0, (w, h))),
                 (255, 255, 0), max(2, w // 300))
        cv2.putText(lines, f"{rng.integers(10, 200)} mm", (int(rng.integers(w // 2)), int(rng.integers(h // 8, h))),
                    cv2.FONT_HERSHEY_SIMPLEX, w / 1200, (255, 255, 0), max(2, w // 500))
    out["measurements"] = lines
    return {name: jpeg_round_trip(img) for name, img in out.items()}


def picture_groups(fullres: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """({radiograph group: fractions}, {picture group: fractions})."""
    import cv2

    from cxrscreen.normalise import colour_fraction

    radiographs: dict[str, list[float]] = {}
    pictures: dict[str, list[float]] = {}
    files = sorted(fullres.rglob("*.jpeg")) if fullres.is_dir() else []
    rng = np.random.default_rng(0)
    greys = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255 for f in files]
    for grey in greys:
        for name, img in radiograph_versions(grey, rng).items():
            radiographs.setdefault(name, []).append(colour_fraction(img, 255.0))
    if greys:
        from cxrscreen.explain import GradCam, overlay
        from cxrscreen.infer import load_model
        from cxrscreen.normalise import to_model_input

        model = load_model()
        cam = GradCam(model.keras_model, model.card.gradcam_layer or None)
        _, heats = cam(np.stack([to_model_input(g, model.card.preprocessing) for g in greys]))
        pictures["report Grad-CAM overlays"] = [colour_fraction(jpeg_round_trip(overlay(g, h)), 255.0)
                                                for g, h in zip(greys, heats)]
        jets = []
        for grey in greys:
            heat = cv2.resize(cv2.GaussianBlur(rng.random((8, 8)).astype(np.float32), (3, 3), 0), grey.shape[::-1])
            heat = (heat - heat.min()) / (heat.max() - heat.min())
            jet = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1] / 255.0
            jets.append(colour_fraction(jpeg_round_trip((0.6 * grey[..., None] + 0.4 * jet) * 255), 255.0))
        pictures["jet overlay, all over"] = jets
    from pydicom.data import get_testdata_file

    from cxrscreen.ingest import read_dicom
    from cxrscreen.normalise import PixelParams, colour_frame, colour_full_scale

    for group, names in (("pydicom-data palette photograph", ["OT-PAL-8-face.dcm"]),
                         ("pydicom colour bars", ["SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_ybr_full_uncompressed.dcm"])):
        for name in names:
            path = get_testdata_file(name)
            if path:
                ds = read_dicom(path)
                rgb = colour_frame(ds)
                pictures.setdefault(group, []).append(colour_fraction(rgb, colour_full_scale(rgb, PixelParams.from_dataset(ds))))
    try:
        import skimage.data as skdata
    except ImportError:
        skdata = None
    if skdata is not None:
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel"):
            pictures.setdefault("scikit-image photographs", []).append(colour_fraction(getattr(skdata, name)()[..., :3], 255.0))
    return radiographs, pictures


def time_scan(folder: Path, gate: bool, repeats: int = 3) -> float:
    from cxrscreen import ingest

    original = ingest.colour_picture
    if not gate:
        ingest.colour_picture = lambda record, ds=None: None
    try:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            items = list(ingest.scan([folder]))
            best = min(best, time.perf_counter() - started)
    finally:
        ingest.colour_picture = original
    return best, len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fullres", type=Path, default=ROOT.parent / "shared" / "data" / "fullres")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray" / "test")
    args = parser.parse_args()

    from cxrscreen.normalise import COLOUR_PICTURE_FRACTION as limit

    radiographs, pictures = picture_groups(args.fullres)
    if not radiographs:
        print(f"{args.fullres} not found: radiograph groups and Grad-CAM overlays left out")
    print(f"\n1. colour_fraction (limit {limit:.0%}: above it, a colour picture, skipped)\n")
    print(f"{'group':36s} {'n':>3s} {'min':>7s} {'max':>7s}  verdict")
    worst_radiograph, best_picture = 0.0, 1.0
    for kind, groups in (("radiograph", radiographs), ("picture", pictures)):
        for name, values in groups.items():
            lo, hi = min(values), max(values)
            skipped = sum(v > limit for v in values)
            print(f"{kind[:3]}: {name:31s} {len(values):3d} {lo:7.2%} {hi:7.2%}  {skipped} of {len(values)} skipped")
            if kind == "radiograph" and "(edge)" not in name:
                worst_radiograph = max(worst_radiograph, hi)
            elif name not in ("report Grad-CAM overlays",):
                best_picture = min(best_picture, lo)
    if radiographs:
        print(f"\nmargin: the most coloured radiograph is at {worst_radiograph:.1%} ({limit / worst_radiograph:.1f}x "
              f"below the limit; not counting the (edge) group, a strong drifting cast, of which some are "
              f"skipped); the least coloured picture (not counting the reports' overlays, whose colour "
              f"follows the heatmap's extent) at {best_picture:.1%} ({best_picture / limit:.1f}x above)")

    folder = args.data if args.data.is_dir() else ROOT / "samples"
    with_gate, n = time_scan(folder, gate=True)
    without, _ = time_scan(folder, gate=False)
    print(f"\n2. scan() of {n} files in {folder}: {without:.2f} s without the gate, {with_gate:.2f} s with it "
          f"({with_gate / without:.2f}x; {1000 * (with_gate - without) / n:.2f} ms a file)")


if __name__ == "__main__":
    main()
