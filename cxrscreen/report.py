"""Per-study PDF reports, the worklist PDF and the summary CSV/JSON.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``): an interrupted run never leaves a truncated PDF or CSV.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from . import __version__
from .normalise import presentation_words, shown_orientation, upright_turns
from .records import FileOutcome, Presentation, Radiograph, Study, age_in_years, parse_patient_age
from .typeset import cell, markup, one_line, paragraph, person_name, undecodable_as_hex

# Images go into the PDFs as binary streams, not ASCII85 text: 20% smaller reports, and without
# reportlab's C accelerators (rl_accel) the encoding alone took a third of the time a report takes.
import reportlab.rl_config
from reportlab.lib import colors
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.platypus import Flowable

reportlab.rl_config.useA85 = 0

DISCLAIMER = ("Decision support only, not a diagnosis. This screening score was produced by a machine-learning "
              "model and must be reviewed by a qualified radiologist together with the images and the clinical "
              "context. A study that is not flagged can still contain pneumonia or other findings.")
FLAG_TEXT = {True: "Likely pneumonia - review first", False: "No pneumonia flagged"}
CAUTION_SEPARATOR = " | "
LINK_COLOUR = "#1a4f9c"
ALERT_COLOUR = "#b00020"     # a flagged study's flag and score, a failed file, a run stopped before its end
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


@dataclass
class ImageResult:
    image: Radiograph
    score: float
    thumbnail: np.ndarray | None     # unit image, downscaled (None once released, or when not kept)
    overlay: np.ndarray | None = None
    heat_empty: bool = False          # Grad-CAM found no region that raised the score
    appearance: float | None = None   # appearance distance (cxrscreen.appearance), None when not measured
    appearance_caution: str = ""      # set when the distance is over the model's limit
    pixels: str = ""                  # digest of the model's input (Screener(digests=True), for calibrate)


@dataclass
class StudyResult:
    study: Study
    images: list[ImageResult] = field(default_factory=list)
    failed: list[FileOutcome] = field(default_factory=list)
    warning: str = ""     # why the score may not apply to this patient (outside the model's population)

    @property
    def score(self) -> float | None:
        return max((r.score for r in self.images), default=None)

    @property
    def appearance(self) -> float | None:
        """The largest appearance distance of the study's images; None when none was measured."""
        return max((r.appearance for r in self.images if r.appearance is not None), default=None)

    @property
    def appearance_caution(self) -> str:
        """The cautions of the study's images that are unlike the training radiographs, joined by ' | '."""
        return CAUTION_SEPARATOR.join(r.appearance_caution for r in self.images if r.appearance_caution)

    @property
    def unscored_frames(self) -> int:
        """Frames of the study's multi-frame images that were not scored (only frame 1 of each is)."""
        return sum(max(r.image.frames - 1, 0) for r in self.images)


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)      # elsewhere: set and restore (a moment in which another thread could create a file)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: Path, mode: str = "wb"):
    """Write to a temporary file beside ``path`` and rename it into place on success.

    The file gets the permissions a plain ``open()`` would give it (0666 less the umask), not
    mkstemp's 0600: reports written by a service account must be readable by whom the site's
    umask lets read them (a PACS sender, the radiologists' group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # backslashreplace: the bytes of a file name that is not UTF-8 are written as \xNN, not an error
        text = {"newline": "", "encoding": "utf-8", "errors": "backslashreplace"}
        with os.fdopen(fd, mode, **({} if "b" in mode else text)) as handle:
            os.chmod(tmp, 0o666 & ~_umask())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name fragment safe on every filesystem: no separators, traversal, control or reserved names."""
    text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    text = re.sub(r"\.{2,}", ".", text)[:limit].strip("._-")
    if not text or text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = f"x_{text}" if text else "unknown"
    return text


def report_filename(study: Study) -> str:
    """``<patient>_<date>_<accession or uid>_<uid hash>.pdf``: readable, safe and unique per study."""
    import hashlib

    first = study.first
    digest = hashlib.sha1(study.study_uid.encode("utf-8")).hexdigest()[:10]
    parts = [safe_name(first.patient_id, 40) if first and first.patient_id else "nopid",
             safe_name(first.study_date, 8) if first and first.study_date else "nodate",
             safe_name(first.accession, 24) if first and first.accession else "",
             digest]
    return "_".join(p for p in parts if p) + ".pdf"


def _jpeg(arr: np.ndarray) -> io.BytesIO:
    """JPEG bytes of a picture: reportlab embeds JPEG as is, where PNG costs a decode and re-compression."""
    from PIL import Image

    buffer = io.BytesIO()
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(arr).save(buffer, format="JPEG", quality=90)
    buffer.seek(0)
    return buffer


class _JpegReader(ImageReader):
    """reportlab's reader of a JPEG of :func:`_jpeg`, named by its bytes. ``Canvas.drawImage`` names every image
    by its pixels (``getRGBData``, a decode and a copy of the picture) only to draw the same image once per
    PDF, 10% of a report's time; a JPEG is then embedded from its bytes (``jpeg_fh``), not from those pixels.
    The same bytes are the same picture, so they name it as well."""

    def __init__(self, arr: np.ndarray) -> None:
        super().__init__(_jpeg(arr))
        if self.jpeg_fh() is None:      # reportlab would embed it from getRGBData: it must stay pixels
            raise ValueError("not read as a JPEG")

    def getRGBData(self):       # noqa: N802 (reportlab's name)
        self._dataA = None
        return self.fp.getvalue()


class _Picture(Flowable):
    """A picture in a report, ``width`` x ``height`` points, centred: reportlab's ``Image`` flowable, without its
    decoding of the JPEG (:class:`_JpegReader`)."""

    def __init__(self, arr: np.ndarray, width: float, height: float) -> None:
        super().__init__()
        self.reader, self.width, self.height, self.hAlign = _JpegReader(arr), width, height, "CENTER"

    def wrap(self, available_width, available_height):
        return self.width, self.height

    def draw(self):
        self.canv.drawImage(self.reader, 0, 0, self.width, self.height)


_AGE_UNITS = {"D": "day", "W": "week", "M": "month", "Y": "year"}


def display_date(value: str) -> str:
    """A DICOM date (DA, ``YYYYMMDD``, or the old ``YYYY.MM.DD``) as ``YYYY-MM-DD``; anything else as written."""
    digits = value.strip().replace(".", "")
    if len(digits) == 8 and digits.isdigit():
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"
    return value.strip()


def display_time(value: str) -> str:
    """A DICOM time (TM, ``HHMMSS.FFFFFF``, or the old ``HH:MM:SS``) as ``HH:MM:SS`` or ``HH:MM``; else as written."""
    digits = value.strip().split(".")[0].replace(":", "")
    if len(digits) in (4, 6) and digits.isdigit():
        return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))
    return value.strip()


def turn_note(orientation: str, presentation: Presentation | None = None) -> str:
    """What a report says of an image :func:`cxrscreen.normalise.upright` turned or mirrored; '' when it was taken
    as stored."""
    notes = []
    if presentation is not None and presentation.transforms:
        created = " ".join(filter(None, (display_date(presentation.created[:8]),
                                         display_time(presentation.created[8:12]))))
        notes.append(f"Shown as its presentation state {presentation.name}{' of ' + created if created else ''} "
                     f"shows it: {presentation_words(presentation)}.")
        orientation = shown_orientation(orientation, presentation)
    turns = upright_turns(orientation)
    if turns:
        how = {1: "a quarter turn counter-clockwise", 2: "a half turn", 3: "a quarter turn clockwise"}[turns]
        notes.append(f"{'Shown so, it is' if notes else 'Stored'} {'upside down' if turns == 2 else 'on its side'} "
                     f"(Patient Orientation {orientation}{' as shown' if notes else ''}): turned upright, {how}.")
    if not notes:
        return ""
    return " ".join(notes)[:-1] + ", to be scored, and shown so here."


def display_age(patient_age: str, birth_date: str, study_date: str) -> str:
    """The age as a reader says it: PatientAge (``003Y`` -> ``3 years``, ``018M`` -> ``18 months``), else from
    the birth and study dates (marked so, in months under two years); "" when neither gives one."""
    parsed = parse_patient_age(patient_age)
    if parsed:
        n, unit = parsed
        return f"{n} {_AGE_UNITS[unit]}{'' if n == 1 else 's'}"
    years = age_in_years("", birth_date, study_date)
    if years is None:
        return patient_age.strip()      # as written (000Y, or a malformed value), for the reader to judge
    n, unit = (int(years * 12), "month") if years < 2 else (int(years), "year")
    return f"{n} {unit}{'' if n == 1 else 's'} (from the birth date)"


def _p(text, *, bold: bool = False, italic: bool = False) -> str:
    """Paragraph markup of any text, in any script (:func:`cxrscreen.typeset.markup`); ``bold`` and
    ``italic`` say how the text stands (a ``<b>`` around it, an italic style)."""
    return markup(str(text), bold=bold, italic=italic)


def write_study_report(path: Path, result: StudyResult, *, threshold: float, operating_point: dict,
                       model_name: str, model_sha256: str, amendment: str = "", population: str = "") -> Path:
    """One PDF for one study: identifiers, score, flag in words, images with Grad-CAM, skipped files.

    ``amendment`` (watch mode) says which earlier report this one supersedes and why; ``population``
    whom the model's training images came from (the card's), said under the score.
    """
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    study, first = result.study, result.study.first
    score = result.score
    flagged = score is not None and score >= threshold
    story = [Paragraph("Chest radiograph screening report", styles["Title"])]
    if amendment:
        story += [Paragraph(f'<font color="#8a4b00"><b>{_p(amendment, bold=True)}</b></font>', styles["BodyText"]),
                  Spacer(1, 3 * mm)]
    ident_style = styles["BodyText"].clone("ident", fontSize=9, leading=11)

    def value(text, width=60 * mm - 12):      # a value's column, less reportlab's padding of 6 points a side
        return cell(text or "-", ident_style, width)

    ident = [
        ["Patient ID", value(first.patient_id), "Patient name", value(person_name(first.patient_name))],
        ["Birth date", value(display_date(first.patient_birth_date)), "Sex / age",
         value(f"{first.patient_sex or '-'} / "
               f"{display_age(first.patient_age, first.patient_birth_date, first.study_date) or '-'}")],
        ["Accession", value(first.accession), "Study date",
         value(" ".join(x for x in (display_date(first.study_date), display_time(first.study_time)) if x))],
        ["Study", value(first.study_description), "Modality", value(first.modality or first.kind.value.upper())],
        ["Study UID", value(study.study_uid, 148 * mm - 12), "", ""],
    ]
    table = Table(ident, colWidths=[28 * mm, 60 * mm, 28 * mm, 60 * mm])
    table.setStyle(TableStyle([("SPAN", (1, 4), (3, 4)), ("FONTSIZE", (0, 0), (-1, -1), 9),
                               ("LEADING", (0, 0), (-1, -1), 11),
                               ("TEXTCOLOR", (0, 0), (0, -1), colors.grey), ("TEXTCOLOR", (2, 0), (2, -1), colors.grey),
                               ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    story += [table, Spacer(1, 4 * mm)]
    verdict = FLAG_TEXT[flagged] if score is not None else "Not scored - see failures below"
    colour = ALERT_COLOUR if flagged else "#1b5e20"
    story.append(Paragraph(f'<font color="{colour}" size="16"><b>{_p(verdict)}</b></font>', styles["BodyText"]))
    story.append(Spacer(1, 3 * mm))
    sens = operating_point.get("sensitivity")
    spec = operating_point.get("specificity")
    op_text = (f"sensitivity {sens:.3f}, specificity {spec:.3f} on {operating_point.get('source', 'validation data')}"
               if isinstance(sens, float) and isinstance(spec, float) else "not recorded")
    if score is not None:
        n = len(result.images)
        over = "its one frontal image" if n == 1 else f"maximum over {n} frontal images"
        story.append(Paragraph(f"Study score <b>{score:.3f}</b> ({over}); threshold <b>{threshold:.3f}</b>; "
                               f"operating point: {_p(op_text)}.", styles["BodyText"]))
    for caution in filter(None, [result.warning, *result.appearance_caution.split(CAUTION_SEPARATOR)]):
        story.append(Paragraph(f'<font color="#8a4b00"><b>Caution: {_p(caution, bold=True)}.</b></font>',
                               styles["BodyText"]))
    if population:
        story.append(Paragraph(f"Model trained on: {_p(population, italic=True)}.", styles["Italic"]))
    story.append(Spacer(1, 4 * mm))
    for item in result.images:
        img = item.image
        label = (f"{_p(img.path.name, bold=True, italic=True)} - view {_p(img.view)}"
                 f"{', ' + _p(img.laterality) if img.laterality else ''}"
                 f" - score {item.score:.3f}"
                 + (f" - appearance {item.appearance:.2f}" if item.appearance is not None else ""))
        story.append(Paragraph(label, styles["Heading4"]))
        if img.frames > 1:
            story.append(Paragraph(f"Multi-frame image: frame 1 of {img.frames} was scored and is shown; "
                                   f"the other {img.frames - 1} were not.", styles["BodyText"]))
        if note := turn_note(img.patient_orientation, img.presentation):
            story.append(Paragraph(_p(note), styles["BodyText"]))
        width = 85 * mm
        h = width * item.thumbnail.shape[0] / item.thumbnail.shape[1]
        cells = [_Picture(item.thumbnail, width, h)]
        cells.append(_Picture(item.overlay, width, h) if item.overlay is not None
                     else Paragraph("Grad-CAM not computed for this image", styles["BodyText"]))
        story.append(Table([cells], colWidths=[88 * mm, 88 * mm]))
        caption = ("Left: the image as normalised for the model. Right: Grad-CAM, the regions that raised the "
                   "score most (brighter = more).")
        if item.heat_empty:
            caption += " Here no region raised the score, so the overlay shows no colour."
        story.append(Paragraph(caption, styles["Italic"]))
    others = list(study.skipped) + list(result.failed)
    if others:
        story.append(Paragraph("Files of this study not scored", styles["Heading3"]))
        for o in others:
            story.append(paragraph(f"{o.path.name}: {o.status.value} - {o.reason}{' ' + o.tag if o.tag else ''}",
                                   styles["BodyText"], base="L"))
    story += [Spacer(1, 5 * mm), Paragraph(f"<b>{_p(DISCLAIMER)}</b>", styles["BodyText"]), Spacer(1, 2 * mm),
              Paragraph(f"cxrscreen {__version__}; model {_p(model_name, italic=True)} sha256 {model_sha256[:16]}...",
                        styles["Italic"])]
    with atomic_write(path) as handle:
        doc = SimpleDocTemplate(handle, pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm,
                                topMargin=12 * mm, bottomMargin=12 * mm, title=f"cxrscreen report {study.study_uid}",
                                author="cxrscreen")
        doc.build(story)
    return path


def brief_caution(warning: str, appearance_caution: str = "", unscored_frames: int | str = 0) -> str:
    """A study's cautions in brief, for the worklist and the log: what precedes the colon of each
    (:meth:`cxrscreen.infer.Population.age_warning`: the patient's age and the model's range;
    :meth:`cxrscreen.appearance.AppearanceReference.caution`: the image and its distance), and how many
    frames of its multi-frame images were not scored."""
    cautions = [c.split(":")[0] for c in (warning, *appearance_caution.split(CAUTION_SEPARATOR)) if c]
    if unscored_frames:
        n = int(unscored_frames)
        cautions.append(f"{n} frame{'s' if n > 1 else ''} of multi-frame images not scored")
    return CAUTION_SEPARATOR.join(cautions)


SUMMARY_FIELDS = ("rank", "kind", "status", "flag", "score", "threshold", "study_uid", "patient_id", "patient_name",
                  "accession", "study_date", "report", "files", "path", "step", "tag", "reason", "warning", "appearance",
                  "appearance_caution", "unscored_frames")


# A cell a spreadsheet reads as a formula (OWASP "CSV injection", CWE-1236): text from DICOM headers and
# file names is the sender's, and a PatientID of =HYPERLINK("http://...") would run when summary.csv is opened.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """A text value for summary.csv: printable (:func:`undecodable_as_hex`), and with an apostrophe before it
    where a spreadsheet would take it for a formula (Excel and LibreOffice then show it as text)."""
    text = undecodable_as_hex(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def write_summary(out: Path, rows: list[dict], meta: dict) -> None:
    """``summary.csv`` and ``summary.json`` (rows: studies ranked by score, then skipped/failed files).
    The CSV is for spreadsheets: UTF-8 with a byte-order mark, without which Excel reads it as the
    system's code page (``MÃ¼ller``, and worse for a name in Greek or Japanese), and its text cells
    :func:`csv_cell`. The JSON, for programs, keeps every value as read."""
    with atomic_write(out / "summary.csv", "w") as handle:
        handle.write("\ufeff")
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_cell(";".join(v) if isinstance(v, list) else v) if isinstance(v, (str, list))
                             else v for k, v in row.items()})
    with atomic_write(out / "summary.json", "w") as handle:
        json.dump({**meta, "rows": rows}, handle, indent=2, default=str)


def _no_report(row: dict) -> str:
    """What the worklist's report cell says of a study without a report: its status, and the earlier report that
    no longer stands, if it had one (every image of it withdrawn since)."""
    if row.get("withdrawn_report"):
        note = f"; withdrawn on the PACS by {row['rejection_note']}" if row.get("rejection_note") else ""
        return (f"{row['status']}: nothing left to screen; its earlier report {row['withdrawn_report']} no longer "
                f"stands{note}")
    return row["status"]


def _report_link(report: str, style, width: float):
    """The report's file name as a link that opens it (a PDF GoToR action to the file beside the worklist:
    Acrobat, browsers' viewers, Evince and Okular follow it). Report names are ASCII by construction. One
    that fits ``width`` points is drawn as one line with its link (:class:`_OneLineLink`), the worklist's
    most frequent cell: a paragraph parses its markup, wraps and draws it at about three times the cost."""
    from reportlab.platypus import Paragraph

    line = one_line(Path(report).name, style, width)
    if line is not None:
        return _OneLineLink(line, style)
    name = escape(Path(report).name, {'"': "&quot;"})
    return Paragraph(f'<a href="pdf:{name}" color="{LINK_COLOUR}">{name}</a>', style)


class _OneLineLink(Flowable):
    """A file name on one line, in the link colour, with a GoToR link over it (what the paragraph
    ``<a href="pdf:NAME">`` makes), its baseline where a paragraph of ``style`` puts its first line."""

    def __init__(self, name: str, style) -> None:
        super().__init__()
        self.name, self.style = name, style
        self.text_width = stringWidth(name, style.fontName, style.fontSize)

    def wrap(self, available_width, available_height):
        self.width, self.height = available_width, self.style.leading
        return self.width, self.height

    def draw(self) -> None:
        canvas, style = self.canv, self.style
        canvas.setFont(style.fontName, style.fontSize)
        canvas.setFillColor(colors.HexColor(LINK_COLOUR))
        baseline = self.height - style.fontSize        # as a paragraph's first line: one font size down
        canvas.drawString(0, baseline, self.name)
        canvas.linkURL(self.name, (0, baseline - 0.2 * style.fontSize, self.text_width, self.height),
                       relative=1, kind="GoToR")


# On the worklist, this many files or more skipped for one reason, and belonging to no study, are one row
GROUP_SKIPPED_FROM = 4


def group_skipped(rows: list[dict], at_least: int = GROUP_SKIPPED_FROM) -> list[dict]:
    """The worklist's list of files not screened, with the files skipped for one reason that belong to no study
    (a Mac's ``._*`` file beside every image copied from it, the text files of an export) as one row where
    there are ``at_least`` of them, its ``label`` their number and first names (each is in summary.csv).
    Failed files, and skipped ones of a study, stay a row each."""
    def reason(r: dict) -> tuple[str, str, str] | None:
        """What groups a row: its step, tag and reason when it is skipped outside any study, else None."""
        return (r["step"], r["tag"], r["reason"]) if r["status"] == "skipped" and not r["study_uid"] else None

    by_reason: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if reason(r) is not None:
            by_reason.setdefault(reason(r), []).append(r)
    grouped, done = [], set()
    for r in rows:
        key = reason(r)
        group = by_reason.get(key, [])         # a row no reason groups (key None) is never in one
        if len(group) < at_least:
            grouped.append(r)
        elif key not in done:
            done.add(key)
            names = ", ".join(Path(g["path"]).name for g in group[:3])
            grouped.append({**r, "label": f"{len(group)} files: {names}... (each one in summary.csv)"})
    return grouped


def selection_note(selection: dict) -> str:
    """What a run screened besides frontal chest images (:meth:`cxrscreen.ingest.Selection.as_json`), in a
    sentence for the worklist; '' when it screened only those."""
    parts = []
    if selection.get("include_lateral"):
        parts.append("lateral and other non-frontal views")
    elif selection.get("frontal_views"):
        parts.append("ViewPosition " + ", ".join(selection["frontal_views"]) + " as frontal")
    if selection.get("any_body_part"):
        parts.append("every body part")
    elif selection.get("chest_body_parts"):
        parts.append("BodyPartExamined " + ", ".join(selection["chest_body_parts"]) + " as chest")
    if not parts:
        return ""
    lifted = selection.get("include_lateral") or selection.get("any_body_part")
    return ("Also screened, by this run's options: " + "; ".join(parts) + "."
            + (" The model was trained on frontal chest radiographs only: its scores of other images are not "
               "validated." if lifted else ""))


# Rows whose heights are measured in one go by :class:`_PagedTable`
MEASURE_ROWS = 200


class _PagedTable(Flowable):
    """A table of many rows, its first row the header, split over pages in time linear in its rows: each page
    gets a table of the rows that fit it, under the header.

    A reportlab table measures every row it has left, and builds a new table of them all, each time it splits
    at a page's end: a worklist of 2,000 studies (and their 2,000 skipped lateral views) took 4.9 s, rewritten
    every 30 s by a busy ``watch``, and tables of 50 rows with a page break after each (what the worklist did
    to keep that down) left about half a page empty every other page. Here the rows are measured once,
    MEASURE_ROWS at a time. The rows listed in ``red`` (indices into ``data``) have the columns
    ``red_columns`` (first, last) in red: a flagged study's flag and score, a failed file's status."""

    # 7-point text on 8-point lines, the header on grey, every cell's text at its top
    STYLE = (("FONTSIZE", (0, 0), (-1, -1), 7), ("LEADING", (0, 0), (-1, -1), 8),
             ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey), ("VALIGN", (0, 0), (-1, -1), "TOP"))

    def __init__(self, data: list[list], widths: list[float], red: set[int], red_columns: tuple[int, int], *,
                 _heights: list[float] | None = None, _start: int = 1) -> None:
        super().__init__()
        self.data, self.widths, self.red, self.red_columns = data, widths, red, red_columns
        self.width, self.start = sum(widths), _start
        self.heights = _heights if _heights is not None else self._measure()

    def _table(self, rows: list[int], *, measured: bool = True):
        """A table of the header and ``rows`` (indices into ``data``), given their heights once measured."""
        from reportlab.platypus import Table, TableStyle

        first, last = self.red_columns
        style = [*self.STYLE, *(("TEXTCOLOR", (first, at), (last, at), colors.HexColor(ALERT_COLOUR))
                                for at, index in enumerate(rows, start=1) if index in self.red)]
        table = Table([self.data[0], *(self.data[i] for i in rows)], colWidths=self.widths, repeatRows=1,
                      rowHeights=[self.heights[0], *(self.heights[i] for i in rows)] if measured else None)
        table.setStyle(TableStyle(style))
        return table

    def _measure(self) -> list[float]:
        heights: list[float] = []
        for first in range(1, max(len(self.data), 2), MEASURE_ROWS):
            probe = self._table(list(range(first, min(first + MEASURE_ROWS, len(self.data)))), measured=False)
            probe.wrap(self.width, 1e9)
            heights += probe._rowHeights[1:] if heights else probe._rowHeights
        return heights

    def wrap(self, available_width, available_height):
        self.height = self.heights[0] + sum(self.heights[self.start:])
        return self.width, self.height

    def split(self, available_width, available_height):
        room, end = available_height - self.heights[0], self.start
        while end < len(self.data) and self.heights[end] <= room:
            room -= self.heights[end]
            end += 1
        if end == self.start and self.start < len(self.data):
            return []       # not one row fits: the frame goes on to the next page
        rest = [_PagedTable(self.data, self.widths, self.red, self.red_columns, _heights=self.heights,
                            _start=end)] if end < len(self.data) else []
        return [self._table(list(range(self.start, end))), *rest]

    def draw(self) -> None:
        table = self._table(list(range(self.start, len(self.data))))
        table.wrapOn(self.canv, self.width, self.height)
        table.drawOn(self.canv, 0, 0)


def write_worklist(path: Path, rows: list[dict], meta: dict) -> None:
    """A risk-sorted overview: flagged studies first, then by score, as many to a page as fit (the table's
    header on each). After the studies, every file that was not screened (failed, then skipped) with its
    study and the reason, so that a study whose every file was skipped is still on the radiologist's list."""
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    styles = getSampleStyleSheet()
    studies = [r for r in rows if r["kind"] == "study"]
    others = [r for r in rows if r["kind"] == "file"]
    story = [Paragraph("cxrscreen worklist - highest risk first", styles["Title"]),
             Paragraph(_p(f"model {meta.get('model')} (threshold {meta.get('threshold'):.3f}); "
                          f"{len(studies)} studies, {sum(r['flag'] == 'yes' for r in studies)} flagged; "
                          f"{sum(r['status'] == 'failed' for r in others)} failed and "
                          f"{sum(r['status'] == 'skipped' for r in others)} skipped files"), styles["BodyText"]),
             Spacer(1, 3 * mm)]
    widened = selection_note(meta.get("selection") or {})
    if widened:
        story[-1:-1] = [Paragraph(_p(widened), styles["BodyText"])]
    if meta.get("pending_studies"):
        story[-1:-1] = [Paragraph(_p(f"This run was stopped before it finished: {meta['pending_studies']} studies were "
                                     "not screened (listed as pending). Run the same command again to screen "
                                     "them; the studies reported are reused."),
                                  styles["BodyText"].clone("stopped", textColor=colors.HexColor(ALERT_COLOUR)))]
    header = ["#", "Flag", "Score", "Patient ID", "Patient", "Accession", "Study date", "Study UID", "Report", "Caution"]
    small = styles["BodyText"].clone("cell", fontSize=7, leading=8)
    widths = [w * mm for w in (7, 12, 10, 22, 32, 24, 15, 38, 78, 35)]
    inner = [w - 12 for w in widths]        # a cell's text is 6 points in from each side (reportlab's padding)
    data = [header] + [[r["rank"], "REVIEW" if r["flag"] == "yes" else "", "" if r["score"] == "" else
                        f"{float(r['score']):.3f}", cell(r["patient_id"], small, inner[3]),
                        cell(person_name(r.get("patient_name", "")), small, inner[4]),
                        cell(r["accession"], small, inner[5]), display_date(r["study_date"]),
                        r["study_uid"][-24:],
                        _report_link(r["report"], small, inner[8]) if r["report"] else paragraph(_no_report(r), small),
                        cell(brief_caution(r.get("warning", ""), r.get("appearance_caution", ""),
                                           r.get("unscored_frames", 0)), small, inner[9])]
                       for r in studies]
    story.append(_PagedTable(data, widths, {i for i, r in enumerate(studies, start=1) if r["flag"] == "yes"},
                             red_columns=(1, 2)))
    if others:
        story += [Spacer(1, 4 * mm), Paragraph(f"Not screened: {len(others)} files (failed first)", styles["Heading3"])]
        others = group_skipped(others)
        widths = [w * mm for w in (16, 50, 42, 40, 98)]
        inner = [w - 12 for w in widths]
        data = [["Status", "File", "Study UID", "Step / tag", "Reason"]] + [
            [r["status"], cell(r.get("label") or Path(r["path"]).name, small, inner[1]), r["study_uid"][-24:],
             cell(" ".join(x for x in (r["step"], r["tag"]) if x), small, inner[3]),
             paragraph(r["reason"], small, base="L")]
            for r in others]
        story.append(_PagedTable(data, widths, {i for i, r in enumerate(others, start=1) if r["status"] == "failed"},
                                 red_columns=(0, 0)))
    story += [Spacer(1, 4 * mm), Paragraph(f"<b>{_p(DISCLAIMER)}</b>", styles["BodyText"])]
    with atomic_write(path) as handle:
        SimpleDocTemplate(handle, pagesize=landscape(A4), leftMargin=12 * mm, rightMargin=12 * mm,     # 273 mm wide
                          title="cxrscreen worklist", author="cxrscreen").build(story)
