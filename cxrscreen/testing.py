"""Build realistic DICOM radiographs from arrays: for tests, samples and benchmarks.

Nothing in the screening path imports this module. The data sets it builds
carry synthetic identities and valid UIDs (``2.25.<uuid>`` derived from a
seed, so the same call gives the same UIDs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"          # Computed Radiography Image Storage
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"        # Digital X-Ray Image Storage - For Presentation
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"          # Secondary Capture Image Storage
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"     # Basic Text SR Storage
GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"     # Grayscale Softcopy Presentation State Storage
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"     # Key Object Selection Document Storage


def uid_from(seed: str) -> str:
    """A valid, deterministic UID under the 2.25 root (PS3.5 B.2) from any string."""
    from .encapsulate import derived_uid

    return derived_uid(seed)


def make_dicom(pixels: np.ndarray | None, *, seed: str = "x", modality: str = "DX",
               photometric: str = "MONOCHROME2", bits_stored: int | None = None,
               signed: bool = False, transfer_syntax: str = "1.2.840.10008.1.2.1",
               study_seed: str | None = None, patient_id: str = "SYNTH-0001",
               patient_name: str = "SYNTHETIC^PATIENT", body_part: str = "CHEST",
               view_position: str = "PA", sop_class: str | None = None, more_frames=(), **attributes):
    """Return a pydicom FileDataset holding ``pixels`` (or none, for non-image objects).

    ``attributes`` are set as DICOM keywords (``WindowCenter=...``). Compressed
    transfer syntaxes are encoded with pydicom's encoders (RLE, JPEG-LS, JPEG
    2000), except JPEG baseline which is encoded with Pillow. ``more_frames`` (arrays like ``pixels``)
    follow ``pixels`` as frames 2..N of a multi-frame image (uncompressed transfer syntaxes only).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID

    sop_class = sop_class or (CR_SOP_CLASS if modality == "CR" else DX_SOP_CLASS)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid_from(seed + "/sop")
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    meta.ImplementationClassUID = uid_from("cxrscreen-testing")
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid_from((study_seed or seed) + "/study")
    ds.SeriesInstanceUID = uid_from(seed + "/series")
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "20230101"     # 3 years old at StudyDate: inside the default model's population
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC" + hashlib.sha1((study_seed or seed).encode()).hexdigest()[:8].upper()
    ds.StudyDate = "20261101"
    ds.StudyTime = "101500"
    ds.StudyDescription = "CHEST 1 VIEW" if modality != "SR" else "REPORT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    if view_position:
        ds.ViewPosition = view_position
    if pixels is not None:
        pixels = np.asarray(pixels)
        colour = pixels.ndim == 3
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = b"".join(np.asarray(f, dtype=pixels.dtype).tobytes() for f in (pixels, *more_frames))
        if more_frames:
            ds.NumberOfFrames = 1 + len(more_frames)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ts = UID(transfer_syntax)
    if more_frames and ts.is_compressed:
        raise ValueError("more_frames: uncompressed transfer syntaxes only")
    if pixels is not None and ts.is_compressed:
        if ts == "1.2.840.10008.1.2.4.50":
            _encode_jpeg_baseline(ds, pixels)
        else:
            ds.compress(ts, encoding_plugin=_plugin_for(ts))
    elif ts != "1.2.840.10008.1.2.1":
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def _plugin_for(ts) -> str:
    if ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        return "pyjpegls"
    if ts == "1.2.840.10008.1.2.5":
        return ""  # pydicom picks an available RLE encoder
    return "pylibjpeg"


def _encode_jpeg_baseline(ds, pixels: np.ndarray, quality: int = 92) -> None:
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    if pixels.dtype != np.uint8:
        raise ValueError("JPEG baseline holds 8-bit samples only")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    if pixels.ndim == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"


def make_text_sr(*, seed: str, study_seed: str | None = None, patient_id: str = "SYNTH-0001"):
    """A Basic Text SR (no pixel data) in the given study: a non-image object PACS exports carry."""
    ds = make_dicom(None, seed=seed, study_seed=study_seed, modality="SR", sop_class=BASIC_TEXT_SR,
                    patient_id=patient_id, body_part="", view_position="")
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = "101600"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    return ds


def _referenced_series(images, keyword: str, frames: dict | None = None) -> list:
    """Referenced Series Sequence items naming ``images`` (data sets), series by series, each image an item of
    the series' ``keyword`` sequence (``frames``: SOP Instance UID -> its ReferencedFrameNumber)."""
    from pydicom.dataset import Dataset

    by_series: dict[str, list] = {}
    for image in images:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        if frames and image.SOPInstanceUID in frames:
            item.ReferencedFrameNumber = frames[image.SOPInstanceUID]
        by_series.setdefault(image.SeriesInstanceUID, []).append(item)
    series_items = []
    for series_uid, items in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        setattr(series, keyword, items)
        series_items.append(series)
    return series_items


def _object_of_study(image, *, seed: str, modality: str, sop_class: str):
    """A data set without pixel data in the study (and of the patient) of ``image``."""
    ds = make_dicom(None, seed=seed, modality=modality, sop_class=sop_class, patient_id=image.PatientID,
                    patient_name=str(image.PatientName), body_part="", view_position="")
    ds.StudyInstanceUID = image.StudyInstanceUID
    ds.AccessionNumber = image.get("AccessionNumber", "")
    return ds


def make_presentation_state(images, *, seed: str, rotation: int | None = 0, flip: str | None = "N",
                            created: str = "20261101120000", frames: dict | None = None):
    """A Grayscale Softcopy Presentation State in the study of ``images`` (data sets) that references each of
    them (``frames``: SOP Instance UID -> ReferencedFrameNumber for a multi-frame one), turning them
    ``rotation`` degrees clockwise and flipping them when ``flip`` is Y (None leaves the attribute out), made
    at ``created`` (YYYYMMDDHHMMSS). Its window and other display modules are left out."""
    ds = _object_of_study(images[0], seed=seed, modality="PR", sop_class=GSPS_SOP_CLASS)
    ds.ContentLabel = "CXRSCREEN"
    ds.PresentationCreationDate, ds.PresentationCreationTime = created[:8], created[8:]
    ds.ReferencedSeriesSequence = _referenced_series(images, "ReferencedImageSequence", frames)
    if rotation is not None:
        ds.ImageRotation = rotation
    if flip is not None:
        ds.ImageHorizontalFlip = flip
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def make_key_object_selection(images, *, seed: str, code: str = "113001",
                              meaning: str = "Rejected for Quality Reasons"):
    """A Key Object Selection document in the study of ``images`` (data sets) naming each of them in its
    Current Requested Procedure Evidence, titled ``code`` (DCM): 113001, 113037, 113038 and 113039 make it
    an IHE IOCM rejection note, 113000 (Of Interest) a plain selection."""
    from pydicom.dataset import Dataset

    ds = _object_of_study(images[0], seed=seed, modality="KO", sop_class=KOS_SOP_CLASS)
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", meaning
    ds.ConceptNameCodeSequence = [title]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentDate, ds.ContentTime = "20261101", "120000"
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    evidence.ReferencedSeriesSequence = _referenced_series(images, "ReferencedSOPSequence")
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    return ds


def save(ds, path: Path | str) -> Path:
    """Write a data set as a Part-10 file (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def lut_item(entries, first: int, bits: int, packed: bool = False):
    """A LUT item (Modality or VOI LUT Sequence) mapping ``first`` onwards to ``entries`` (rounded), with
    ``bits`` per entry in its descriptor; LUT Data is OW, one entry per 16-bit word, or with ``packed``
    (8-bit entries) two to a word as PS3.3 C.11.2.1.1 has it, padded to an even length."""
    from pydicom.dataset import Dataset

    values = np.round(np.asarray(entries))
    item = Dataset()
    item.LUTDescriptor = [len(values) % 65536, first, bits]      # 0 entries means 2^16
    raw = values.astype("u1").tobytes() if packed else values.astype("<u2").tobytes()
    item.add_new(0x00283006, "OW", raw + b"\0" * (len(raw) % 2))  # LUT Data
    return item


def encapsulate_uncompressed(ds, frames: list[np.ndarray] | None = None):
    """``ds`` with its pixel data as Encapsulated Uncompressed Explicit VR Little Endian (1.2.840.10008.1.2.1.98):
    each frame (``frames``, else the data set's own pixels) native little endian in its own fragment, with a
    Basic Offset Table. pydicom cannot write the syntax itself."""
    from pydicom.encaps import encapsulate

    frames = [ds.pixel_array] if frames is None else frames
    ds.PixelData = encapsulate([np.ascontiguousarray(f).astype(f.dtype.newbyteorder("<")).tobytes()
                                for f in frames], has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.98"
    return ds


DAMAGE_KINDS = ("header", "header", "anywhere", "cut", "zeros", "repeat")


def damage(data: bytes, rng) -> tuple[bytes, str]:
    """``data`` (a file's bytes) damaged as transfers and disks damage files, and how: bytes changed in the
    first 2.5 KB (the header) or anywhere, a run of 400 zeros, a piece repeated elsewhere, the end cut off.
    ``rng``: a ``random.Random``, so that a seed gives the same damage."""
    out = bytearray(data)
    how = rng.choice(DAMAGE_KINDS)
    if how == "header":
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(min(132, len(out) - 1), min(len(out), 2500))] = rng.randrange(256)
    elif how == "anywhere":
        for _ in range(rng.randint(1, 30)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif how == "cut":
        out = out[:rng.randrange(1, len(out))]
    elif how == "zeros":
        at = rng.randrange(len(out))
        out[at:at + 400] = bytes(len(out[at:at + 400]))
    else:
        start = min(128, len(out) - 1)
        at, source = rng.randrange(start, len(out)), rng.randrange(start, len(out))
        out[at:at] = out[source:source + rng.randint(1, 64)]
    return bytes(out), how


def cut_frame(data: bytes, rng) -> bytes | None:
    """``data`` (a DICOM file's bytes) with the codestream of its one frame cut short at a point ``rng`` (a
    ``random.Random``) chooses before its end marker, the file otherwise whole, as a gateway that cut a frame
    leaves it; None for a file that is not single-frame encapsulated (compressed) DICOM."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if ("PixelData" not in ds or not ds.file_meta.TransferSyntaxUID.is_encapsulated
                or int(ds.get("NumberOfFrames", 1) or 1) != 1):
            return None
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:       # not DICOM, or its fragments cannot be read: there is no frame to cut
        return None
    end = frame.rfind(b"\xff\xd9")                 # JPEG's EOI, JPEG 2000's EOC; else (RLE, native) the end
    ds.PixelData = encapsulate([frame[:rng.randrange(1, end if end > 1 else len(frame))]])
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=False)
    except Exception:       # an odd element pydicom reads and cannot write back (pydicom's test files have some)
        return None
    return out.getvalue()


# Transfer syntaxes DCMTK's dcmj2pnm / dcml2pnm decode themselves; any other (JPEG 2000) is decompressed by
# pydicom first, so that only the display pipeline, not the decoder, is compared.
_DCMTK_DECODES = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
}
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}


@dataclass(frozen=True)
class RenderingCheck:
    """How cxrscreen's unit image of a file compares with DCMTK's display of it (:func:`compare_with_dcmtk`)."""

    largest: float      # the largest absolute difference of a visible pixel, as a fraction of the display range
    mean: float         # the mean absolute difference
    voi: str            # which VOI DCMTK was told to use
    decoded_by: str     # "dcmtk", or "pydicom" when DCMTK cannot decode the transfer syntax
    pixels: int         # visible pixels compared (padding and what a display shutter covers are not)


def compare_with_dcmtk(path: Path | str) -> RenderingCheck:
    """Compare cxrscreen's display of the first frame of a DICOM file with DCMTK's.

    DCMTK (``dcmj2pnm``, ``dcml2pnm`` for JPEG-LS; Debian's ``dcmtk``) is an independent implementation of
    the PS3.3 grayscale pipeline: Modality LUT or rescale, VOI window (LINEAR, SIGMOID) or VOI LUT, and
    MONOCHROME1 / Presentation LUT Shape. It is told to use the VOI cxrscreen uses: the header's first window
    or VOI LUT, or, for an image without one, cxrscreen's own window (:func:`cxrscreen.normalise.default_window`)
    as a LINEAR window, so that the rest of the chain is still compared. A colour image (RGB, YBR, palette)
    DCMTK converts to grey itself (``+G``, the same BT.601 luma weights). It renders to a 16-bit PNG
    without overlays. Pixels cxrscreen hides (padding, a display shutter, which DCMTK leaves as they are) are
    not compared. Raises RuntimeError with DCMTK's message when it cannot render the file."""
    import shutil
    import subprocess
    import tempfile

    import cv2
    import pydicom

    from .ingest import decode_first_frame, read_dicom, transfer_syntax
    from .normalise import (PixelParams, apply_modality, colour_frame, default_window, normalise_pixels,
                            stored_values)

    path = Path(path)
    ds = read_dicom(path)
    params = PixelParams.from_dataset(ds)
    frame = colour_frame(ds) if params.is_colour else decode_first_frame(ds)
    unit = normalise_pixels(frame, params)
    stored = None if params.is_colour else stored_values(frame, params.bits_stored, params.signed)
    hidden = None if stored is None else params.padding_mask(stored)
    if params.shutter is not None:
        outside = params.shutter.outside(*frame.shape[:2])
        hidden = outside if hidden is None else hidden | outside
    if params.is_colour:
        voi, args = "colour to grey by DCMTK", ["+G"]
    elif params.voi_lut is not None:
        voi, args = "the header's VOI LUT", ["+Wl", "1"]
    elif params.window_center is not None and params.window_width is not None:
        voi, args = f"the header's window ({params.voi_function})", ["+Wi", "1"]
        if "WindowCenter" not in ds:        # an enhanced image's Frame VOI LUT, which DCMTK 3.6 does not read
            voi = f"the first frame's window ({params.voi_function})"
            args = ["+Ww", repr(params.window_center), repr(params.window_width),
                    "+Wfs" if params.voi_function == "SIGMOID" else "+Wfl"]
    else:
        lo, hi = default_window(apply_modality(stored, params), params, hidden)
        voi, args = f"cxrscreen's window {lo:g}-{hi:g}", ["+Ww", repr((lo + hi) / 2 + 0.5), repr(hi - lo + 1), "+Wfl"]
    syntax = transfer_syntax(ds) or "1.2.840.10008.1.2"
    tool = "dcml2pnm" if syntax in _JPEG_LS else "dcmj2pnm"
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} (DCMTK) is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        source, decoded_by = path, "dcmtk"
        if syntax not in _DCMTK_DECODES:
            plain = pydicom.dcmread(path, force=True)
            plain.decompress()
            source, decoded_by = save(plain, Path(tmp) / "plain.dcm"), "pydicom"
        out = Path(tmp) / "dcmtk.png"
        done = subprocess.run([tool, "+F", "1", *args, "-O", "+on2", str(source), str(out)],
                              capture_output=True, text=True)
        if done.returncode or not out.exists():
            raise RuntimeError(f"{tool} failed on {path}: {(done.stderr or done.stdout).strip()}")
        reference = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    if reference is None or reference.shape != unit.shape:
        raise RuntimeError(f"{tool} rendered {path} as {None if reference is None else reference.shape}, "
                           f"cxrscreen as {unit.shape}")
    difference = np.abs(reference.astype(np.float64) / 65535.0 - unit)
    if hidden is not None:
        difference = difference[~hidden]
    return RenderingCheck(largest=float(difference.max()), mean=float(difference.mean()), voi=voi,
                          decoded_by=decoded_by, pixels=int(difference.size))
