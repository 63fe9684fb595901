"""cxrscreen's display of DICOM images against DCMTK's: every monochrome image pydicom and pydicom-data ship
(about 100: every transfer syntax, CR/DX/MR/CT, MONOCHROME1 and 2, windows, VOI LUTs, rescale, padding)
and the bundled samples, each rendered by :func:`cxrscreen.testing.compare_with_dcmtk`.

    python benchmarks/reference_rendering.py [--tolerance 0.001]

DCMTK (``apt-get install dcmtk``) is an independent implementation of the PS3.3 grayscale pipeline; it is
told to use the same VOI as cxrscreen (the header's first window or VOI LUT, else cxrscreen's own window
as a LINEAR window). Prints, per file, the transfer syntax, who decoded it (DCMTK, or pydicom for JPEG
2000, which DCMTK does not decode), the VOI, and the largest and mean difference of a pixel as a fraction of
the display range. A file agrees when its largest difference is within ``--tolerance``; lossy JPEG is
decoded by two different libjpeg builds, whose rounding differs by a grey level here and there, so there
the mean must be within the tolerance and the largest within 0.02. The run exits 1 when a file differs
beyond that, except the few where DCMTK itself is wrong (``DCMTK_WRONG``: shown by the same image in another
encoding, which agrees). Files cxrscreen fails (a corrupt or colour test file) are listed with the reason and not
compared. Not a timing: a correctness check, in the same run as its reference. Needs no ../shared.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    if shutil.which("dcmj2pnm") is None:
        print("dcmj2pnm not found: install DCMTK (apt-get install dcmtk)")
        return 2

    import logging

    import pydicom

    from cxrscreen.errors import CxrError
    from cxrscreen.ingest import read_dicom
    from cxrscreen.testing import compare_with_dcmtk

    logging.disable(logging.WARNING)      # header warnings of pydicom's deliberately odd test files
    agree, differ, dcmtk_wrong, not_compared = [], [], [], []
    print(f"{'file':44s} {'syntax':22s} {'decoded':8s} {'largest':>9s} {'mean':>9s}  VOI")
    for path in sources():
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        try:
            ds = read_dicom(path)
            photometric = str(ds.get("PhotometricInterpretation", ""))
            if not photometric.startswith("MONOCHROME") or "PixelData" not in ds:
                not_compared.append((name, f"not a monochrome image ({photometric or 'no pixels'})"))
                continue
            check = compare_with_dcmtk(path)
        except (CxrError, RuntimeError, ValueError) as exc:
            not_compared.append((name, str(exc).splitlines()[0][:150]))
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or "1.2.840.10008.1.2"
        syntax_name = pydicom.uid.UID(syntax).name[:22]
        lossy = syntax in LOSSY_JPEG
        ok = (check.mean <= args.tolerance and check.largest <= 0.02) if lossy else check.largest <= args.tolerance
        known = not ok and DCMTK_WRONG.get(path.name)
        (agree if ok else dcmtk_wrong if known else differ).append(name)
        print(f"{str(name)[-44:]:44s} {syntax_name:22s} {check.decoded_by:8s} {check.largest:9.2e} {check.mean:9.2e}  "
              f"{check.voi}{'' if ok else f'  (DCMTK wrong: {known})' if known else '  DIFFERS'}")
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
