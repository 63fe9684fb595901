"""JPEG data changed inside (bytes flipped in transfer or on a disk, the file's length unchanged): how often the
picture comes out damaged, and how often cxrscreen refuses it rather than screening it.

    python benchmarks/changed_jpeg.py [--copies 40] [--seed 1]

Sources: the bundled JPEG samples (a plain JPEG, a JPEG baseline DICOM), every JPEG baseline or extended
8-bit DICOM pydicom ships, and the 24 full-resolution JPEGs of ../shared/data/fullres when it is there. Each
gets ``--copies`` copies with 8 bytes replaced at a seeded place inside its (first frame's) scan data. Each copy
is decoded twice in the same run: by the plain decoders alone, the baseline (OpenCV for a JPEG file, pydicom's
for a DICOM: what cxrscreen used before it decoded strictly), to see whether the picture changed, and by cxrscreen
(:func:`cxrscreen.normalise.load_unit_image`), to see whether it is refused. Prints a table per kind of file:

- picture changed, refused: the damage is caught;
- picture changed, screened: it escapes (libjpeg saw nothing wrong: the changed bytes decoded as valid data);
- picture unchanged, refused: a refusal of a picture that decodes whole (should be 0);
- picture unchanged, screened: the bytes changed nothing the decoder uses.

Not a timing: a robustness check. Exits 1 when a picture that decodes whole is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "fullres"
JPEG_DCT = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


def sources() -> list[tuple[Path, str]]:
    """(file, kind): plain JPEG files and 8-bit JPEG baseline/extended DICOM files."""
    import pydicom
    from pydicom.data import get_testdata_files

    found = [(p, "JPEG file") for p in sorted((ROOT / "samples").rglob("*.jp*g"))]
    found += [(p, "JPEG file") for p in sorted(SHARED.glob("*/*.jp*g"))] if SHARED.is_dir() else []
    dicoms = sorted((ROOT / "samples").rglob("*.dcm")) + [Path(f) for f in get_testdata_files("*.dcm")]
    for path in dicoms:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if str(ds.file_meta.get("TransferSyntaxUID", "")) in JPEG_DCT and int(ds.get("BitsAllocated", 0)) == 8:
            found.append((path, "JPEG baseline DICOM"))
    return found


def scan_span(source: Path, whole: bytes, kind: str) -> tuple[int, int] | None:
    """Where the (first frame's) scan data lies in the file: after its first SOS segment, before its EOI."""
    start, end = 0, len(whole)
    if kind != "JPEG file":
        import pydicom
        from pydicom.encaps import generate_frames

        ds = pydicom.dcmread(source)
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
        start = whole.find(frame[:256])
        if start < 0:
            return None
        end = start + len(frame)
    sos = whole.find(b"\xff\xda", start, end)
    eoi = whole.rfind(b"\xff\xd9", start, end)
    if sos < 0 or eoi < 0:
        return None
    first = sos + 2 + int.from_bytes(whole[sos + 2:sos + 4], "big")
    return (first, eoi) if eoi - first > 64 else None


def plain_decode(path: Path, kind: str) -> np.ndarray | None:
    """The picture as the unchecked decoders give it; None when they cannot decode it at all."""
    import cv2
    import pydicom

    try:
        if kind == "JPEG file":
            return cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        return pydicom.dcmread(path).pixel_array
    except Exception:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=40, help="changed copies of each file")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from cxrscreen.errors import InputError
    from cxrscreen.normalise import load_unit_image

    rng = np.random.default_rng(args.seed)
    table: Counter = Counter()
    files: Counter = Counter()
    wrongly: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        for source, kind in sources():
            whole = source.read_bytes()
            span = scan_span(source, whole, kind)
            if span is None:
                continue
            reference = plain_decode(source, kind)
            if reference is None:
                continue
            files[kind] += 1
            for k in range(args.copies):
                changed = bytearray(whole)
                at = int(rng.integers(span[0], span[1] - 8))
                changed[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
                path = Path(folder) / f"{k}_{source.name}"
                path.write_bytes(bytes(changed))
                print(f"\r{kind}: {source.name[:50]:50s} {k + 1}/{args.copies}", end="", file=sys.stderr, flush=True)
                picture = plain_decode(path, kind)
                damaged = picture is None or picture.shape != reference.shape or not np.array_equal(picture,
                                                                                                     reference)
                try:
                    load_unit_image(path)
                    ended = "screened"
                except InputError as exc:
                    ended = "refused"
                    if not damaged:
                        wrongly.append(f"{source.name} copy {k}: {exc.cause}")
                table[kind, "picture changed" if damaged else "picture unchanged", ended] += 1
                table[kind, "undecodable"] += picture is None
                path.unlink()
    print("\r" + " " * 90, file=sys.stderr)
    print(f"{args.copies} copies of each file, 8 bytes changed inside its scan data (seed {args.seed})")
    print("| files | picture changed, refused | picture changed, screened | picture unchanged, refused | "
          "picture unchanged, screened |")
    print("|---|---|---|---|---|")
    for kind in sorted(files):
        cells = [table[kind, damaged, ended] for damaged in ("picture changed", "picture unchanged")
                 for ended in ("refused", "screened")]
        print(f"| {files[kind]} {kind}{'s' if files[kind] > 1 else ''} | {' | '.join(map(str, cells))} |")
        changed = cells[0] + cells[1]
        if changed:
            print(f"  {kind}: {cells[0] / changed:.0%} of the changed pictures refused; by the plain decoders "
                  f"alone (they fail only where they cannot decode at all): {table[kind, 'undecodable'] / changed:.0%}")
    for line in wrongly:
        print("REFUSED WHOLE:", line)
    return 1 if wrongly else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
