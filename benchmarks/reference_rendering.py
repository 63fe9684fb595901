"""cxrscreen's display of DICOM images against DCMTK's: every image pydicom and pydicom-data ship (about 150:
every transfer syntax, CR/DX/MR/CT/US, MONOCHROME1 and 2, windows, VOI LUTs, rescale, padding, RGB, YBR and
palette colour) and the bundled samples, each rendered by :func:`cxrscreen.testing.compare_with_dcmtk`.

    python benchmarks/reference_rendering.py [--tolerance 0.001] [--random N [--seed S]]

DCMTK (``apt-get install dcmtk``) is an independent implementation of the PS3.3 grayscale pipeline; it is
told to use the same VOI as cxrscreen (the header's first window or VOI LUT, else cxrscreen's own window
as a LINEAR window). Prints, per file, the transfer syntax, who decoded it (DCMTK, or pydicom for JPEG
2000, which DCMTK does not decode), the VOI, and the largest and mean difference of a pixel as a fraction of
the display range. A file agrees when its largest difference is within ``--tolerance``; lossy JPEG is
decoded by two different libjpeg builds, whose rounding differs by a grey level here and there, so there
the mean must be within the tolerance and the largest within 0.02. The run exits 1 when a file differs
beyond that, except the few where DCMTK itself is wrong (``DCMTK_WRONG``: shown by the same image in another
encoding, which agrees). Files cxrscreen fails (a corrupt or colour test file) are listed with the reason and not
compared. ``--random N`` adds N small images under random grayscale headers (:func:`random_headers`); those
a header's window or LUT makes blank, cxrscreen fails by design (not compared). Not a timing: a correctness
check, in the same run as its reference. Needs no ../shared.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSSY_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
# Where DCMTK 3.6.7 is the one that is wrong, shown by the same image in another encoding, which agrees.
DCMTK_WRONG = {
    "rtdose_expb.dcm": "32-bit explicit big endian: DCMTK shows every pixel white; cxrscreen's image equals its "
                       "image of rtdose.dcm (the same pixels, little endian), which agrees with DCMTK",
    "rtdose_expb_1frame.dcm": "the same, one frame (rtdose_1frame.dcm agrees)",
}


def sources() -> list[Path]:
    from pydicom.data import get_testdata_files

    from cxrscreen.ingest import sniff
    from cxrscreen.records import FileKind

    files = sorted({Path(f) for f in get_testdata_files("*")} | set((ROOT / "samples").rglob("*")))
    return [f for f in files if f.is_file() and sniff(f) is FileKind.DICOM]


def random_headers(count: int, seed: int, folder: Path) -> list[tuple[Path, str]]:
    """``count`` radiograph-like images under random grayscale headers, written to ``folder``: 8-16 bits
    stored, signed or not, MONOCHROME1 or 2, a rescale (integer slope: DCMTK keeps rescaled values as whole
    numbers, see README) or a Modality LUT, a LINEAR or SIGMOID window, a VOI LUT of 8-, 12- or 16-bit entries
    (one per word or, for 8 bits, packed two to a word) or no VOI, and Presentation LUT Shape INVERSE.
    Returns each file with a line that says what its header has."""
    import random

    import numpy as np

    from cxrscreen.testing import lut_item, make_dicom, save

    rng = random.Random(seed)
    made = []
    for k in range(count):
        bits, signed = rng.choice([8, 10, 12, 14, 15, 16]), rng.random() < 0.3
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        ramp = np.linspace(0, 1, 80)[None, :] * np.linspace(0.3, 1, 96)[:, None]
        noise = np.random.default_rng(seed * 100003 + k).normal(0, (hi - lo) * 0.02, ramp.shape)
        pixels = np.clip(np.round(lo + ramp * (hi - lo) * rng.uniform(0.3, 1) + noise), lo, hi)
        pixels = pixels.astype(np.int16 if signed else np.uint16 if bits > 8 else np.uint8)
        ds = make_dicom(pixels, seed=f"random/{seed}/{k}", bits_stored=bits, signed=signed,
                        photometric=rng.choice(["MONOCHROME1", "MONOCHROME2"]))
        for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        said = [f"{bits} bits", "signed" if signed else "unsigned", ds.PhotometricInterpretation]
        slope, intercept = 1, 0
        if rng.random() < 0.4:
            slope, intercept = rng.choice([1, 2, 3]), rng.choice([0, -1024, 100])
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
            said.append(f"rescale {slope}x{intercept:+d}")
        elif rng.random() < 0.2 and not signed:
            ds.ModalityLUTSequence = [lut_item(np.minimum(np.arange(hi + 1) * 3 // 2, 65535), 0, 16)]
            ds.ModalityLUTSequence[0].ModalityLUTType = "US"
            slope = 1.5
            said.append("Modality LUT")
        low, high = sorted((lo * slope + intercept, hi * slope + intercept))
        choice = rng.random()
        # a LUT Descriptor addresses 16-bit input values: rescaled values beyond them no VOI LUT can map
        lut_fits = (-32768 <= low and high <= 32767) if signed else (0 <= low and high <= 65535)
        if choice < 0.5 or (choice < 0.8 and not lut_fits):
            center, width = round(rng.uniform(low, high)), max(2, round(rng.uniform(0.05, 1.2) * (high - low)))
            ds.WindowCenter, ds.WindowWidth = center, width
            ds.VOILUTFunction = rng.choice(["LINEAR", "SIGMOID"])
            said.append(f"window {center}/{width} {ds.VOILUTFunction}")
        elif choice < 0.8:
            first = int(np.clip(rng.uniform(low, (low + high) / 2), -32768 if signed else 0, 32767 if signed else 65535))
            entries = min(int(rng.uniform(0.2, 1) * (high - low)) + 2, 32767 if signed else 65535 - max(first, 0))
            lut_bits, packed = rng.choice([8, 12, 16]), rng.random() < 0.5
            values = np.round((np.arange(entries) / (entries - 1)) ** rng.choice([0.5, 1, 2]) * ((1 << lut_bits) - 1))
            ds.VOILUTSequence = [lut_item(values, first, lut_bits, packed=packed and lut_bits == 8)]
            said.append(f"VOI LUT {entries} x {lut_bits} bits from {first}" + (" packed" if packed and lut_bits == 8 else ""))
        else:
            said.append("no VOI")
        if rng.random() < 0.2:
            ds.PresentationLUTShape = "INVERSE"
            said.append("Presentation LUT Shape INVERSE")
        made.append((save(ds, folder / f"random_{k:04d}.dcm"), ", ".join(said)))
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--random", type=int, default=0, metavar="N",
                        help="also N images under random grayscale headers (random_headers)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("dcmj2pnm") is None:
        print("dcmj2pnm not found: install DCMTK (apt-get install dcmtk)")
        return 2

    import logging

    import pydicom

    from cxrscreen.errors import CxrError
    from cxrscreen.ingest import read_dicom, transfer_syntax
    from cxrscreen.testing import compare_with_dcmtk

    logging.disable(logging.WARNING)      # header warnings of pydicom's deliberately odd test files
    agree, differ, dcmtk_wrong, not_compared = [], [], [], []

    def compare(path: Path, name, syntax: str, allowance: float = 0.0) -> None:
        try:
            check = compare_with_dcmtk(path)
        except (CxrError, RuntimeError, ValueError) as exc:
            not_compared.append((name, str(exc).splitlines()[0][:150]))
            return
        lossy = syntax in LOSSY_JPEG
        ok = (check.mean <= args.tolerance + allowance / 2 and check.largest <= 0.02 + allowance) if lossy else \
            check.largest <= args.tolerance + allowance
        known = not ok and DCMTK_WRONG.get(path.name)
        (agree if ok else dcmtk_wrong if known else differ).append(name)
        print(f"{str(name)[-44:]:44s} {pydicom.uid.UID(syntax).name[:22]:22s} {check.decoded_by:8s} "
              f"{check.largest:9.2e} {check.mean:9.2e}  {check.voi}"
              f"{'' if ok else f'  (DCMTK wrong: {known})' if known else '  DIFFERS'}")

    print(f"{'file':44s} {'syntax':22s} {'decoded':8s} {'largest':>9s} {'mean':>9s}  VOI")
    for path in sources():
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        try:
            ds = read_dicom(path)
        except CxrError as exc:
            not_compared.append((name, str(exc).splitlines()[0][:150]))
            continue
        if "PixelData" not in ds:
            not_compared.append((name, "no pixel data"))
            continue
        colour_8_bit = not str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME") \
            and int(ds.get("BitsStored", 8) or 8) <= 8
        # DCMTK's grey of an 8-bit colour image is whole grey levels of 256 (cxrscreen's is not rounded)
        compare(path, name, transfer_syntax(ds) or "1.2.840.10008.1.2", 2 / 255 if colour_8_bit else 0.0)
    if args.random:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            for path, said in random_headers(args.random, args.seed, Path(folder)):
                # DCMTK widens an 8-bit LUT's output by a shift (255 -> 65280 of 65535): a grey level of 256 below
                compare(path, f"{path.name}: {said}", "1.2.840.10008.1.2.1", 1 / 255 if "x 8 bits" in said else 0.0)
    print()
    for name, why in not_compared:
        print(f"not compared: {name}: {why}")
    print(f"\n{len(agree)} agree with DCMTK, {len(differ)} differ, {len(dcmtk_wrong)} where DCMTK is wrong, "
          f"{len(not_compared)} not compared")
    for name in differ:
        print(f"DIFFERS: {name}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
