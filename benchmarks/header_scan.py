"""The header scan against the bare header read: does cxrscreen read more of each file than it must?

    python benchmarks/header_scan.py [--files 60] [--rows 2500] [--columns 2048]

Writes FILES uncompressed 16-bit DX files of ROWS x COLUMNS (10 MB each at the defaults, the size of
a real CR or DX image stored uncompressed; needs nothing from ../shared), then times, from a cold
page cache where it may drop it (root on Linux; otherwise both runs read from memory, which hides
the difference and is said), two passes over them:

- baseline: ``pydicom.dcmread(path, stop_before_pixels=True)`` per file, the least a header read costs;
- cxrscreen: :func:`cxrscreen.ingest.scan`, which decides from the header what each file is (and
  must not read the pixel data: the images are decoded later, once).

Prints both times, the ratio and the bytes each read from disk (from /proc/self/io where there is
one). Until the commit that added this script, the scan read every file's pixel data while looking
for undeclared UTF-8 text: at the defaults, on the development machine's disk, 586 of 586 MiB read
and 8.2x the baseline, against 1 MiB and 2.8x after (what remains is the scan's own work in Python:
sniffing, the record, the selection rules). On a network share the bytes are what costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def timed(label: str, run) -> float:
    cold = drop_caches()
    before, start = read_bytes(), time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    after = read_bytes()
    read = f", {(after - before) / 2 ** 20:,.0f} MiB read from disk" if before is not None and after is not None else ""
    print(f"  {label:10s} {seconds:7.3f} s{read}{'' if cold else ' (page cache not dropped)'}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=60)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--columns", type=int, default=2048)
    args = parser.parse_args()

    import pydicom

    from cxrscreen.ingest import scan
    from cxrscreen.records import Radiograph
    from cxrscreen.testing import make_dicom, save

    folder = Path(tempfile.mkdtemp(prefix="cxr-header-scan-"))
    try:
        pixels = (np.random.default_rng(0).random((args.rows, args.columns)) * 4095).astype(np.uint16)
        paths = [save(make_dicom(pixels, seed=f"scan-{i}", bits_stored=12), folder / f"{i:05d}.dcm")
                 for i in range(args.files)]
        size = sum(p.stat().st_size for p in paths) / 2 ** 20
        list(scan([paths[0]]))        # the imports a scan makes (their libraries' reads are not the files')
        print(f"{args.files} files of {args.rows} x {args.columns} x 16 bits, {size:,.0f} MiB in all")
        base = timed("baseline", lambda: [pydicom.dcmread(p, stop_before_pixels=True) for p in paths])
        found: list = []
        ours = timed("cxrscreen", lambda: found.extend(scan([folder])))
        assert sum(isinstance(item, Radiograph) for item in found) == args.files, found[:3]
        print(f"ratio cxrscreen / baseline: {ours / base:.2f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
