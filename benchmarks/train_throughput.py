"""Training throughput on the GPU against the CPU of the same machine, in one run.

    python benchmarks/train_throughput.py [--backbone efficientnet_lite0] [--images 1280]
    KERAS_BACKEND=jax python benchmarks/train_throughput.py       # a GPU machine without TensorFlow

Runs the same measurement in two fresh child processes: one that sees the machine's
accelerator and one with it hidden (``CUDA_VISIBLE_DEVICES=`` and ``JAX_PLATFORMS=cpu``), and
prints images per second of each and their ratio. Each child does what ``python -m training
fit`` does in its fine-tuning phase: the classifier with the top of the backbone unfrozen,
``mixed_float16`` and a batch of 64 on a GPU, float32 and a batch of 32 on a CPU, then times
``train_on_batch`` over IMAGES images after warm-up steps (compilation excluded). It also times
the input pipeline (decode, resize, strong augmentation; ``training.data.make_sequence``) on
generated 224 px JPEGs with the child's core count as workers, the other bound of an epoch.
Needs nothing from ../shared. Without an accelerator it prints the CPU figures alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _child import measure

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
backbone, images = sys.argv[2], int(sys.argv[3])
import numpy as np
import keras
from training import data as D
from training.backbones import BACKBONES, build_classifier, set_trainable
from training.train import _compile, device_description, has_gpu, use_gpu_settings
from cxrscreen.normalise import PreprocessSpec

batch = use_gpu_settings(32)       # as fit does: mixed_float16 and a batch of 64 on a GPU
spec = PreprocessSpec(input_size=(224, 224))
model, layers = build_classifier(backbone, spec.input_size, weights=None)
set_trainable(model, layers, BACKBONES[backbone].top_fraction)
_compile(model, 1e-4, 0.05)
rng = np.random.default_rng(0)
x = rng.random((batch, 224, 224, 1), dtype=np.float32)
y = (rng.random(batch) > 0.5).astype(np.float32)
for _ in range(3):
    model.train_on_batch(x, y)
steps = max(1, images // batch)
started = time.perf_counter()
for _ in range(steps):
    loss = model.train_on_batch(x, y)
float(np.asarray(loss[0] if isinstance(loss, (list, tuple)) else loss))   # wait for the device
step_rate = steps * batch / (time.perf_counter() - started)

import cv2
from concurrent.futures import ThreadPoolExecutor
workers = os.cpu_count() or 1
with tempfile.TemporaryDirectory() as tmp:
    examples = []
    for i in range(4 * batch):
        img = (rng.random((224, 224)) * 255).astype(np.uint8)
        path = Path(tmp) / f"person{i}_bacteria_{i}.jpeg"
        cv2.imwrite(str(path), cv2.GaussianBlur(img, (0, 0), 3))
        examples.append(D.Example(path, i % 2, f"person{i}"))
    seq = D.make_sequence(examples, spec, batch_size=batch, train=True, workers=workers, augment_level="strong")
    seq[0]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(seq.__getitem__, range(len(seq))))
    input_rate = len(examples) / (time.perf_counter() - started)
print(json.dumps({"device": device_description(), "gpu": has_gpu(), "batch": batch,
                  "precision": keras.mixed_precision.global_policy().name,
                  "train_images_per_s": step_rate, "input_images_per_s": input_rate, "workers": workers}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=1280)
    args = parser.parse_args()

    child = [str(ROOT), args.backbone, str(args.images)]
    runs = [("accelerator as found", measure(CHILD, child, hide_accelerator=False))]
    has_accelerator = runs[0][1]["gpu"]
    if has_accelerator:
        runs.append(("accelerator hidden", measure(CHILD, child, hide_accelerator=True)))
    print(f"{args.backbone}, fine-tuning phase, {args.images} images after warm-up")
    print("| run | device | batch, precision | train step (images/s) | input pipeline (images/s, workers) |")
    print("|---|---|---|---|---|")
    for name, r in runs:
        print(f"| {name} | {r['device']} | {r['batch']}, {r['precision']} | {r['train_images_per_s']:.0f} | "
              f"{r['input_images_per_s']:.0f} ({r['workers']}) |")
    if has_accelerator:
        gpu, cpu = runs[0][1], runs[1][1]
        print(f"train step: {gpu['train_images_per_s'] / cpu['train_images_per_s']:.1f}x the CPU of the same machine; "
              f"an epoch is bound by the slower of the GPU step ({gpu['train_images_per_s']:.0f}/s) "
              f"and the input pipeline ({gpu['input_images_per_s']:.0f}/s)")
    else:
        print("no accelerator found: CPU figures only")


if __name__ == "__main__":
    main()
