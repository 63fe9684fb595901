"""Resident memory of a long-running `cxrscreen watch` daemon: does it grow with the studies it has screened?

    python benchmarks/watch_memory.py [--waves 12] [--per-wave 40] [--gradcam all] [--archive]

Starts the real daemon (``cxrscreen watch INBOX --out OUT --settle 1``) in a child process, then drops
WAVES waves of PER-WAVE new studies into its inbox, each a bundled DICOM sample (CR/DX at full resolution)
saved under new UIDs, moved in whole folders. After each wave it waits until the ledger has reported every
study so far (:func:`cxrscreen.watch.health`), lets the daemon idle for two polls and reads its resident set
size (VmRSS), and the peak while the wave was screened (sampled every 20 ms). Needs nothing from ../shared.

The baseline is the daemon itself after the first wave (model loaded, every code path warm): a daemon that
kept something per study would grow from there with every wave. Prints RSS, open files and threads per
wave, the last wave's RSS against the first's (the ratio) and the growth per 100 studies fitted over the
second half of the waves (the allocator's and the backend's high-water marks still rise over the first
hundred or so studies, whose images differ in size). The worklist and summary list every study of the
last seven days (`--worklist-days`), so they, and their rows in memory, do grow with a burst like this
one: that part of the growth is bounded by the window, not a leak.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from batch_memory import rss_kib  # noqa: E402


def open_files_and_threads(pid: int) -> tuple[int, int]:
    """The daemon's open file descriptors and threads: a daemon that leaked either would end at a limit."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return -1, -1
    return fds, threads


def dicom_samples() -> list:
    import pydicom

    found = []
    for path in sorted(p for p in (ROOT / "samples").rglob("*") if p.is_file() and p.suffix not in (".py", ".md")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if "PixelData" in ds and str(ds.get("Modality", "")) in ("CR", "DX") \
                and str(ds.get("ViewPosition", "PA")).upper() in ("PA", "AP", ""):
            found.append(ds)
    return found


def write_wave(staging: Path, inbox: Path, wave: int, n: int, samples: list) -> None:
    """N new studies, one image each, written outside the inbox and moved in as one folder."""
    from cxrscreen.testing import uid_from

    folder = staging / f"wave{wave:03d}"
    folder.mkdir(parents=True)
    for i in range(n):
        ds = samples[i % len(samples)]
        key = f"watch-memory-{wave}-{i}"
        ds.StudyInstanceUID = uid_from(f"{key}-study")
        ds.SeriesInstanceUID = uid_from(f"{key}-series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from(f"{key}-sop")
        ds.AccessionNumber = f"WM{wave:03d}{i:04d}"
        ds.save_as(folder / f"{i:04d}.dcm")
    folder.rename(inbox / folder.name)


def wait_reported(daemon: subprocess.Popen, out: Path, total: int, timeout: float) -> int:
    """Peak RSS (KiB) of the daemon until its ledger has reported TOTAL studies."""
    from cxrscreen.watch import health

    peak, deadline, next_check = 0, time.time() + timeout, 0.0
    while True:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited {daemon.returncode}; see its log")
        peak = max(peak, rss_kib(daemon.pid))
        now = time.time()
        if now >= next_check:
            next_check = now + 0.5
            try:
                studies = health(out)["studies"]
            except Exception:
                studies = {}
            if studies.get("reported", 0) + studies.get("not_screened", 0) + studies.get("failed", 0) >= total:
                return peak
        if now > deadline:
            raise SystemExit(f"{total} studies not reported within {timeout:.0f} s: {studies}")
        time.sleep(0.02)


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=12)
    parser.add_argument("--per-wave", type=int, default=40)
    parser.add_argument("--gradcam", default="all", choices=["all", "flagged", "none"])
    parser.add_argument("--archive", action="store_true", help="run the daemon with --archive (inputs moved out)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a wave may take")
    args = parser.parse_args()
    if args.waves < 4:
        parser.error("--waves must be at least 4 (the growth is fitted on the second half)")
    samples = dicom_samples()
    if not samples:
        raise SystemExit("no frontal CR/DX DICOM sample found under samples/")
    tmp = Path(tempfile.mkdtemp(prefix="cxr-watch-memory-"))
    inbox, out, staging, log = tmp / "inbox", tmp / "out", tmp / "staging", tmp / "watch.log"
    inbox.mkdir()
    command = [sys.executable, "-m", "cxrscreen", "watch", str(inbox), "--out", str(out), "--settle", "1",
               "--rescan", "5", "--gradcam", args.gradcam]
    if args.archive:
        command += ["--archive", str(tmp / "archive")]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    print(f"daemon: {' '.join(command[2:])}; {args.waves} waves of {args.per_wave} studies "
          f"({len(samples)} samples); log {log}")
    rows = []
    with open(log, "wb") as log_handle:
        daemon = subprocess.Popen(command, env=env, stdout=log_handle, stderr=subprocess.STDOUT)
        try:
            started = time.time()
            for wave in range(args.waves):
                t0 = time.time()
                write_wave(staging, inbox, wave, args.per_wave, samples)
                peak = wait_reported(daemon, out, (wave + 1) * args.per_wave, args.timeout)
                time.sleep(1.0)     # two polls idle: reports written, round over
                rss, (fds, threads) = rss_kib(daemon.pid), open_files_and_threads(daemon.pid)
                rows.append((wave + 1, (wave + 1) * args.per_wave, rss, peak, time.time() - t0, fds, threads))
                print(f"wave {wave + 1}: {rows[-1][1]} studies reported, RSS {rss / 1024:.0f} MiB idle, "
                      f"{peak / 1024:.0f} MiB peak, {fds} open files, {threads} threads, {rows[-1][4]:.0f} s")
            elapsed = time.time() - started
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
    first, last = rows[0], rows[-1]
    half = rows[len(rows) // 2:]
    per_100 = slope([r[1] for r in half], [r[2] / 1024 for r in half]) * 100
    print(f"{last[1]} studies in {elapsed:.0f} s; daemon exited {code} on SIGTERM")
    print(f"idle RSS after wave {last[0]} against wave 1: {last[2] / 1024:.0f} / {first[2] / 1024:.0f} MiB = "
          f"{last[2] / first[2]:.2f}x; peak {last[3] / 1024:.0f} / {first[3] / 1024:.0f} MiB = "
          f"{last[3] / first[3]:.2f}x; idle RSS fitted over waves {half[0][0]}-{last[0]}: {per_100:+.1f} MiB per 100 "
          "studies")
    print(f"open files {first[5]} -> {last[5]}, threads {first[6]} -> {last[6]}")
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
