"""Changed codestream headers: the first frame of eleven compressed DICOM files (JPEG baseline grey and colour,
12-bit extended, 8- and 16-bit lossless, JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy, HTJ2K,
RLE), the JPEG sample file and a 16-bit PNG made from the JPEG 2000 sample, with 1 to 3 of its first bytes
changed (seeded; with ``--bytes 0`` only its header bytes, before the coded data), each copy written whole (a
DICOM file around the frame) and read as ``batch`` reads it (:func:`cxrscreen.normalise.load_unit_image`) in a
child process that must live.

    python benchmarks/fuzz_codestreams.py [--copies 3000] [--first-seed 0] [--bytes 400] [--rss-mb 2000]

A header byte changed makes a decoder read another size, precision, table or segment length than the data
holds: what it must do is refuse the frame (a per-file failure). What it must not do, and what this looks for:
end the process (a segmentation fault: a lossless JPEG frame labelled baseline, decoded scaled, did), allocate
until the OOM killer ends it (a JPEG frame of 0 lines did), or raise something other than cxrscreen's per-file
errors (which would stop a batch). The parent watches the child's resident memory and ends it above
``--rss-mb`` (the sources are at most 2,000 pixels a side: none needs a tenth of that), so that an allocation
storm is reported as one instead of taking the machine; a child that ends is started again after the copy
that ended it.

Prints, per source, how many copies decoded (to its pixels, or to a changed picture) and how many were
refused, then every copy that ended the child, outgrew the memory bound or raised an uncaught exception, with
its seed (``--first-seed N --copies 1`` reads that one copy again); exits 1 when there is one. Not a timing: a
robustness check of the decoders cxrscreen installs, beside ``damaged_files.py`` (whole files damaged
anywhere) and ``changed_jpeg.py`` (JPEG scan data changed). Needs pydicom-data (the test extra) for five of its
sources; no ../shared.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (what it is, where it is: a path under the checkout, or a pydicom test file's name)
SOURCES = [
    ("JPEG baseline, grey", "samples/study5_cr_jpeg_baseline/IM0001.dcm"),
    ("JPEG baseline, colour", "SC_rgb_jpeg_gdcm.dcm"),
    ("JPEG extended, 12-bit", "JPGExtended.dcm"),
    ("JPEG lossless, 8-bit", "JPGLosslessP14SV1_1s_1f_8b.dcm"),
    ("JPEG lossless, 16-bit", "JPEG-LL.dcm"),
    ("JPEG-LS lossless", "MR_small_jpeg_ls_lossless.dcm"),
    ("JPEG-LS near-lossless", "JPEGLSNearLossless_16.dcm"),
    ("JPEG 2000 lossless", "samples/study1_cr_mono1_j2k/IM0001.dcm"),
    ("JPEG 2000 lossy", "US1_J2KI.dcm"),
    ("HTJ2K lossless", "tests/data/htj2k_lossless.dcm"),
    ("RLE", "samples/study2_dx_rescale_rle/IM0001.dcm"),
    ("JPEG file", "samples/study6_plain_jpeg/chest_export.jpg"),
    ("PNG file, 16-bit", "made: the JPEG 2000 sample's pixels"),
]

# The child: reads the sources' first frames once, then for each seed changes 1 to 3 of a frame's first bytes,
# writes the file and reads it. "START seed" before each reading, "END seed outcome" after it, so that the
# parent knows which copy a child that ended was reading.
CHILD = r"""
import logging, random, sys, warnings
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from cxrscreen.errors import CxrError
from cxrscreen.normalise import load_unit_image

import numpy as np

out, first, count, reach = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def headers(frame):     # where coded data starts: after JPEG's (or JPEG-LS's) first start-of-scan segment,
    # after JPEG 2000's first start-of-data marker, in a PNG's first IDAT chunk, after RLE's 64-byte header
    if frame[:2] == b"\xff\x4f":
        return frame.find(b"\xff\x93") + 2
    if frame[:2] == b"\xff\xd8":
        at = frame.find(b"\xff\xda")
        return at + 2 + int.from_bytes(frame[at + 2:at + 4], "big")
    if frame[:8] == b"\x89PNG\r\n\x1a\n":
        return frame.find(b"IDAT") + 4
    return 64


loaded = []
for source in sys.argv[5:]:
    if source.endswith((".jpg", ".png")):       # a picture file: its own bytes are changed, written as a file
        ds, frame, written = None, open(source, "rb").read(), out + source[-4:]
    else:                                       # a DICOM: its first frame's, written back into the data set
        ds, written = pydicom.dcmread(source), out
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    span = headers(frame) if reach == 0 else min(len(frame), reach)
    loaded.append((ds, frame, load_unit_image(source), span, written))
for seed in range(first, first + count):
    rng = random.Random(seed)
    ds, frame, whole, span, written = loaded[seed % len(loaded)]
    changed = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(0, span)
        changed[at] = rng.choice([0, 0xFF, rng.randrange(256), changed[at] ^ (1 << rng.randrange(8))])
    if ds is None:
        with open(written, "wb") as file:
            file.write(changed)
    else:
        ds.PixelData = encapsulate([bytes(changed) + b"\0" * (len(changed) % 2)])
        ds.save_as(written, enforce_file_format=False)
    print("START", seed, flush=True)
    try:
        pixels = load_unit_image(written)
        outcome = "decoded, " + ("the same" if pixels.shape == whole.shape and np.array_equal(pixels, whole)
                                 else "changed")
    except CxrError:
        outcome = "refused"
    except Exception as exc:
        outcome = "uncaught " + type(exc).__name__ + ": " + str(exc)[:200].replace("\n", " ")
    print("END", seed, outcome, flush=True)
"""


def resolve(where: str, folder: Path) -> Path | None:
    if where.startswith("made:"):               # a 16-bit PNG of the JPEG 2000 sample, written here
        import cv2

        from cxrscreen.ingest import decode_first_frame, read_dicom

        made = folder / "made.png"
        cv2.imwrite(str(made), decode_first_frame(read_dicom(ROOT / "samples/study1_cr_mono1_j2k/IM0001.dcm")))
        return made
    if "/" in where:
        return ROOT / where
    from pydicom.data import get_testdata_file

    found = get_testdata_file(where)
    return Path(found) if found else None


def resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(folder: Path, first: int, count: int, args, paths: list[Path]) -> tuple[list[str], str | None]:
    """Run the child over seeds ``first`` .. ``first + count - 1``: its output lines, and why it ended early
    (a signal, an exit status, the memory bound), or None when it read them all."""
    lines_at = folder / "child.out"
    env = dict(os.environ, RUST_BACKTRACE="0", PYTHONPATH=str(ROOT))
    with open(lines_at, "w") as lines, open(folder / "child.err", "w") as errors:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder / "changed.dcm"), str(first), str(count),
                                  str(args.bytes), *map(str, paths)], stdout=lines, stderr=errors, env=env)
        ended = None
        while child.poll() is None:
            if resident_mb(child.pid) > args.rss_mb:
                child.kill()
                child.wait()
                ended = f"resident memory over {args.rss_mb:,} MB"
                break
            time.sleep(0.02)
    if ended is None and child.returncode != 0:
        code = child.returncode
        ended = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return lines_at.read_text().splitlines(), ended


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3000, help="changed copies, spread over the sources in turn")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--bytes", type=int, default=400,
                        help="change bytes among each frame's first N; 0: among its headers only (before coded data)")
    parser.add_argument("--rss-mb", type=int, default=2000, help="end a child whose resident memory grows past this")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        kinds, paths = [], []
        for kind, where in SOURCES:
            path = resolve(where, Path(folder))
            if path is None or not path.is_file():
                print(f"left out: {kind} ({where} not found; pydicom-data is the test extra)")
                continue
            kinds.append(kind)
            paths.append(path)
        table: dict[str, Counter] = {kind: Counter() for kind in kinds}
        problems: list[str] = []
        started = time.perf_counter()
        seed, last = args.first_seed, args.first_seed + args.copies
        while seed < last:
            lines, ended = run_child(Path(folder), seed, last - seed, args, paths)
            reading = None
            for line in lines:
                word, number, *rest = line.split(" ", 2)
                number = int(number)
                kind = kinds[number % len(kinds)]
                if word == "START":
                    reading = number
                    continue
                reading = None
                outcome = rest[0]
                table[kind][outcome.split(":")[0]] += 1
                if outcome.startswith("uncaught"):
                    problems.append(f"seed {number} ({kind}): {outcome}")
                seed = number + 1
            if ended is not None:
                if reading is None:         # ended before its first copy: the sources themselves
                    raise SystemExit(f"the child ended before reading a copy ({ended}): "
                                     f"{(Path(folder) / 'child.err').read_text()[-2000:]}")
                kind = kinds[reading % len(kinds)]
                table[kind]["ended the child"] += 1
                problems.append(f"seed {reading} ({kind}): the child ended, {ended}")
                seed = reading + 1
            elif seed < last:
                raise SystemExit(f"the child stopped at seed {seed} without a reason: "
                                 f"{(Path(folder) / 'child.err').read_text()[-2000:]}")

    outcomes = sorted({outcome for counts in table.values() for outcome in counts})
    where = f"first {args.bytes} bytes" if args.bytes else "header bytes"
    print(f"{args.copies:,} changed copies (seeds {args.first_seed}..{last - 1}, 1-3 of each frame's {where} "
          f"changed) in {time.perf_counter() - started:.0f} s")
    print("| source | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(str(table[kind][outcome]) for outcome in outcomes) + " |")
    for problem in problems:
        print(problem)
    print(f"problems: {len(problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
