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

When every image of a reported study is withdrawn since (an IHE IOCM rejection note), its reports no longer
stand, and a PACS that was sent their ``.dcm`` goes on showing them: :func:`write_rejection_note` writes a
rejection note of cxrscreen's own for them (``<report>.rejection.dcm``), a Key Object Selection in the study,
titled with the images' reason, which an IOCM-aware PACS applies to the reports as it applied the images' note
to the images.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Sequence

from . import __version__
from .ingest import KEY_OBJECT_SELECTION, REJECTION_TITLES
from .records import FileKind, Radiograph
from .report import atomic_write
from .threadwarnings import caught, listed

log = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_NUMBER = 9901
NOTE_SERIES_NUMBER = 9902
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


def _new_instance(sop_class: str, sop_uid: str, now: dt.datetime):
    """An empty Part-10 data set (explicit VR little endian) of ``sop_class``, its file meta and SOP Common
    module (PS3.3 C.12.1) filled in: the instance ``sop_uid``, created ``now``."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return ds


def _write(path: Path, build, values_from: str) -> Path | None:
    """Write the data set ``build()`` makes as ``path``, atomically; None, and nothing written, when it makes
    none. Values are copied as the inputs (``values_from``) have them, an over-long one too: pydicom's warnings
    are one log line."""
    with caught() as seen:
        ds = build()
        if ds is None:
            return None
        with atomic_write(Path(path), "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
    if seen:
        log.warning("%s: written with %s (values copied from the %s as they are)", path, listed(seen), values_from)
    return Path(path)


def encapsulated_pdf(pdf: bytes, images: Sequence[Radiograph], *, version: int = 1, now: dt.datetime | None = None):
    """The Encapsulated PDF data set (a pydicom FileDataset) of ``pdf``, the report of the study whose
    scored images are ``images``; None when none of them is DICOM."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    images = dicom_images(images)
    if not images:
        return None
    first = images[0]
    now = now or dt.datetime.now()
    ds = _new_instance(ENCAPSULATED_PDF_STORAGE, generate_uid(prefix=None), now)
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
    return _write(path, lambda: encapsulated_pdf(Path(pdf_path).read_bytes(), images, version=version), "images")


# --------------------------------------------------------------- rejection notes of cxrscreen's own reports

# The codes of CID 7031 (Reasons for Rejection: REJECTION_TITLES), the most serious first: a study whose images
# were withdrawn for several reasons has its reports withdrawn for the first of them
REJECTION_ORDER = ("113037", "113038", "113001", "113039")
# The study and patient attributes a note copies from the reports it names (so it lands where they did)
_COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
           "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
           "StudyDescription")


def rejection_note_name(report_name: str) -> str:
    """The file name of the rejection note of a study's reports, after its first report's: ``X.rejection.dcm``."""
    return str(Path(report_name).with_suffix(".rejection.dcm"))


def rejection_code(titles) -> str:
    """The code a note of the reports gets, of the titles (CID 7031 meanings) of the notes that withdrew the
    study's images: the most serious of them; Rejected for Quality Reasons when none is known."""
    titles = set(titles)
    return next((code for code in REJECTION_ORDER if REJECTION_TITLES[code] in titles), "113001")


def withdrawn_description(study_uid: str, titles) -> str:
    """The Key Object Description of a rejection note of cxrscreen's reports of a study: why it withdraws them."""
    reasons = ", ".join(sorted(t for t in titles if t)) or "a rejection note"
    return (f"Withdrawn by cxrscreen {__version__}: every image of study {study_uid} that its screening report "
            f"was made of is withdrawn ({reasons}); the report no longer stands.")


def rejection_note(reports: Sequence, code: str, description: str, *, now: dt.datetime | None = None):
    """The IHE IOCM rejection note (a Key Object Selection Document, PS3.3 A.35.4, template TID 2010) that
    withdraws ``reports``, the Encapsulated PDF data sets cxrscreen wrote of one study, for the reason ``code``
    (a key of :data:`~cxrscreen.ingest.REJECTION_TITLES`). Patient and study are copied from the first report;
    its SOP Instance UID is derived from the reports' (the same reports, the same note, however often it is
    written); its own series holds cxrscreen's notes of the study. ``description`` is its Key Object
    Description, for a reader."""
    from pydicom.dataset import Dataset

    def code_item(value: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        return item

    def reference(report) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = report.SOPClassUID, report.SOPInstanceUID
        return item

    first, now = reports[0], now or dt.datetime.now()
    ds = _new_instance(KEY_OBJECT_SELECTION, derived_uid("/".join(sorted(r.SOPInstanceUID for r in reports))
                                                         + "/cxrscreen rejection note"), now)
    for keyword in _COPIED:             # Patient (C.7.1.1), General Study (C.7.2.1): as the reports have them
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
    # Key Object Document Series (C.17.6.1), General Equipment (C.7.5.1)
    ds.Modality = "KO"
    ds.SeriesInstanceUID = derived_uid(f"{first.StudyInstanceUID}/cxrscreen rejection notes")
    ds.SeriesNumber = NOTE_SERIES_NUMBER
    ds.SeriesDescription = "cxrscreen rejection notes"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "cxrscreen"
    ds.SoftwareVersions = __version__
    # Key Object Document (C.17.6.2): the reports, in their series, as the evidence
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ReferencedSOPSequence = [reference(r) for r in reports]
    evidence = Dataset()
    evidence.StudyInstanceUID = first.StudyInstanceUID
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    # SR Document Content (C.17.3), TID 2010 Key Object Selection: the title is the reason for rejection
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code_item(code, REJECTION_TITLES[code])]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = [code_item("113012", "Key Object Description")]
    text.TextValue = description
    items = [text]
    for report in reports:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "COMPOSITE"
        item.ReferencedSOPSequence = [reference(report)]
        items.append(item)
    ds.ContentSequence = items
    return ds


def write_rejection_note(path: Path, reports: Sequence[Path], code: str, description: str) -> Path | None:
    """Write the rejection note of the ``.dcm`` reports ``reports`` (those of them still there) as ``path``,
    atomically; None, and nothing written, when none is there."""
    from pydicom import dcmread

    read = []
    for report in reports:
        try:
            read.append(dcmread(report, defer_size="1 KB"))     # the PDF itself is not read
        except FileNotFoundError:
            continue
    return _write(path, lambda: rejection_note(read, code, description) if read else None, "reports")
