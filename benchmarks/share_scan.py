"""The scan on a network share: folders listed and headers read one at a time against cxrscreen's scan.

    pip install fusepy        # and a Linux machine with /dev/fuse and fusermount (apt install fuse3)
    python benchmarks/share_scan.py [--files 300] [--latency 2] [--side 1024] [--per-study 2]

A PACS export is often read from NFS or SMB, where every request for a file (its attributes, opening it,
each read) waits a round trip: 0.2-1 ms on a LAN, several ms to a remote site. This script writes FILES
uncompressed 12-bit DX files of SIDE x SIDE, PER_STUDY in each study's folder as a PACS export has them
(needs nothing from ../shared), and serves them through a FUSE file system of its own that passes every
request through after LATENCY ms, served by several threads as a file server would. It then times, each
on a fresh mount (so that the first pass's pages are not cached for the second):

- baseline: ``scan(threads=1)``, every folder listed and every header read one after the other, as the
  scan did until it had threads;
- cxrscreen: ``scan()``, which lists folders and reads headers one at a time while that computes more
  than it waits, and otherwise 8 at a time (:class:`cxrscreen.ingest.Waits`);

and both again on the local folder (cached), where the scan must not be slower than one at a time.
Then ``watch`` with the share as its inbox: a rescan (the folders walked, every file stat-ed), and, once
the file attributes the kernel keeps have expired (1 s here; an NFS inbox mounted ``noac``, as is done to
see new files at once, keeps none), a poll (every file still settling stat-ed, every 0.25 s):

- baseline: the files stat-ed one after the other, as ``watch`` did until it stat-ed them in threads;
- cxrscreen: one at a time while that computes more than it waits, then 8 at a time.

The rescan's own stats mostly find what its walk just fetched: its gain is the poll's.

Prints the times, the ratios and the requests per file the share served. The file server is Python
and shares the machine's cores with the scan, so a real share's gain is larger where the scan's CPU
is not the limit. Exits 0 with a line saying why when FUSE cannot be used here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def serve(source: str, mountpoint: str, latency_ms: str, counts_file: str) -> None:
    """Run the delaying pass-through file system in the foreground until it is unmounted."""
    import collections

    from fuse import FUSE, FuseOSError, Operations

    delay, counts = float(latency_ms) / 1000, collections.Counter()

    class Delayed(Operations):
        def _wait(self, op: str) -> None:
            counts[op] += 1
            time.sleep(delay)

        def _path(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            self._wait("getattr")
            try:
                st = os.lstat(self._path(path))
            except OSError as exc:
                raise FuseOSError(exc.errno) from None
            return {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                                      "st_nlink", "st_size", "st_uid")}

        def readdir(self, path, fh):
            self._wait("readdir")
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path, flags):
            self._wait("open")
            return os.open(self._path(path), flags)

        def read(self, path, size, offset, fh):
            self._wait("read")
            return os.pread(fh, size, offset)

        def release(self, path, fh):
            os.close(fh)

        def destroy(self, path):
            Path(counts_file).write_text(json.dumps(counts))

    FUSE(Delayed(), mountpoint, foreground=True, nothreads=False, ro=True)


def mounted(source: Path, mountpoint: Path, latency: float, counts: Path):
    """Start the file server on ``mountpoint``; returns its process once the mount is there."""
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(source), str(mountpoint), str(latency),
                                str(counts)], stderr=subprocess.PIPE)
    for _ in range(100):
        if os.path.ismount(mountpoint):
            return process
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode(errors="replace").strip() or "the file server stopped")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the mount did not appear")


def unmount(mountpoint: Path, process) -> None:
    subprocess.run([shutil.which("fusermount3") or "fusermount", "-u", str(mountpoint)], check=False)
    process.wait(timeout=30)


def timed_scan(folder: Path, threads: int | None) -> tuple[float, int]:
    from cxrscreen.ingest import scan

    start = time.perf_counter()
    items = list(scan([folder]) if threads is None else scan([folder], threads=threads))
    return time.perf_counter() - start, len(items)


def timed_watch(inbox: Path, out: Path, serial: bool, expire: float) -> tuple[float, float, int]:
    """``watch`` on ``inbox``: seconds of a rescan (the walk, and a stat of every file) and, ``expire`` seconds
    later, of a poll (every file still settling stat-ed again), and the files seen."""
    from cxrscreen.ingest import Waits
    from cxrscreen.watch import Watcher, WatchOptions

    watcher = Watcher(WatchOptions(inbox, out, settle=3600, gradcam="none"))      # nothing settles here
    if serial:
        watcher._stats = Waits(probe=10**9)      # never judged: every stat in this thread
    start = time.perf_counter()
    watcher._rescan(time.monotonic())
    rescan = time.perf_counter() - start
    time.sleep(expire)
    start = time.perf_counter()
    watcher._settle()
    return rescan, time.perf_counter() - start, len(watcher.candidates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--latency", type=float, default=2.0, help="ms each request to the share waits")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--per-study", type=int, default=2, help="files in each study's folder")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    try:
        import fuse
        del fuse
    except (ImportError, OSError) as exc:       # fusepy raises OSError when libfuse is missing
        print(f"skipped: {exc} (pip install fusepy; apt install fuse3)")
        return 0
    if not Path("/dev/fuse").exists() or not (shutil.which("fusermount3") or shutil.which("fusermount")):
        print("skipped: no /dev/fuse or fusermount on this machine")
        return 0

    import numpy as np

    from cxrscreen.ingest import SCAN_THREADS, scan
    from cxrscreen.testing import make_dicom, save

    work = Path(tempfile.mkdtemp(prefix="cxr-share-scan-"))
    source, mountpoint = work / "files", work / "share"
    source.mkdir()
    mountpoint.mkdir()
    try:
        pixels = (np.random.default_rng(0).random((args.side, args.side)) * 4095).astype(np.uint16)
        for i in range(args.files):       # a folder per study, as PACS exports have them
            folder = source / f"study{i // args.per_study:05d}"
            folder.mkdir(exist_ok=True)
            save(make_dicom(pixels, seed=f"share-{i}", bits_stored=12), folder / f"{i:05d}.dcm")
        list(scan([folder]))      # the imports a scan makes
        print(f"{args.files} files of {args.side} x {args.side} x 16 bits; each request to the share waits "
              f"{args.latency:g} ms; scan threads {SCAN_THREADS}")
        results = {}
        for label, threads in (("baseline", 1), ("cxrscreen", None)):
            counts = work / f"{label}.json"
            try:
                process = mounted(source, mountpoint, args.latency, counts)
            except RuntimeError as exc:
                print(f"skipped: cannot mount the share here: {exc}")
                return 0
            try:
                seconds, n = timed_scan(mountpoint, threads)
            finally:
                unmount(mountpoint, process)
            assert n == args.files, n
            requests = sum(json.loads(counts.read_text()).values()) if counts.exists() else 0
            results[label] = seconds
            print(f"  share  {label:10s} {seconds:7.2f} s  {seconds / n * 1000:6.2f} ms a file  "
                  f"{requests / n:4.1f} requests a file")
        print(f"ratio on the share, baseline / cxrscreen: {results['baseline'] / results['cxrscreen']:.2f}x")
        local = {}
        for label, threads in (("baseline", 1), ("cxrscreen", None), ("baseline", 1), ("cxrscreen", None)):
            local.setdefault(label, []).append(timed_scan(source, threads)[0])
        for label, times in local.items():
            print(f"  local  {label:10s} {min(times):7.3f} s (best of {len(times)})")
        print(f"ratio on the local disk, baseline / cxrscreen: {min(local['baseline']) / min(local['cxrscreen']):.2f}x")
        watched = {}
        for label, serial in (("baseline", True), ("cxrscreen", False)):
            process = mounted(source, mountpoint, args.latency, work / f"watch-{label}.json")
            try:
                rescan, poll, n = timed_watch(mountpoint, work / f"out-{label}", serial, expire=1.5)
            finally:
                unmount(mountpoint, process)
            assert n == args.files, n
            watched[label] = rescan, poll
            print(f"  watch, share  {label:10s} rescan {rescan:6.2f} s   poll {poll:6.2f} s")
        (rescan_before, poll_before), (rescan_now, poll_now) = watched["baseline"], watched["cxrscreen"]
        print(f"ratio of watch on the share, baseline / cxrscreen: rescan {rescan_before / rescan_now:.2f}x, "
              f"poll {poll_before / poll_now:.2f}x")
        local = {label: min(timed_watch(source, work / f"out-local-{label}", serial, expire=0)[1] for _ in range(3))
                 for label, serial in (("baseline", True), ("cxrscreen", False))}
        print(f"  watch, local  poll: baseline {local['baseline'] * 1000:.1f} ms, cxrscreen "
              f"{local['cxrscreen'] * 1000:.1f} ms (best of 3): {local['baseline'] / local['cxrscreen']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
