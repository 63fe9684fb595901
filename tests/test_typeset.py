"""Patient names and other DICOM text in any script reach the PDFs as written."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cxrscreen.typeset import CHINESE, FONT, JAPANESE, KOREAN, markup, person_name

from conftest import pdf_text, phantom

# (SpecificCharacterSet, PatientName as the modality wrote it, the name as the report shows it, PatientID)
NAMES = {
    "latin1": ("ISO_IR 100", "Müller^Jürgen", "Müller, Jürgen", "PID-Ä1"),
    "latin2": ("ISO_IR 101", "Łukasiewicz^Żaneta", "Łukasiewicz, Żaneta", "PID-Ł2"),
    "cyrillic": ("ISO_IR 144", "Иванов^Иван^Петрович", "Иванов, Иван Петрович", "ИД-3"),
    "greek": ("ISO_IR 126", "Παπαδόπουλος^Γιώργος", "Παπαδόπουλος, Γιώργος", "ΑΜ-4"),
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada, Tarou (山田 太郎; やまだ たろう)",
                 "患者-5"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "Hong, Gildong (洪 吉洞; 홍 길동)", "환자-6"),
    "chinese": ("GB18030", "Wang^XiaoDong=王^小東=", "Wang, XiaoDong (王 小東)", "病人-7"),
    "utf8": ("ISO_IR 192", "Nguyễn^Thị Minh^^Bà", "Bà Nguyễn, Thị Minh", "PID-ễ8"),
}


def test_person_names_are_shown_as_people_write_them():
    for _, raw, shown, _ in NAMES.values():
        assert person_name(raw) == shown
    assert person_name("Smith^John^Quincy^Dr.^Jr.") == "Dr. Smith, John Quincy Jr."
    assert person_name("^John") == "John"
    assert person_name("=山田^太郎") == "山田 太郎"
    assert person_name("Anonymized") == "Anonymized"
    assert person_name("") == ""


def test_markup_escapes_and_gives_each_script_a_font_that_has_it():
    # Windows-1252 text stays in the paragraph's (standard) font
    assert markup("Müller <&> Œuvre") == "Müller &lt;&amp;&gt; Œuvre"
    assert markup("A\x00B\x1bC") == "ABC"
    assert markup("Mu\u0308ller") == "Müller"                 # decomposed, as some systems send it
    assert markup("Иванов <Παπα>") == f'<font name="{FONT}">Иванов &lt;Παπα&gt;</font>'
    # <font name> resets bold and italic: a text standing in bold italic (a heading) gets them back inside it
    assert markup("Снимок.dcm", bold=True, italic=True) == f'<font name="{FONT}"><b><i>Снимок.dcm</i></b></font>'
    assert markup("Müller", bold=True) == "Müller"
    # Japanese when the text has kana, Korean when it has hangul, else Chinese (which has every ideograph)
    assert markup("山田 やまだ") == (f'<font name="{JAPANESE}">山田</font><font name="{FONT}"> </font>'
                                  f'<font name="{JAPANESE}">やまだ</font>')
    assert markup("洪 홍") == f'<font name="{KOREAN}">洪</font><font name="{FONT}"> </font><font name="{KOREAN}">홍</font>'
    assert markup("Wang (王小東)") == f'<font name="{FONT}">Wang (</font><font name="{CHINESE}">王小東</font><font name="{FONT}">)</font>'


def test_right_to_left_names_are_put_in_visual_order_and_arabic_letters_joined():
    hebrew = markup("כהן^דוד")       # Cohen^David: the first letter read is the rightmost drawn
    assert hebrew == f'<font name="{FONT}">דוד^ןהכ</font>'
    arabic = markup("محمد")             # Muhammad, joined: initial, medial, medial, final forms, drawn right to left
    assert arabic == f'<font name="{FONT}">\ufeaa\ufee4\ufea4\ufee3</font>'
    # Abdullah: letters joined, not the word ligature U+FDF2 that the font lacks (which made it unprintable)
    assert markup("عبد الله") == f'<font name="{FONT}">\ufeea\ufee0\ufedf\ufe8d \ufeaa\ufe92\ufecb</font>'
    assert "\ufef7" in markup("الأنصاري")          # lam-alef, which the font has, is still one glyph


def test_a_script_no_font_has_is_named_not_printed_with_gaps():
    assert markup("สมชาย^ใจดี") == "[not printable here: Thai text]"
    assert markup("Somchai (สมชาย)") == "[not printable here: Thai text]"
    assert markup("\U00020000") == "[not printable here: CJK text]"    # outside the Asian fonts' UCS-2 maps


@pytest.fixture
def reports(tmp_path, write_dicom):
    """A report for each name of NAMES, written through the reader from files in their character set,
    and a worklist with their patient IDs and names."""
    from cxrscreen.ingest import group_studies, read_record
    from cxrscreen.report import (SUMMARY_FIELDS, ImageResult, StudyResult, report_filename, write_study_report,
                                  write_worklist)

    pixels = phantom(64, 64)
    records = [read_record(write_dicom(pixels, name=f"{key}.dcm", patient_name=raw, patient_id=pid,
                                       SpecificCharacterSet=charset, StudyDescription="Klatka piersiowa PA"))
               for key, (charset, raw, _, pid) in NAMES.items()]
    studies, loose = group_studies(records)
    assert not loose and len(studies) == len(NAMES)
    out, rows = tmp_path / "out", []
    out.mkdir()
    thumb = np.repeat((pixels[..., None] / 4095 * 255).astype(np.uint8), 3, axis=2)
    for study in studies:
        result = StudyResult(study, [ImageResult(study.first, 0.5, thumb, thumb)])
        path = write_study_report(out / report_filename(study), result, threshold=0.7, operating_point={},
                                  model_name="m", model_sha256="0" * 64)
        rows.append({**dict.fromkeys(SUMMARY_FIELDS, ""), "kind": "study", "status": "scored", "flag": "no",
                     "score": 0.5, "study_uid": study.study_uid, "patient_id": study.first.patient_id,
                     "patient_name": study.first.patient_name, "report": str(path)})
    write_worklist(out / "worklist.pdf", rows, {"model": "m", "threshold": 0.7})
    return {study.first.path.stem: out / report_filename(study) for study in studies}, out / "worklist.pdf"


def test_reports_print_names_of_every_character_set_in_embedded_unicode_fonts(reports):
    from pypdf import PdfReader

    by_key, worklist = reports
    for key, (_, _, shown, pid) in NAMES.items():
        text = pdf_text(by_key[key])
        assert shown in text, key
        assert pid in text and "Klatka piersiowa PA" in text
        fonts = {str(f["/BaseFont"]) for f in PdfReader(by_key[key]).pages[0]["/Resources"]["/Font"].values()}
        latin = key == "latin1"                 # Windows-1252 text stays in the standard fonts: nothing embedded
        assert any(f.endswith("+DejaVuSans") for f in fonts) is not latin, (key, fonts)
    assert all(pid in pdf_text(worklist) for *_, pid in NAMES.values())
    assert all(shown in pdf_text(worklist) for _, _, shown, _ in NAMES.values())    # the name beside the ID


# Avraham Yehoshua Heschel Ben-Ami HaCohen of Jerusalem: long enough to wrap in the report's name cell
LONG_HEBREW = "בן-עמי הכהן מירושלים^אברהם יהושע העשיל"


def test_right_to_left_text_is_broken_into_lines_in_reading_order():
    from bidi import get_display
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph

    from cxrscreen.typeset import paragraph, reading_order_lines

    style = getSampleStyleSheet()["BodyText"]
    name = person_name(LONG_HEBREW)
    lines = reading_order_lines(name, 80, FONT, 10)
    assert len(lines) > 2 and " ".join(lines) == " ".join(name.split())
    flow = paragraph(name, style)
    flow.wrap(80, 1000)
    # each line drawn is its own logical line in visual order, the first line holding the first words
    assert flow.lines == [get_display(line, base_dir="R") for line in lines]
    assert flow.lines[0].endswith(get_display("בן-עמי")) and flow.style.alignment == 2       # aligned right
    # a word longer than the line is cut between letters, nothing lost
    assert "".join(reading_order_lines("אבגדהוזחטיכלמנסעפצקרשת", 30, FONT, 10)) == "אבגדהוזחטיכלמנסעפצקרשת"
    # the tool's own sentence naming a Hebrew file stays a left-to-right paragraph
    sentence = paragraph("צילום.dcm: skipped - not a radiograph", style, base="L")
    sentence.wrap(400, 100)
    assert sentence.lines[0].startswith(get_display("צילום")) and sentence.style.alignment == 0
    assert type(paragraph("Müller, Jürgen", style)) is Paragraph and type(paragraph("Иванов", style)) is Paragraph


def test_a_long_hebrew_name_reads_first_line_first_in_the_report(tmp_path, write_dicom):
    from cxrscreen.ingest import group_studies, read_record
    from cxrscreen.report import ImageResult, StudyResult, write_study_report

    pixels = phantom(64, 64)
    record = read_record(write_dicom(pixels, name="he.dcm", patient_name=LONG_HEBREW, patient_id="PID-9",
                                     SpecificCharacterSet="ISO_IR 138"))
    (study,), _ = group_studies([record])
    thumb = np.repeat((pixels[..., None] / 4095 * 255).astype(np.uint8), 3, axis=2)
    path = write_study_report(tmp_path / "he.pdf", StudyResult(study, [ImageResult(study.first, 0.5, thumb, thumb)]),
                              threshold=0.7, operating_point={}, model_name="m", model_sha256="0" * 64)
    # pypdf reads each drawn line back into reading order: the name reads whole only when its lines are in order
    assert f"Patient name {person_name(LONG_HEBREW)} Birth date" in pdf_text(path)


def test_files_skipped_alike_outside_any_study_are_one_row_of_the_worklist(tmp_path):
    """A share written from a Mac holds a ._* file beside every image: each was a row of the worklist's list of
    files not screened, burying the failed and skipped files of studies. Four or more alike are one row;
    summary.csv keeps each."""
    from cxrscreen.report import SUMMARY_FIELDS, group_skipped, write_worklist

    def row(name, status="skipped", reason="a Mac's AppleDouble file", study=""):
        return {**dict.fromkeys(SUMMARY_FIELDS, ""), "kind": "file", "status": status, "path": f"/in/{name}",
                "step": "discover", "reason": reason, "study_uid": study}

    rows = ([row("bad.dcm", "failed", "truncated")] + [row(f"._IM{i:04d}.dcm") for i in range(40)]
            + [row("lat.dcm", reason="view 'LL' is not frontal", study="1.2.3")]
            + [row(f"notes{i}.txt", reason="not an image") for i in range(3)])
    grouped = group_skipped(rows)
    assert [r.get("label") or r["path"] for r in grouped] == [
        "/in/bad.dcm", "40 files: ._IM0000.dcm, ._IM0001.dcm, ._IM0002.dcm... (each one in summary.csv)",
        "/in/lat.dcm", "/in/notes0.txt", "/in/notes1.txt", "/in/notes2.txt"]
    write_worklist(tmp_path / "worklist.pdf", rows, {"model": "m", "threshold": 0.7})
    text = pdf_text(tmp_path / "worklist.pdf")
    assert "Not screened: 45 files" in text and "40 files: ._IM0000.dcm" in text and "._IM0039" not in text


def test_a_table_cell_is_its_text_where_that_fits_one_line_else_a_paragraph():
    """The worklist's cells: a paragraph parses, wraps and draws its text at several times the cost of the text
    itself, which is what a short name or ID in the standard fonts is drawn as."""
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Flowable

    from cxrscreen.typeset import cell

    style = getSampleStyleSheet()["BodyText"].clone("cell", fontSize=7, leading=8)
    assert cell("P00001385", style, 50) == "P00001385" and cell("Müller, Jürgen", style, 80) == "Müller, Jürgen"
    assert cell("a\x00b\nc", style, 50) == "abc" and cell("", style, 50) == ""
    for text in ("x" * 60, "山田 太郎", "שרה כהן", " padded "):     # too wide, CJK, Hebrew, edges of white space
        assert isinstance(cell(text, style, 50), Flowable)
    assert isinstance(cell("P" * 40, style, 400), str) and isinstance(cell("P" * 40, style, 100), Flowable)


def test_a_long_worklist_fills_its_pages_with_every_study_once_in_rank_order(tmp_path):
    """Tables of 50 studies, a page break after each, kept reportlab from measuring thousands of rows at every
    page's end, but 50 rows did not fit a page: every other page was half empty (2,000 studies and their skipped
    laterals: 207 pages, 134 now). Each page now holds the rows that fit it, under the table's header."""
    from pypdf import PdfReader

    from cxrscreen.pipeline import file_rows, rank_rows, study_row
    from cxrscreen.records import FileOutcome, Status
    from cxrscreen.report import write_worklist

    n = 200
    studies = rank_rows([study_row(f"1.2.826.0.1.3680043.8.498.{i}", 0.7, status="scored", score=i / n,
                                   flag="yes" if i >= 180 else "no", patient_id=f"PID{i:04d}", accession=f"A{i}",
                                   patient_name="Doe^Jane" if i != 7 else "Yamada^Tarou=山田^太郎",
                                   warning="patient aged 45 years: outside the model's training population (1-5 years)"
                                   if i % 50 == 0 else "", report=f"CXR_{i:04d}.pdf") for i in range(n)])
    skipped = file_rows([FileOutcome(tmp_path / f"s{i}" / "IM0002.dcm", Status.SKIPPED, "view 'LL' is not frontal",
                                     step="select", tag="(0018,5101) ViewPosition", study_uid=f"1.2.826.{i}")
                         for i in range(60)])
    write_worklist(tmp_path / "worklist.pdf", studies + skipped, {"model": "m", "threshold": 0.7})
    pages = [page.extract_text() for page in PdfReader(tmp_path / "worklist.pdf").pages]
    per_page = [re.findall(r"PID\d{4}", text) for text in pages]
    assert [pid for page in per_page for pid in page] == [r["patient_id"] for r in studies]     # each once, by rank
    assert [r["patient_id"] for r in studies[:3]] == ["PID0199", "PID0198", "PID0197"]
    counts = [len(pids) for pids in per_page if pids]
    assert all("Patient ID" in text for text, pids in zip(pages, per_page) if pids)             # the header on each
    # the full pages between the first (under the title) and the last hold as many rows as fit: the same number,
    # one fewer where a caution takes two lines; no page is half empty
    assert len(counts) >= 5 and max(counts[1:-1]) - min(counts[1:-1]) <= 1 and min(counts[1:-1]) >= 28
    links = [a.get_object()["/A"]["/F"] for page in PdfReader(tmp_path / "worklist.pdf").pages
             for a in page.get("/Annots", [])]
    assert links == [r["report"] for r in studies]
    assert " ".join(pages).count("IM0002.dcm") == 60 and "Not screened: 60 files" in " ".join(" ".join(pages).split())
