"""Screening with the model's batch normalisations folded into its convolutions, against the model as saved.

    python benchmarks/folded_model.py [--rounds 3] [--batch-size 16] [INPUT ...]

Loads the default model once (``--model`` for another): ``keras_model`` is the model as saved, ``screening_model``
the model :func:`cxrscreen.infer.fold_batch_norm` made of it, which `batch`, `watch` and `calibrate` screen with.
Then, on the same machine and in the same process:

* model: the compiled Grad-CAM pass (scores, heatmaps and the appearance features: what screening runs on every
  batch) of each, on batches of model inputs already in memory, the rounds alternated; images a second and ratio;
* screening: :class:`cxrscreen.pipeline.Screener` over INPUT (the test split when ../shared is there, else the
  bundled samples), decoding included and reports left out, with each model; images a second and ratio;
* agreement: the largest difference of an image's score and of its heatmap between the two, and how many images
  one flags and the other does not at the card's threshold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEST_SPLIT = ROOT.parent / "shared" / "data" / "chest_xray" / "test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    inputs = args.inputs or [TEST_SPLIT if TEST_SPLIT.is_dir() else ROOT / "samples"]

    from cxrscreen import ingest, infer, pipeline
    from cxrscreen.explain import GradCam

    model = infer.load_model(args.model)
    as_saved, folded = model.keras_model, model.screening_model
    if folded is as_saved:
        print("nothing folded in this model: it is screened as saved")
        return 0
    threshold = model.card.threshold
    studies, _ = ingest.group_studies(ingest.scan(inputs))
    images = [image for study in studies for image in study.images]
    print(f"{len(images)} images of {len(studies)} studies from {', '.join(map(str, inputs))}; "
          f"batch size {args.batch_size}, {args.rounds} rounds each")

    # the model alone: the Grad-CAM pass on batches already decoded (at most 512 images)
    spec = model.card.preprocessing
    decoded = np.stack([pipeline._prepare(image, spec)[0] for image in images[:512]])
    batches = [decoded[i:i + args.batch_size] for i in range(0, len(decoded), args.batch_size)]
    cams = {"as saved": GradCam(as_saved, model.card.gradcam_layer or None, batch_size=args.batch_size),
            "folded": GradCam(folded, model.card.gradcam_layer or None, batch_size=args.batch_size)}
    outputs = {name: [cam.run(b) for b in batches] for name, cam in cams.items()}       # warm-up: traced once
    best = dict.fromkeys(cams, float("inf"))
    for _ in range(args.rounds):
        for name, cam in cams.items():
            started = time.perf_counter()
            for b in batches:
                cam.run(b)
            best[name] = min(best[name], time.perf_counter() - started)
    print(f"model (Grad-CAM pass, {len(decoded)} images in memory):")
    for name in cams:
        print(f"  {name:9s} {len(decoded) / best[name]:7.1f} images/s")
    print(f"  ratio {best['as saved'] / best['folded']:.2f}x")
    scores = {name: np.concatenate([o[0] for o in out]) for name, out in outputs.items()}
    heat = {name: np.concatenate([o[1] for o in out]) for name, out in outputs.items()}

    # screening: decoding and the model, as batch runs them, reports left out
    screened = {}
    for name, keras_model in (("as saved", as_saved), ("folded", folded)):
        model.screening_model = keras_model
        screener = pipeline.Screener(model, threshold, gradcam="all", batch_size=args.batch_size)
        list(screener.screen(studies[:args.batch_size]))        # warm-up
        started = time.perf_counter()
        results = list(screener.screen(studies))
        screened[name] = time.perf_counter() - started
        scores[name + " run"] = np.array([r.score for r in sorted(results, key=lambda r: r.study.study_uid)
                                          if r.score is not None])
    model.screening_model = folded
    print(f"screening ({len(images)} images, decoding included, no reports):")
    for name, seconds in screened.items():
        print(f"  {name:9s} {len(images) / seconds:7.1f} images/s")
    print(f"  ratio {screened['as saved'] / screened['folded']:.2f}x")

    difference = np.abs(scores["as saved"] - scores["folded"])
    run_difference = np.abs(scores["as saved run"] - scores["folded run"])
    flips = int(np.sum((scores["as saved run"] >= threshold) != (scores["folded run"] >= threshold)))
    print(f"agreement: scores differ by at most {difference.max():.2g} (mean {difference.mean():.2g}) in memory and "
          f"{run_difference.max():.2g} screened; heatmaps by at most {np.abs(heat['as saved'] - heat['folded']).max():.2g}; "
          f"{flips} studies flagged by one and not the other at {threshold:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
