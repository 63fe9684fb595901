"""Screening throughput and scores on each Keras backend and device of this machine, in one run.

    python benchmarks/screening_devices.py [--n 500] [--batch-size 32] [--workers N]
                                           [--backends tensorflow,jax,torch]

Builds a folder of at least N files (the 624 test JPEGs when ../shared is there, or --data,
plus the DICOM samples repeated as new studies; as ``batch_throughput.py`` does). Then, for each
backend that is installed (default: those of tensorflow, jax, torch that import), it runs the
same measurement in a fresh child process that sees the machine's accelerator and, when the
backend found one, again with it hidden (see ``_child.py``). Each run gives:

* model: the compiled Grad-CAM pass (scores and heatmaps; what screening runs on every batch)
  on batches of real model inputs already in memory, after warm-up: the model's own speed;
* end to end: :func:`cxrscreen.pipeline.run_batch` over the folder with Grad-CAM on every image
  and a PDF report per study, start-up and compilation included: what a user waits for;
* agreement with the baseline: the largest and mean difference of the same studies' scores, and
  how many studies one run flags and the other does not.

The baseline is the first run on a CPU (TensorFlow on the CPU when it is installed: what
``cxrscreen batch`` does by default on a CPU server); every other run is printed as a ratio to it.

A GPU machine may have no TensorFlow (a JAX or PyTorch image). To compare its scores with
TensorFlow's all the same, save a run on a machine that has it and hand the file to the other:

    python benchmarks/screening_devices.py --backends tensorflow --save tf-cpu.json        # CPU server
    python benchmarks/screening_devices.py --backends jax,torch --reference tf-cpu.json   # GPU machine

With ``--reference`` the score columns compare every run with the reference file's baseline (the
speed ratios stay within this run: another machine's speed is no baseline). Studies are matched
by their first file's name, which is the same on both machines for the same ``--n`` and data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from _child import measure
from batch_throughput import build_folder

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
folder, batch, workers = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
processes = None if sys.argv[5] == "auto" else int(sys.argv[5])
import numpy as np
from cxrscreen.explain import GradCam
from cxrscreen.infer import accelerators, load_model
from cxrscreen.normalise import load_model_input
from cxrscreen.pipeline import BatchOptions, run_batch

model = load_model()
jpegs = sorted(folder.glob("*.jp*g"))[:batch] or sorted(folder.glob("*.dcm"))[:batch]
x = np.stack([load_model_input(p, model.card.preprocessing) for p in jpegs])
x = np.concatenate([x] * (batch // len(x) + 1))[:batch]
cam = GradCam(model.keras_model)
for _ in range(3):
    cam(x)
reps = max(2, 512 // batch)
started = time.perf_counter()
for _ in range(reps):
    scores, cams = cam(x)          # numpy out: waits for the device
model_rate = reps * batch / (time.perf_counter() - started)

with tempfile.TemporaryDirectory() as out:
    started = time.perf_counter()
    summary = run_batch([folder], BatchOptions(out=Path(out), gradcam="all", force=True, batch_size=batch,
                                               workers=workers, report_processes=processes), model=model)
    elapsed = time.perf_counter() - started
print(json.dumps({"compute": model.compute, "gpu": bool(accelerators()), "model_images_per_s": model_rate,
                  "end_to_end_images_per_s": summary.scored_images / elapsed, "scored": summary.scored_images,
                  "failed": summary.failed_files, "seconds": elapsed, "threshold": model.card.threshold,
                  "scores": {min(Path(f).name for f in r["files"]): r["score"] for r in summary.rows
                             if r["kind"] == "study" and r["status"] == "scored"}}))
"""


def main() -> None:
    import importlib.util

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray" / "test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--backends", default="tensorflow,jax,torch",
                        help="comma-separated Keras backends; those not installed are left out")
    parser.add_argument("--report-processes", default="auto",
                        help="the batch option (auto: cxrscreen.pipeline.report_processes; 0: a thread)")
    parser.add_argument("--save", type=Path, help="write every run (figures and study scores) to this JSON file")
    parser.add_argument("--reference", type=Path,
                        help="a file written by --save on another machine: compare scores and flags with its baseline")
    args = parser.parse_args()
    reference = None
    if args.reference is not None:
        saved = json.loads(args.reference.read_text())
        reference = next((r for r in saved["runs"] if not r["gpu"]), saved["runs"][0])
    backends = [b for b in args.backends.split(",") if importlib.util.find_spec(b) is not None]
    if not backends:
        raise SystemExit(f"none of {args.backends} is installed")

    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    runs = []
    try:
        files = build_folder(work / "inbox", args.n, args.data)
        child = [str(ROOT), str(work / "inbox"), str(args.batch_size), str(args.workers), args.report_processes]
        for backend in backends:
            found = measure(CHILD, child, hide_accelerator=False, KERAS_BACKEND=backend)
            runs.append(found)
            if found["gpu"]:
                runs.append(measure(CHILD, child, hide_accelerator=True, KERAS_BACKEND=backend))
    finally:
        shutil.rmtree(work)

    base = next((r for r in runs if not r["gpu"]), runs[0])
    if args.save is not None:
        args.save.write_text(json.dumps({"files": len(files), "batch_size": args.batch_size, "cpus": os.cpu_count(),
                                         "runs": runs}, indent=1))
    against = reference or base
    print(f"{len(files)} files, batch {args.batch_size}, {args.workers} decode workers, {os.cpu_count()} CPUs, "
          f"report processes {args.report_processes}; Grad-CAM on every image; baseline: {base['compute']}")
    if reference is not None:
        print(f"scores and flags against {reference['compute']} from {args.reference} "
              f"({len(reference['scores'])} studies)")
    which = "reference" if reference is not None else "baseline"
    print("| compute | model (images/s) | end to end (images/s) | ratio to baseline (model, end to end) "
          f"| scores against {which} (largest, mean difference) | flags that differ |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        both = sorted(set(r["scores"]) & set(against["scores"]))
        differences = [abs(float(r["scores"][key]) - float(against["scores"][key])) for key in both]
        flips = sum((float(r["scores"][key]) >= r["threshold"]) != (float(against["scores"][key]) >= against["threshold"])
                    for key in both)
        print(f"| {r['compute']} | {r['model_images_per_s']:.0f} | {r['end_to_end_images_per_s']:.1f} "
              f"| {r['model_images_per_s'] / base['model_images_per_s']:.2f}x, "
              f"{r['end_to_end_images_per_s'] / base['end_to_end_images_per_s']:.2f}x "
              f"| {max(differences, default=0):.1e}, {sum(differences) / max(len(differences), 1):.1e} "
              f"| {flips} of {len(both)} |")
    failed = [r["compute"] for r in runs if r["failed"] or r["scored"] != against["scored"]
              or set(r["scores"]) != set(against["scores"])]
    if failed:
        print(f"runs that did not score the same images and studies as the {which}: {', '.join(failed)}")
    if not any(r["gpu"] for r in runs):
        print("no accelerator found: CPU figures only")


if __name__ == "__main__":
    main()
