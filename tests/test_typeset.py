"""Patient names and other DICOM text in any script reach the PDFs as written."""

from __future__ import annotations

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


def test_a_script_no_font_has_is_named_not_printed_with_gaps():
    assert markup("สมชาย^ใจดี") == "[not printable here: Thai text]"
    assert markup("Somchai (สมชาย)") == "[not printable here: Thai text]"
    assert markup("\U00020000") == "[not printable here: CJK text]"    # outside the Asian fonts' UCS-2 maps


@pytest.fixture
def reports(tmp_path, write_dicom):
    """A report for each name of NAMES, written through the reader from files in their character set,
    and a worklist with their patient IDs."""
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
                     "report": str(path)})
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
