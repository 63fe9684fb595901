"""Evaluate a model on a labeled folder with bootstrap 95% confidence intervals.

    python benchmarks/evaluate_model.py [--model models/cxr-default.keras]
        [--data ../shared/data/chest_xray/test] [--bootstrap 2000]

Prints ROC AUC, sensitivity, specificity and accuracy at the model card's
(validation-chosen) threshold, each with a percentile bootstrap interval that
resamples patients (stratified by class; the patient is in the Kermany file
names, or a CSV's `patient` column, or what `--patient-pattern REGEX` finds in
the paths, or a DICOM's Patient ID; patients that share an identical image are
one: a patient's images are alike, and resampling them one by one gives
intervals too narrow), next to the published
figures of the seed notebooks and of Kermany et al. 2018.
Needs ../shared (or any folder with NORMAL/ and PNEUMONIA/); skips cleanly without.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PUBLISHED = [  # (name, accuracy, sensitivity, specificity, AUC) on the same 624-image test split
    ("ResNet-18 (seed notebook)", 0.9247, 0.979, 0.821, 0.962),
    ("ResNet50 (seed notebook)", 0.88, None, None, None),
    ("Kermany et al. 2018", 0.928, 0.932, 0.901, 0.968),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cxr-default.keras")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray" / "test")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--patient-pattern", metavar="REGEX", default=None,
                        help="find each file's patient in its path (as `python -m training evaluate`'s option)")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (this benchmark needs a labeled folder)")
        return 0
    from cxrscreen.calibrate import bootstrap_intervals, group_count, operating_point
    from training.train import evaluate

    result = evaluate(args.model, args.data, patient_pattern=args.patient_pattern)
    scores, labels = np.array(result["scores"]), np.array(result["labels"])
    point = operating_point(scores, labels, result["threshold"])
    ci = bootstrap_intervals(scores, labels, result["threshold"], args.bootstrap, groups=result["patients"])
    image_ci = bootstrap_intervals(scores, labels, result["threshold"], args.bootstrap)
    people = group_count(labels, result["patients"])
    print(f"model {args.model.name} on {args.data} (n={len(labels)}: {int((labels == 0).sum())} NORMAL images of "
          f"{people['NORMAL']} patients, {int(labels.sum())} PNEUMONIA images of {people['PNEUMONIA']} patients), "
          f"threshold {result['threshold']:.4f} chosen on validation; {args.bootstrap} bootstrap resamples of "
          "patients (and, for comparison, of images as if independent)")
    for item in result["excluded"]:     # not images, or not decodable: not in n, and said so
        print(f"  excluded {item['path']}: {item['reason']}")
    for key in ("auc", "sensitivity", "specificity", "accuracy"):
        lo, hi = ci[key]
        print(f"  {key:12s} {getattr(point, key):.4f}  95% CI [{lo:.4f}, {hi:.4f}]   "
              f"(images: [{image_ci[key][0]:.4f}, {image_ci[key][1]:.4f}])")
    print("\n| model | accuracy | sensitivity | specificity | ROC AUC |\n|---|---|---|---|---|")
    print(f"| cxr-default (this run) | {point.accuracy:.1%} | {point.sensitivity:.1%} | {point.specificity:.1%} "
          f"| {point.auc:.3f} |")
    for name, *values in PUBLISHED:
        cells = [f"{v:.1%}" if v is not None and i < 3 else (f"{v:.3f}" if v is not None else "n/a")
                 for i, v in enumerate(values)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
