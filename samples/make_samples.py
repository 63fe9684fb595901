"""Regenerate the bundled sample studies from the full-resolution source images.

    python samples/make_samples.py [--source ../shared/data/fullres] [--out samples]

Each study is a realistic DICOM export (synthetic identities, valid UIDs) made
from one of the 24 full-resolution pediatric chest radiographs of the Kermany
dataset (CC BY 4.0) whose patients are in neither the training nor the test
split. Images are downsampled to about 1024 px. What each file exercises is in
README.md's table of samples. (Only study4's file was written by this version of the script: the others,
written by an earlier make_dicom, hold the same pixels under other SOP Instance UIDs.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrscreen.testing import make_dicom, make_text_sr, save  # noqa: E402

LONG_SIDE = 1024

# (folder, source image, label) -> what the study is made of; see build().
SOURCES = {
    "S1": ("PNEUMONIA", "person1099_bacteria_3040.jpeg"),
    "S2": ("NORMAL", "IM-0145-0001.jpeg"),
    "S3": ("PNEUMONIA", "person425_virus_871.jpeg"),
    "S3L": ("PNEUMONIA", "person279_bacteria_1316.jpeg"),
    "S4": ("NORMAL", "NORMAL2-IM-0468-0001.jpeg"),
    "S5": ("PNEUMONIA", "person1544_bacteria_4033.jpeg"),
    "S6": ("NORMAL", "IM-0261-0001.jpeg"),
    "S7": ("NORMAL", "NORMAL2-IM-0672-0001.jpeg"),
}


def load_gray(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SystemExit(f"cannot read {path}")
    scale = LONG_SIDE / max(img.shape)
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    return img


def to_raw(display: np.ndarray, bits: int) -> np.ndarray:
    """Display values (8-bit) to a detector-like range of ``bits`` bits, bone high."""
    top = 2 ** bits - 1
    return np.rint(display.astype(np.float64) / 255.0 * top).astype(np.uint16)


def build(source: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    img = {key: load_gray(source / folder / name) for key, (folder, name) in SOURCES.items()}
    written = []

    # S1: CR, MONOCHROME1 (white = low value), 12-bit, window set, JPEG 2000 lossless.
    raw = 4095 - to_raw(img["S1"], 12)
    ds = make_dicom(raw, seed="sample-s1", modality="CR", photometric="MONOCHROME1", bits_stored=12,
                    patient_id="CXR-0001", patient_name="SAMPLE^AVA", PatientBirthDate="20220314",
                    PatientSex="F", WindowCenter=2048, WindowWidth=4000,
                    transfer_syntax="1.2.840.10008.1.2.4.90")
    written.append(save(ds, out / "study1_cr_mono1_j2k" / "IM0001.dcm"))

    # S2: DX, MONOCHROME2 12-bit with rescale slope/intercept and a window in rescaled units, RLE.
    raw = to_raw(img["S2"], 12)
    ds = make_dicom(raw, seed="sample-s2", modality="DX", bits_stored=12, patient_id="CXR-0002",
                    patient_name="SAMPLE^BEN", PatientBirthDate="20210702", PatientSex="M",
                    RescaleSlope=2, RescaleIntercept=-4096, RescaleType="US",
                    WindowCenter=[0, 200], WindowWidth=[8100, 4000],
                    WindowCenterWidthExplanation=["FULL", "SOFT"],
                    transfer_syntax="1.2.840.10008.1.2.5")
    written.append(save(ds, out / "study2_dx_rescale_rle" / "IM0001.dcm"))
    # ... and a non-image object of the same study (a text report), which must be skipped.
    sr = make_text_sr(seed="sample-s2-sr", study_seed="sample-s2", patient_id="CXR-0002")
    written.append(save(sr, out / "study2_dx_rescale_rle" / "SR0001.dcm"))

    # S3: one study, a PA and a lateral image (ViewPosition LL), explicit VR little endian, 14-bit.
    # The source data has no lateral views: the lateral file holds another frontal image,
    # labelled lateral, to exercise the view filter.
    for key, view, name in (("S3", "PA", "IM0001.dcm"), ("S3L", "LL", "IM0002.dcm")):
        raw = to_raw(img[key], 14)
        ds = make_dicom(raw, seed=f"sample-{key.lower()}", study_seed="sample-s3", modality="DX",
                        bits_stored=14, view_position=view, patient_id="CXR-0003",
                        patient_name="SAMPLE^CLEO", PatientBirthDate="20230120", PatientSex="F",
                        WindowCenter=8192, WindowWidth=16000, SeriesNumber=1 if view == "PA" else 2,
                        InstanceNumber=1)
        written.append(save(ds, out / "study3_pa_and_lateral" / name))

    # S4: DX MONOCHROME2 16-bit with no VOI at all (percentile fallback), JPEG-LS lossless,
    # stored in a DICOMDIR-style tree with extension-less file names, and on its side (the detector read
    # with the head at the left; Patient Orientation F\\R says so): screening turns it upright.
    raw = np.ascontiguousarray(np.rot90(to_raw(img["S4"], 16).astype(np.uint16), 1))
    ds = make_dicom(raw, seed="sample-s4", modality="DX", bits_stored=16, patient_id="CXR-0004",
                    patient_name="SAMPLE^DARIO", PatientBirthDate="20200905", PatientSex="M",
                    PatientOrientation=["F", "R"], transfer_syntax="1.2.840.10008.1.2.4.80")
    written.append(save(ds, out / "study4_dicomdir_tree" / "DICOM" / "ST000001" / "SE000001" / "IM000001"))

    # S5: CR MONOCHROME2 8-bit, JPEG baseline (lossy), as many older PACS exports are.
    ds = make_dicom(img["S5"], seed="sample-s5", modality="CR", patient_id="CXR-0005",
                    patient_name="SAMPLE^ELIF", PatientBirthDate="20211111", PatientSex="F",
                    view_position="AP", transfer_syntax="1.2.840.10008.1.2.4.50")
    written.append(save(ds, out / "study5_cr_jpeg_baseline" / "IM0001.dcm"))

    # S6: a plain JPEG export (its own study).
    jpeg = out / "study6_plain_jpeg" / "chest_export.jpg"
    jpeg.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(jpeg), img["S6"], [cv2.IMWRITE_JPEG_QUALITY, 92])
    written.append(jpeg)

    # S7: a DICOM whose header says BodyPartExamined HAND (the pixels are a chest image: the source
    # data has no other body part), deflated explicit VR: must be skipped as not chest.
    ds = make_dicom(to_raw(img["S7"], 12), seed="sample-s7", modality="DX", bits_stored=12,
                    body_part="HAND", view_position="PA", patient_id="CXR-0007",
                    patient_name="SAMPLE^FARID", WindowCenter=2048, WindowWidth=4096,
                    transfer_syntax="1.2.840.10008.1.2.1.99")
    written.append(save(ds, out / "study7_not_chest_deflated" / "IM0001.dcm"))
    return [str(p.relative_to(out)) for p in map(Path, written)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "fullres")
    parser.add_argument("--out", type=Path, default=ROOT / "samples")
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"source folder {args.source} not found (it is ../shared/data/fullres in the dev setup)")
    for child in args.out.glob("study*"):
        shutil.rmtree(child)
    for name in build(args.source, args.out):
        print(name)


if __name__ == "__main__":
    main()
