"""Typed records passed between the stages of the data flow.

Every stage takes and returns these frozen dataclasses; no dictionaries of
DICOM tags travel through the code.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from pathlib import Path


class FileKind(str, enum.Enum):
    """What a file is, recognised by its content, never by its extension."""

    DICOM = "dicom"
    JPEG = "jpeg"
    PNG = "png"


class Status(str, enum.Enum):
    """What happened to an input file or a study."""

    SCORED = "scored"
    SKIPPED = "skipped"   # deliberately not scored, with a reason (lateral view, not chest...)
    FAILED = "failed"     # could not be read, decoded or scored: needs a human


class _OfAStudy:
    """A record that names its study: what the summary shows of a study, whatever its files' fate."""

    def identifiers(self) -> dict[str, str]:
        """``study_uid``, ``patient_id``, ``patient_name``, ``accession``, ``study_date``: given to the outcome
        of a file of this study that is not scored, so that a study with no scored file can still be found."""
        return {"study_uid": self.study_uid, "patient_id": self.patient_id, "patient_name": self.patient_name,
                "accession": self.accession, "study_date": self.study_date}


_AGE_UNIT_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def parse_patient_age(patient_age: str) -> tuple[int, str] | None:
    """PatientAge (AS, ``nnnD/W/M/Y``) as (number, unit letter); None when absent, malformed or ``000Y``
    (what many modalities write for an unknown age: an infant's is given in D, W or M)."""
    age = patient_age.strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_UNIT_DAYS and age != "000Y":
        return int(age[:3]), age[3]
    return None


def age_in_years(patient_age: str, birth_date: str, study_date: str) -> float | None:
    """The patient's age at the study in years: from PatientAge (``nnnD/W/M/Y``), else from the birth and
    study dates (``YYYYMMDD``); None when neither gives a plausible age.

    ``000Y`` is what many modalities write when they do not know the age (an infant's is given in
    D, W or M), so it counts as no PatientAge: the dates decide, and without them the age is unknown."""
    parsed = parse_patient_age(patient_age)
    if parsed:
        return parsed[0] * _AGE_UNIT_DAYS[parsed[1]] / 365.25
    try:
        born = dt.datetime.strptime(birth_date.strip()[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(study_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    days = (seen - born).days
    return days / 365.25 if 0 <= days <= 130 * 365.25 else None


@dataclass(frozen=True)
class Presentation:
    """What a presentation state (GSPS and its kin, PS3.3 A.33) says of how its images are shown: turned
    ``rotation`` degrees clockwise, then mirrored left to right when ``flip`` (the Spatial Transformation
    module, C.10.6; DCMTK's ``dcmp2pgm`` applies them in that order). Its window, shutters, displayed area
    and annotations are not taken: a reader's window is not what the model learned from."""

    sop_uid: str
    name: str                       # its file's name, for reports and logs
    created: str                    # PresentationCreationDate + Time (YYYYMMDDHHMMSS...): the newest one applies
    rotation: int = 0               # ImageRotation (0070,0042): 0, 90, 180 or 270
    flip: bool = False              # ImageHorizontalFlip (0070,0041) == Y
    images: frozenset[str] = frozenset()    # SOP Instance UIDs whose first frame it shows

    @property
    def transforms(self) -> bool:
        """Whether it turns or mirrors its images at all."""
        return bool(self.rotation or self.flip)

    def newer_than(self, other: "Presentation") -> bool:
        return (self.created, self.sop_uid) > (other.created, other.sop_uid)


@dataclass(frozen=True)
class Rejection:
    """A rejection note (IHE IOCM: a Key Object Selection whose title is a reason for removal from operational
    use, CID 7031): the images it names are withdrawn, for their quality, for the patient's safety, or as made
    for the wrong worklist entry (another patient's), and a PACS no longer shows them."""

    sop_uid: str
    name: str                       # its file's name
    title: str                      # the reason, e.g. "Incorrect Modality Worklist Entry"
    images: frozenset[str] = frozenset()    # SOP Instance UIDs of the instances it rejects


def patient_key(issuer_of_patient_id: str, patient_id: str) -> str:
    """A patient as a DICOM header names them: ``dicom:`` Issuer of Patient ID ``\\`` Patient ID; '' without a
    Patient ID."""
    return f"dicom:{issuer_of_patient_id}\\{patient_id}" if patient_id else ""


@dataclass(frozen=True)
class Radiograph(_OfAStudy):
    """One image file selected for scoring, with the metadata a report needs.

    For JPEG/PNG inputs the DICOM fields are empty and ``study_uid`` is derived
    from the file (each such file is its own study).
    """

    path: Path
    kind: FileKind
    study_uid: str
    sop_uid: str = ""
    series_uid: str = ""
    sop_class: str = ""             # SOPClassUID, for references to the image (DICOM report)
    character_set: str = ""         # SpecificCharacterSet as written, values joined by "\\" (DICOM report)
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_age: str = ""           # PatientAge (0010,1010) as written, e.g. 004Y
    accession: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    referring_physician: str = ""
    study_description: str = ""
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    laterality: str = ""
    presentation_intent: str = ""   # FOR PRESENTATION / FOR PROCESSING (DX), empty when not said
    conversion_type: str = ""       # ConversionType of a secondary capture (DF digitized film, SD, SYN...)
    rows: int = 0
    columns: int = 0
    frames: int = 1                 # NumberOfFrames; only the first frame is scored
    patient_orientation: str = ""   # PatientOrientation (0020,0020), values joined by "\\"; turned upright by it
    presentation: Presentation | None = None    # the newest presentation state of the study that shows it
    photometric: str = ""
    transfer_syntax: str = ""
    size_bytes: int = 0
    mtime_ns: int = 0

    @property
    def patient_key(self) -> str:
        """The patient as the DICOM header names it (:func:`patient_key`), to keep a patient's images together
        (calibration's bootstrap, training's split); '' without a Patient ID (a JPEG or PNG)."""
        return patient_key(self.issuer_of_patient_id, self.patient_id)

    @property
    def view(self) -> str:
        """A short label for the view, for reports: ``PA``, ``AP`` or ``unknown``."""
        return self.view_position or "unknown"

    @property
    def age_years(self) -> float | None:
        """Age at the study (see :func:`age_in_years`); None for JPEG/PNG and headers without it."""
        return age_in_years(self.patient_age, self.patient_birth_date, self.study_date)


@dataclass(frozen=True)
class FileOutcome(_OfAStudy):
    """The fate of one input file that will not be (or could not be) scored.

    ``step`` is the stage that decided (``discover``, ``read``, ``select``,
    ``validate``, ``decode``, ``normalise``, ``predict``...), ``tag`` the DICOM
    tag involved, if any. The study's identifiers are filled in when the file's
    header could be read, so that a study none of whose files is scored can
    still be found by its patient and accession.
    """

    path: Path
    status: Status
    reason: str
    step: str = ""
    tag: str = ""
    study_uid: str = ""
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    patient_name: str = ""      # the DICOM PN value as read
    presentation: Presentation | None = None    # a presentation state file (skipped: not an image) says this
    rejection: Rejection | None = None          # a rejection note file (skipped: not an image) withdraws these

    @classmethod
    def from_error(cls, error, **identifiers: str) -> "FileOutcome":
        """Build a FAILED outcome from a :class:`cxrscreen.errors.CxrError`; ``identifiers`` as
        :meth:`identifiers` gives them, when the file's study is known."""
        return cls(path=error.path, status=Status.FAILED, reason=error.cause,
                   step=error.step or "", tag=error.tag or "", **identifiers)


@dataclass(frozen=True)
class Study:
    """Images grouped by StudyInstanceUID, with the files of the study that were skipped."""

    study_uid: str
    images: tuple[Radiograph, ...]
    skipped: tuple[FileOutcome, ...] = ()

    @property
    def first(self) -> Radiograph | None:
        return self.images[0] if self.images else None

    @property
    def source_files(self) -> tuple[Path, ...]:
        return tuple(r.path for r in self.images) + tuple(o.path for o in self.skipped)
