"""Throughput of `cxrscreen batch` against a naive per-file loop, in one process run.

    python benchmarks/batch_throughput.py [--n 500] [--data ../shared/data/chest_xray/test]

Builds a folder of at least N files (the 624 test JPEGs when ../shared is there,
plus the DICOM samples, repeated as new studies), then times:

* naive: for each file, load it and call ``model.predict`` on it alone
  (plus, with Grad-CAM, one Grad-CAM call per image);
* batched: :func:`cxrscreen.pipeline.run_batch` (threads decode ahead, batches across studies),

both with Grad-CAM off and on, and prints images/second and the ratio.
Reports are written in both batched runs (the naive loop writes none), so the
ratio understates the inference gain.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_folder(target: Path, n: int, data: Path) -> list[Path]:
    import pydicom

    from cxrscreen.testing import uid_from

    target.mkdir(parents=True)
    sources = sorted(data.rglob("*.jpeg")) if data.is_dir() else []
    dicoms = sorted(p for p in (ROOT / "samples").rglob("*") if p.is_file() and p.suffix not in (".py", ".md", ".jpg"))
    files, i = [], 0
    while len(files) < n:
        for src in sources:
            dst = target / f"j{i:05d}_{src.name}"
            shutil.copy(src, dst)
            files.append(dst)
            i += 1
        for src in dicoms:    # each copy becomes a new study
            ds = pydicom.dcmread(src)
            if "PixelData" not in ds:
                continue
            ds.StudyInstanceUID = uid_from(f"bench-study-{i}")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from(f"bench-sop-{i}")
            dst = target / f"d{i:05d}.dcm"
            ds.save_as(dst)
            files.append(dst)
            i += 1
    return files


def naive(files: list[Path], model, gradcam: bool) -> float:
    from cxrscreen.explain import GradCam
    from cxrscreen.ingest import read_record
    from cxrscreen.normalise import load_model_input
    from cxrscreen.records import Radiograph

    cam = GradCam(model.keras_model) if gradcam else None
    start, count = time.perf_counter(), 0
    for path in files:
        record = read_record(path)
        if not isinstance(record, Radiograph):
            continue
        x = load_model_input(path, model.card.preprocessing, record.kind)[None]
        model.keras_model.predict(x, verbose=0)
        if cam is not None:
            cam(x)
        count += 1
    return count / (time.perf_counter() - start)


def batched(folder: Path, model, gradcam: bool, batch_size: int, workers: int) -> float:
    from cxrscreen.pipeline import BatchOptions, run_batch

    out = Path(tempfile.mkdtemp(prefix="cxr-bench-out-"))
    start = time.perf_counter()
    summary = run_batch([folder], BatchOptions(out=out, gradcam="all" if gradcam else "none", force=True,
                                               batch_size=batch_size, workers=workers), model=model)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return summary.scored_images / elapsed


def throughput_arguments(doc: str, n: int) -> argparse.ArgumentParser:
    """The options of the throughput benchmarks: --n files built by build_folder() from --data, --model,
    --batch-size, --workers."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray" / "test")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    return parser


def main() -> int:
    args = throughput_arguments(__doc__, 500).parse_args()
    from cxrscreen.infer import load_model

    model = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        files = build_folder(work / "inbox", args.n, args.data)
        print(f"{len(files)} files; model {model.path.name}; {os.cpu_count()} CPUs")
        # warm up both paths (graph tracing, thread pools) on a few files
        naive(files[:4], model, True)
        for gradcam in (False, True):
            slow = naive(files, model, gradcam)
            fast = batched(work / "inbox", model, gradcam, args.batch_size, args.workers)
            label = "Grad-CAM on " if gradcam else "Grad-CAM off"
            print(f"{label}: naive {slow:7.1f} img/s | batched {fast:7.1f} img/s | ratio {fast / slow:5.2f}x")
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
