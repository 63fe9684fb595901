"""How the model scores a chest stored on its side, upside down or mirrored, against the same image upright.

    python benchmarks/orientation.py [--model models/cxr-default.keras] [--images 200] [--seed 0]

Takes a random sample of the validation images of the model's split file (never the test split: this
decides what screening does, see README's *Windowing*), scores each as stored and turned a quarter turn
either way, a half turn, and mirrored, and prints per orientation the ROC AUC, and sensitivity and
specificity at the card's threshold, beside those of the upright images. It is why an image whose
Patient Orientation (0020,0020) says it is stored on its side is turned upright before it is scored,
and why a mirrored one is left as stored. Needs ../shared (the split file's images); skips cleanly
without.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ORIENTATIONS = {
    "upright (as stored)": lambda u: u,
    "quarter turn counter-clockwise": lambda u: np.rot90(u, 1),
    "half turn (upside down)": lambda u: np.rot90(u, 2),
    "quarter turn clockwise": lambda u: np.rot90(u, 3),
    "mirrored": lambda u: u[:, ::-1],
}


def main() -> int:
    from sklearn.metrics import roc_auc_score

    from cxrscreen.infer import default_model_path, load_model
    from cxrscreen.normalise import load_unit_image, to_model_input

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    split = args.model.with_suffix(".split.csv")
    if not split.is_file():
        print(f"skipped: no split file {split}")
        return 0
    with open(split, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "validation"]
    rows = [r for r in rows if (ROOT / r["path"]).is_file() or Path(r["path"]).is_file()]
    if not rows:
        print("skipped: the validation images of the split file are not here (they are in ../shared)")
        return 0
    random.seed(args.seed)
    rows = random.sample(rows, min(args.images, len(rows)))
    model = load_model(args.model)
    threshold = model.card.threshold
    units = [load_unit_image(ROOT / r["path"] if (ROOT / r["path"]).is_file() else r["path"]) for r in rows]
    labels = np.array([r["label"] == "PNEUMONIA" for r in rows])
    print(f"{len(rows)} validation images ({labels.sum()} pneumonia, {(~labels).sum()} normal), "
          f"threshold {threshold:.4f}")
    print(f"{'orientation':32s} {'AUC':>6s} {'sens':>6s} {'spec':>6s}")
    for name, turn in ORIENTATIONS.items():
        batch = np.stack([to_model_input(np.ascontiguousarray(turn(u)), model.card.preprocessing) for u in units])
        scores = model.predict(batch).ravel()
        flagged = scores >= threshold
        print(f"{name:32s} {roc_auc_score(labels, scores):6.3f} {flagged[labels].mean():6.3f} "
              f"{(~flagged[~labels]).mean():6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
