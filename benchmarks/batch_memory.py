"""Peak memory of `cxrscreen batch` as the input grows: does it stay flat?

    python benchmarks/batch_memory.py [--small 200] [--large 800] [--gradcam all]

Builds two folders of SMALL and LARGE files, the bundled full-resolution DICOM
samples (CR/DX, 1-3k pixels a side, the inputs that cost memory) repeated as new
studies; needs nothing from ../shared. Then runs :func:`cxrscreen.pipeline.run_batch` on each in a
fresh child process, sampling the child's resident set size (VmRSS) every 20 ms.
Prints the peak RSS of both runs, their ratio and the ratio of the inputs.
A pipeline that held every decoded image would grow with the input; a bounded
one stays near a ratio of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = """
import json, sys
from pathlib import Path
from cxrscreen.pipeline import BatchOptions, run_batch
summary = run_batch([Path(sys.argv[1])], BatchOptions(out=Path(sys.argv[2]), gradcam=sys.argv[3]))
print(json.dumps({"studies": summary.studies, "images": summary.scored_images}))
"""


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss(folder: Path, out: Path, gradcam: str) -> tuple[int, dict, float]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    started = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(out), gradcam], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, rss_kib(child.pid))
        time.sleep(0.02)
    stdout = child.stdout.read()
    if child.returncode not in (0, 1):
        raise SystemExit(f"batch failed with exit code {child.returncode}")
    return peak, json.loads(stdout.strip().splitlines()[-1]), time.time() - started


def main() -> None:
    from batch_throughput import build_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=800)
    parser.add_argument("--gradcam", default="all", choices=["all", "flagged", "none"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for name, n in (("small", args.small), ("large", args.large)):
            files = build_folder(tmp / name, n, tmp / "no-jpeg-source")     # DICOM samples only
            peak, summary, seconds = peak_rss(tmp / name, tmp / f"out_{name}", args.gradcam)
            results[name] = (len(files), peak, summary, seconds)
            print(f"{name}: {len(files)} files, {summary['studies']} studies, {summary['images']} images scored, "
                  f"peak RSS {peak / 1024:.0f} MiB, {seconds:.0f} s")
    (n_small, p_small, _, _), (n_large, p_large, _, _) = results["small"], results["large"]
    print(f"input ratio {n_large / n_small:.1f}x; peak RSS ratio {p_large / p_small:.2f}x "
          f"(+{(p_large - p_small) / 1024:.0f} MiB for {n_large - n_small} more files)")


if __name__ == "__main__":
    main()
