"""Make ``htj2k_lossless.dcm``: the PA image of ``samples/study3_pa_and_lateral`` at a quarter of its size,
coded as High-Throughput JPEG 2000 (lossless, transfer syntax 1.2.840.10008.1.2.4.201) by OpenJPH's
``ojph_compress`` (Debian: ``apt-get install openjph-tools``), which pydicom cannot encode. The test decodes
it and compares with the same quarter of the uncompressed sample.

    python tests/data/make_htj2k.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))


def quarter(ds) -> np.ndarray:
    """The pixels the fixture holds: every 4th row and column of the sample."""
    return np.ascontiguousarray(ds.pixel_array[::4, ::4])


def main() -> None:
    from cxrscreen.testing import uid_from

    ds = pydicom.dcmread(ROOT / "samples" / "study3_pa_and_lateral" / "IM0001.dcm")
    pixels = quarter(ds)
    with tempfile.TemporaryDirectory() as tmp:
        pgm, j2c = Path(tmp) / "in.pgm", Path(tmp) / "out.j2c"
        header = f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n{(1 << ds.BitsStored) - 1}\n".encode()
        pgm.write_bytes(header + pixels.astype(">u2").tobytes())
        subprocess.run(["ojph_compress", "-i", str(pgm), "-o", str(j2c), "-reversible", "true"], check=True)
        codestream = j2c.read_bytes()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"   # HTJ2K Lossless Only
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from("htj2k-fixture/sop")
    ds.save_as(HERE / "htj2k_lossless.dcm", enforce_file_format=True)


if __name__ == "__main__":
    main()
