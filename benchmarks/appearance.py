"""How well the appearance distance tells chest radiographs from other pictures, for 32, 64 and 128 axes.

    python benchmarks/appearance.py [--model models/cxr-default.keras] [--data ../shared/data/chest_xray]

For the model's Grad-CAM layer, the pooled features of: the training images of its split file (the
reference is fitted on them), the validation images (the limit is their largest distance), the test
split and the 24 full-resolution originals in ../shared (reported, never used to choose anything), and
pictures that are not chest radiographs of the training population: every image pydicom and
pydicom-data ship that decodes to grey (CT, MR, ultrasound, test patterns, secondary captures, an
extremity radiograph; the real adult chest CR, RG1, listed on its own), and scikit-image's bundled
photographs in grey when scikit-image is installed. For each number of axes it prints each group's
range, how many are over the limit, and the margin: the nearest non-chest picture's distance over the
limit. Needs ../shared (the split file's images); prints what it can without.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pydicom_pictures() -> dict[str, list[Path]]:
    """pydicom's and pydicom-data's images that decode to a grey picture, by group."""
    import pydicom.data

    from cxrscreen.normalise import load_unit_image

    folders = [Path(pydicom.data.__file__).parent]
    try:
        import data_store
        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    groups: dict[str, list[Path]] = {"pydicom: adult chest CR (RG1)": [], "pydicom: other images": []}
    seen = set()
    for folder in folders:
        for path in sorted(Path(p) for p in glob.glob(str(folder / "**" / "*"), recursive=True)):
            if not path.is_file() or path.suffix in (".py", ".pyc", ".txt", ".json") or path.name in seen:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    unit = load_unit_image(path)
            except Exception:
                continue
            if unit.ndim != 2 or min(unit.shape) < 32:
                continue
            seen.add(path.name)
            groups["pydicom: adult chest CR (RG1)" if path.name.startswith("RG1_") else "pydicom: other images"].append(path)
    return groups


def features_of(cam, units: list[np.ndarray], spec, batch: int = 32) -> np.ndarray:
    from cxrscreen.normalise import to_model_input

    out = []
    for i in range(0, len(units), batch):
        out.append(cam.run(np.stack([to_model_input(u, spec) for u in units[i:i + batch]]))[2])
    return np.concatenate(out) if out else np.zeros((0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cxr-default.keras")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    args = parser.parse_args()

    from cxrscreen.appearance import AppearanceReference
    from cxrscreen.explain import GradCam
    from cxrscreen.infer import load_model
    from cxrscreen.normalise import load_unit_image
    from training import data as D

    model = load_model(args.model)
    card = json.loads(args.model.with_suffix(".json").read_text())
    cam = GradCam(model.keras_model, model.card.gradcam_layer)
    spec = model.card.preprocessing
    split_file = args.model.parent / card["data"]["split_file"]
    os.chdir(ROOT)       # the split file's paths are relative to the folder training ran in
    train, val = D.split_examples(split_file, "train"), D.split_examples(split_file, "validation")
    if not all(e.path.is_file() for e in train[:5] + val[:5]):
        raise SystemExit(f"the images of {split_file.name} are not here (../shared missing?): nothing to fit")

    def load(paths):
        return features_of(cam, [load_unit_image(p) for p in paths], spec)

    print(f"pooled features of {len(train)} training and {len(val)} validation images ...", flush=True)
    feats = {"train": load([e.path for e in train]), "validation": load([e.path for e in val])}
    groups = {"test split (reported only)": sorted((args.data / "test").rglob("*.jpeg")),
              "full-resolution originals (../shared)": sorted((args.data.parent / "fullres").rglob("*.jpeg")),
              **pydicom_pictures()}
    for name, paths in groups.items():
        feats[name] = load(paths)
    try:
        import skimage.data as skdata

        photos = [getattr(skdata, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon",
                                                  "brick", "grass", "text", "page")]
        grey = [np.asarray(p if p.ndim == 2 else p[..., :3] @ [0.299, 0.587, 0.114], np.float32) / 255 for p in photos]
        feats["scikit-image photographs"] = features_of(cam, grey, spec)
    except ImportError:
        print("scikit-image is not installed: its photographs are left out")

    others = [k for k in feats if k not in ("train", "validation")]
    for components in (32, 64, 128):
        ref = AppearanceReference.fit(feats["train"], feats["validation"], components)
        print(f"\n{components} axes: limit {ref.limit:.2f} (the largest validation distance)")
        print(f"  {'group':42s} {'n':>4s} {'min':>6s} {'max':>6s}  over the limit")
        for name in ["validation", *others]:
            d = ref.distances(feats[name]) if len(feats[name]) else np.zeros(0)
            if len(d):
                print(f"  {name:42s} {len(d):4d} {d.min():6.2f} {d.max():6.2f}  {int((d > ref.limit).sum())}")
        non_chest = [ref.distances(feats[k]) for k in ("pydicom: other images", "scikit-image photographs")
                     if k in feats and len(feats[k])]
        if non_chest:
            nearest = min(d.min() for d in non_chest)
            print(f"  margin: the nearest non-chest picture is at {nearest:.2f}, {nearest / ref.limit:.2f}x the limit")


if __name__ == "__main__":
    main()
