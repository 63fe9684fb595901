"""Throughput of `cxrscreen watch` on a burst: reports written while the model scores and rounds run back
to back, against what watch did before each of those changes, in one process run.

    python benchmarks/watch_throughput.py [--n 400] [--data ../shared/data/chest_xray/test] [--processes 2]

Builds an inbox of at least N files (the test JPEGs when ../shared is there, plus the DICOM samples
repeated as new studies; see batch_throughput.py), then runs ``Watcher(..., once=True)`` on it (settle
0, inputs left in place, a fresh --out and ledger each time) with:

* inline: each study's report written and recorded before the next study is taken from the model
  (``watch.REPORTS_AHEAD_BATCHES = 0``), and a poll (0.25 s) waited between rounds: the baseline;
* thread, pausing: reports written by a thread while the model scores, a poll waited between rounds;
* thread: the default, rounds back to back (a round is at most 128 images);
* processes: ``--report-processes P`` (when P > 0).

and prints images/second (files taken, hashed, scored, reported and recorded, per second of the whole
run, start-up included) and each mode's ratio to inline. Grad-CAM is on for every image (the default).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_watch(inbox: Path, model, *, processes: int, inline: bool, batch_size: int, workers: int,
              pause: bool = False) -> tuple[float, int]:
    from cxrscreen import watch

    out = Path(tempfile.mkdtemp(prefix="cxr-bench-watch-"))
    ahead = watch.REPORTS_AHEAD_BATCHES
    watch.REPORTS_AHEAD_BATCHES = 0 if inline else ahead
    try:
        options = watch.WatchOptions(inbox, out, settle=0.0, rescan=3600.0, once=True, batch_size=batch_size,
                                     workers=workers, report_processes=processes, max_images=128)
        watcher = watch.Watcher(options, model=model)
        if pause:
            _pause_between_rounds(watcher)
        start = time.perf_counter()
        code = watcher.run()
        elapsed = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"watch exited {code}")
        reports = watcher.reports_written
    finally:
        watch.REPORTS_AHEAD_BATCHES = ahead
        shutil.rmtree(out)
    return elapsed, reports


def _pause_between_rounds(watcher) -> None:
    """watch's loop before rounds ran back to back: after a round, a poll waited before the next one."""
    screen_ready, last = watcher._screen_ready, [False]

    def pausing() -> bool:
        if last[0]:
            watcher.stop.wait(watcher.options.poll)
        last[0] = screen_ready()
        return last[0]

    watcher._screen_ready = pausing


def main() -> int:
    import logging

    from batch_throughput import build_folder, throughput_arguments

    parser = throughput_arguments(__doc__, 400)
    parser.add_argument("--processes", type=int, default=2, help="report processes for the third mode (0: skip it)")
    args = parser.parse_args()

    from cxrscreen.infer import load_model

    logging.getLogger("cxrscreen").setLevel(logging.WARNING)
    model = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        files = build_folder(work / "inbox", args.n, args.data)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{len(files)} files; model {model.path.name} ({model.compute}); {cpus} CPUs")
        warm = work / "warm"
        warm.mkdir()
        for f in files[:8]:
            shutil.copy(f, warm / f.name)
        run_watch(warm, model, processes=0, inline=True, batch_size=args.batch_size, workers=args.workers)
        modes = [("inline", 0, True, True), ("thread, pausing", 0, False, True), ("thread", 0, False, False)]
        if args.processes:
            modes.append((f"{args.processes} processes", args.processes, False, False))
        base = None
        for label, processes, inline, pause in modes:
            elapsed, reports = run_watch(work / "inbox", model, processes=processes, inline=inline, pause=pause,
                                         batch_size=args.batch_size, workers=args.workers)
            rate = len(files) / elapsed
            base = base or rate
            print(f"{label:>15}: {rate:6.1f} img/s ({reports} reports, {elapsed:6.1f} s) | ratio to inline "
                  f"{rate / base:5.2f}x")
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
