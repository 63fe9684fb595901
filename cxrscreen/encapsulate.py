"""A study's PDF report as a DICOM Encapsulated PDF instance of that study, for the PACS.

Inputs: the report PDF written by :func:`cxrscreen.report.write_study_report` and the study's
scored images (:class:`~cxrscreen.records.Radiograph`). Output: ``<report>.dcm`` beside the PDF, an Encapsulated
PDF Storage instance (PS3.3 A.45.1) that a PACS files into the screened study, next to its images:

- Patient and General Study modules: copied from the study's first DICOM image (name, ID and its
  issuer, birth date, sex, Study Instance UID, date, time, ID, accession, referring physician,
  description), so the report lands in the same patient and study, in the images' own Specific
  Character Set when it can write them all (else UTF-8, ISO_IR 192);
- Encapsulated Document Series: modality ``DOC``, one series per study for every cxrscreen report
  of it (its UID derived from the Study Instance UID), series number 9901;
- Encapsulated Document: the PDF, ``application/pdf``, Burned In Annotation ``YES`` (the PDF
  names the patient), a Source Instance Sequence naming the images that were scored, the
  instance number the report's version (watch amendments are new instances, version 2, 3...);
- a new SOP Instance UID every time a report is written: a re-screened study's new report is a
  new instance, never a different document under an old UID.

A study read from JPEG/PNG has no DICOM identity to file a report under: it gets none
(:func:`write_encapsulated_pdf` returns None). Nothing here reads or writes the input files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Sequence

from . import __version__
from .records import FileKind, Radiograph
from .report import atomic_write
from .threadwarnings import caught, listed

log = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_NUMBER = 9901
DOCUMENT_TITLE = "Chest radiograph screening report (cxrscreen, decision support)"


def dicom_report_name(pdf_name: str) -> str:
    """The DICOM report's file name: the PDF's, ending ``.dcm``."""
    return str(Path(pdf_name).with_suffix(".dcm"))


def dicom_images(images: Sequence[Radiograph]) -> list[Radiograph]:
    """The images that give a report a DICOM identity to file under (the DICOM files; not JPEG/PNG)."""
    return [image for image in images if image.kind is FileKind.DICOM]


def derived_uid(text: str) -> str:
    """A valid UID under the 2.25 root (PS3.5 B.2) derived from ``text``: the same text, the same UID."""
    return "2.25." + str(int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], 16))


def report_series_uid(study_uid: str) -> str:
    """The Series Instance UID of cxrscreen's reports of a study: the same on every run and machine."""
    return derived_uid(f"{study_uid}/cxrscreen screening reports")


def _character_set(declared: str, values) -> str | list[str]:
    """The images' own Specific Character Set when it can write every value (a PACS matches the report to
    the patient by these strings, and an older one may not know UTF-8), else ISO_IR 192 (UTF-8)."""
    from pydicom.charset import convert_encodings, encode_string

    wanted = [v for v in values if not v.isascii()]
    if not declared:
        return "ISO_IR 192" if wanted else ""
    terms = declared.split("\\") if "\\" in declared else declared
    try:
        with caught() as seen:                  # pydicom warns, and replaces, where it cannot encode
            encodings = convert_encodings(terms)
            for value in wanted:
                encode_string(value, encodings)
    except (LookupError, ValueError):
        return "ISO_IR 192"
    return "ISO_IR 192" if seen else terms


def encapsulated_pdf(pdf: bytes, images: Sequence[Radiograph], *, version: int = 1, now: dt.datetime | None = None):
    """The Encapsulated PDF data set (a pydicom FileDataset) of ``pdf``, the report of the study whose
    scored images are ``images``; None when none of them is DICOM."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    images = dicom_images(images)
    if not images:
        return None
    first = images[0]
    now = now or dt.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    text = {
        # Patient (PS3.3 C.7.1.1)
        "PatientName": first.patient_name, "PatientID": first.patient_id,
        "IssuerOfPatientID": first.issuer_of_patient_id, "PatientBirthDate": first.patient_birth_date,
        "PatientSex": first.patient_sex,
        # General Study (C.7.2.1)
        "StudyDate": first.study_date, "StudyTime": first.study_time,
        "ReferringPhysicianName": first.referring_physician, "StudyID": first.study_id,
        "AccessionNumber": first.accession, "StudyDescription": first.study_description,
    }
    charset = _character_set(first.character_set, text.values())
    if charset:
        ds.SpecificCharacterSet = charset
    # SOP Common (C.12.1)
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword, value in text.items():
        if value or keyword not in ("IssuerOfPatientID", "StudyDescription"):     # type 3: only when known
            setattr(ds, keyword, value)
    ds.StudyInstanceUID = first.study_uid
    # Encapsulated Document Series (C.24.1), General Equipment (C.7.5.1), SC Equipment (C.8.6.1)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = report_series_uid(first.study_uid)
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "cxrscreen screening reports"
    ds.Manufacturer = "cxrscreen"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"
    # Encapsulated Document (C.24.2)
    ds.InstanceNumber = version
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = DOCUMENT_TITLE if version == 1 else f"{DOCUMENT_TITLE}, amended (version {version})"
    ds.ConceptNameCodeSequence = DicomSequence()
    sources = []
    for image in images:
        if image.sop_class and image.sop_uid:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.sop_class, image.sop_uid
            sources.append(item)
    if sources:
        ds.SourceInstanceSequence = DicomSequence(sources)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")      # OB values have even length
    return ds


def write_encapsulated_pdf(path: Path, pdf_path: Path, images: Sequence[Radiograph], *,
                           version: int = 1) -> Path | None:
    """Write the report ``pdf_path`` of the study whose scored images are ``images`` as ``path`` (an
    Encapsulated PDF instance of that study), atomically; None, and nothing written, when none is DICOM."""
    with caught() as seen:      # values copied as the images have them, an over-long one too: pydicom warns
        ds = encapsulated_pdf(Path(pdf_path).read_bytes(), images, version=version)
        if ds is None:
            return None
        with atomic_write(Path(path), "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
    if seen:
        log.warning("%s: written with %s (values copied from the images as they are)", path, listed(seen))
    return Path(path)
