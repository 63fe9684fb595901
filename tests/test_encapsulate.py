"""Reports as DICOM Encapsulated PDF instances of their studies (--dicom)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import phantom
from cxrscreen.encapsulate import (ENCAPSULATED_PDF_STORAGE, encapsulated_pdf, rejection_code, write_encapsulated_pdf,
                                  write_rejection_note)
from cxrscreen.ingest import group_studies, read_record

ROOT = Path(__file__).resolve().parents[1]

# Encapsulated PDF IOD (PS3.3 A.45.1): the type 1 and type 2 attributes of its modules
TYPE_1 = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesInstanceUID", "SeriesNumber",
          "ConversionType", "InstanceNumber", "BurnedInAnnotation", "MIMETypeOfEncapsulatedDocument",
          "EncapsulatedDocument"]
TYPE_2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "ContentDate", "ContentTime",
          "AcquisitionDateTime", "DocumentTitle", "ConceptNameCodeSequence"]


def _images(*paths):
    """The scorable images of the one study these files make, as the reader gives them."""
    studies, loose = group_studies(read_record(p) for p in paths)
    assert len(studies) == 1 and not loose
    return studies[0].images


def test_the_report_is_an_encapsulated_pdf_of_the_screened_study(tmp_path, write_dicom):
    pixels = phantom(64, 64)
    common = dict(study_seed="s", patient_id="PID-7", patient_name="Łukasiewicz^Żaneta",
                  SpecificCharacterSet="ISO_IR 192", StudyTime="101500", StudyID="S42",
                  ReferringPhysicianName="Nowak^Jan", IssuerOfPatientID="HOSP-A")
    paths = [write_dicom(pixels, name="a.dcm", **common), write_dicom(pixels, name="b.dcm", view_position="AP", **common)]
    images = _images(*paths)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4 odd length")                      # 19 bytes: the OB value is padded to 20
    path = write_encapsulated_pdf(tmp_path / "report.dcm", pdf, images)
    ds = pydicom.dcmread(path)
    source = pydicom.dcmread(paths[0])
    for keyword in TYPE_1:
        assert keyword in ds and ds.data_element(keyword).value not in (None, ""), keyword
    for keyword in TYPE_2:
        assert keyword in ds, keyword
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # filed into the same patient and study as the images, in the study's own character set
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName",
                    "AccessionNumber", "StudyDescription"):
        assert str(ds.get(keyword)) == str(source.get(keyword)), keyword
    assert str(ds.PatientName) == "Łukasiewicz^Żaneta" and ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.Modality, ds.ConversionType, ds.BurnedInAnnotation, ds.MIMETypeOfEncapsulatedDocument) == (
        "DOC", "WSD", "YES", "application/pdf")
    assert ds.EncapsulatedDocumentLength == 19 and ds.EncapsulatedDocument == b"%PDF-1.4 odd length\0"
    assert {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.SourceInstanceSequence} == {
        (pydicom.dcmread(p).SOPClassUID, pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    # the series is the same on every run, the instance new each time a report is written; amendments count up
    again = encapsulated_pdf(b"%PDF", images, version=2)
    assert again.SeriesInstanceUID == ds.SeriesInstanceUID and again.SOPInstanceUID != ds.SOPInstanceUID
    assert again.InstanceNumber == 2 and "amended (version 2)" in again.DocumentTitle and ds.InstanceNumber == 1
    # a report never comes back as an image to screen: cxrscreen skips it (no pixel data)
    assert read_record(path).status.value == "skipped"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dicom3tools_finds_no_error_in_the_encapsulated_pdf(tmp_path, write_dicom):
    """An independent check of the IOD, where dicom3tools is installed (apt install dicom3tools)."""
    import subprocess

    images = _images(write_dicom(phantom(64, 64), name="a.dcm", patient_name="Иванов^Иван",
                                 SpecificCharacterSet="ISO_IR 144"))
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%%EOF\n")
    path = write_encapsulated_pdf(tmp_path / "r.dcm", pdf, images)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (check.stdout + check.stderr).splitlines()
    assert "EncapsulatedPDF" in lines and not [line for line in lines if line.startswith("Error")], lines


def _two_versions(tmp_path, write_dicom, **attributes) -> list[Path]:
    """A study's report and its amendment (version 2), each written as .dcm."""
    images = _images(write_dicom(phantom(64, 64), name="a.dcm", **attributes))
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%%EOF\n")
    return [write_encapsulated_pdf(tmp_path / f"r.v{v}.dcm", pdf, images, version=v) for v in (1, 2)]


def test_a_rejection_note_withdraws_every_version_of_a_report_in_its_study(tmp_path, write_dicom):
    reports = _two_versions(tmp_path, write_dicom, patient_name="Иванов^Иван",
                            SpecificCharacterSet="ISO_IR 144")
    path = write_rejection_note(tmp_path / "r.rejection.dcm", [*reports, tmp_path / "gone.dcm"], "113037", "why")
    note, sent = pydicom.dcmread(path), [pydicom.dcmread(r) for r in reports]
    assert note.SpecificCharacterSet == "ISO_IR 144" and str(note.PatientName) == "Иванов^Иван"
    assert note.StudyInstanceUID == sent[0].StudyInstanceUID and note.ConceptNameCodeSequence[0].CodeValue == "113037"
    assert [r.ReferencedSOPInstanceUID for r in
            note.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence] == [
        d.SOPInstanceUID for d in sent]                        # both versions; the one not there is left out
    # the same reports, the same note: writing it again sends a PACS nothing new
    again = pydicom.dcmread(write_rejection_note(tmp_path / "again.dcm", reports, "113037", "why"))
    assert again.SOPInstanceUID == note.SOPInstanceUID
    assert write_rejection_note(tmp_path / "none.dcm", [tmp_path / "gone.dcm"], "113001", "why") is None
    assert not (tmp_path / "none.dcm").exists()


def test_a_rejection_note_of_reports_takes_the_most_serious_reason_of_the_images():
    assert rejection_code({"Rejected for Quality Reasons", "Rejected for Patient Safety Reasons"}) == "113037"
    assert rejection_code({"Rejected for Quality Reasons", "Incorrect Modality Worklist Entry"}) == "113038"
    assert rejection_code({"Data Retention Policy Expired"}) == "113039"
    assert rejection_code({""}) == rejection_code(set()) == "113001"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dicom3tools_finds_no_error_in_the_rejection_note(tmp_path, write_dicom):
    import subprocess

    reports = _two_versions(tmp_path, write_dicom, StudyID="S1")
    path = write_rejection_note(tmp_path / "r.rejection.dcm", reports, "113038", "Withdrawn by cxrscreen")
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (check.stdout + check.stderr).splitlines()
    assert "KeyObjectSelectionDocument" in lines
    assert not [line for line in lines if line.startswith(("Error", "Warning"))], lines


@pytest.mark.skipif(shutil.which("dcm2pdf") is None, reason="dcm2pdf (DCMTK) not installed")
def test_dcmtk_gives_back_the_very_pdf_and_reads_the_name(tmp_path, write_dicom):
    """What a DCMTK-based PACS or viewer does with the report: extract the PDF (byte for byte) and decode
    the patient's name in the images' character set (apt install dcmtk)."""
    import subprocess

    images = _images(write_dicom(phantom(64, 64), name="a.dcm", patient_name="Müller^Jürgen",
                                 SpecificCharacterSet="ISO_IR 100"))
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF-1.4\n% an odd length\n%%EOF\n")
    path = write_encapsulated_pdf(tmp_path / "r.dcm", pdf, images)
    subprocess.run(["dcm2pdf", str(path), str(tmp_path / "back.pdf")], check=True, capture_output=True)
    assert (tmp_path / "back.pdf").read_bytes() == pdf.read_bytes()
    dump = subprocess.run(["dcmdump", "+U8", "+P", "0010,0010", str(path)], check=True, capture_output=True)
    assert "[Müller^Jürgen]" in dump.stdout.decode("utf-8"), dump


@pytest.mark.parametrize("charset, name", [
    ("ISO_IR 100", "Müller^Jürgen"), (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ISO_IR 144", "Иванов^Иван"), (None, "PLAIN^ASCII")])
def test_the_report_keeps_the_character_set_of_the_images(tmp_path, write_dicom, charset, name):
    """A PACS matches a report to its patient by these strings, and an older one may not read UTF-8."""
    extra = {"SpecificCharacterSet": charset} if charset else {}
    path = write_dicom(phantom(64, 64), name="a.dcm", patient_name=name, **extra)
    ds = encapsulated_pdf(b"%PDF", _images(path))
    written = tmp_path / "r.dcm"
    ds.save_as(written, enforce_file_format=True)
    back = pydicom.dcmread(written)
    assert str(back.PatientName) == name
    assert back.get("SpecificCharacterSet") == pydicom.dcmread(path).get("SpecificCharacterSet")
    # the same bytes as the image's: what a PACS compares
    assert back["PatientName"].value.original_string == pydicom.dcmread(path)["PatientName"].value.original_string


def test_a_character_set_that_cannot_write_the_values_gives_way_to_utf8():
    from cxrscreen.encapsulate import _character_set

    assert _character_set("ISO_IR 100", ["Müller", "CHEST"]) == "ISO_IR 100"
    assert _character_set("ISO_IR 100", ["Иванов"]) == "ISO_IR 192"
    assert _character_set("ISO_IR 999", ["Müller"]) == "ISO_IR 192"        # a term pydicom does not know
    assert _character_set("", ["Müller"]) == "ISO_IR 192" and _character_set("", ["CHEST"]) == ""


def test_a_study_of_jpegs_has_no_dicom_identity_to_file_a_report_under(tmp_path):
    import cv2

    jpeg = tmp_path / "chest.jpg"
    cv2.imwrite(str(jpeg), (phantom(64, 64) / 16).astype(np.uint8))
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF")
    assert write_encapsulated_pdf(tmp_path / "r.dcm", pdf, _images(jpeg)) is None
    assert not (tmp_path / "r.dcm").exists()


def test_batch_dicom_writes_one_per_dicom_study_and_a_rerun_writes_the_missing_from_the_pdf(tmp_path, model):
    from cxrscreen.pipeline import BatchOptions, run_batch

    inbox = tmp_path / "inbox"
    shutil.copytree(ROOT / "samples", inbox, ignore=shutil.ignore_patterns("*.py", "*.md"))
    before = {p: hashlib.sha256(p.read_bytes()).digest() for p in inbox.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    plain = run_batch([inbox], BatchOptions(out=out, gradcam="none"), model=model)
    assert not list(out.glob("*.dcm")) and plain.meta["dicom_reports"] is False
    # asked later: every DICOM study gets its report, made from the PDF already there (not re-scored)
    summary = run_batch([inbox], BatchOptions(out=out, gradcam="none", dicom=True), model=model)
    assert summary.reused == 6
    reports = [r for r in summary.rows if r["kind"] == "study" and r["report"]]
    dicom_studies = [r for r in reports if r["patient_id"]]       # the JPEG study has no patient ID
    assert summary.meta["dicom_reports"] is True and len(dicom_studies) == 5 and len(reports) == 6
    for row in dicom_studies:
        ds = pydicom.dcmread(out / Path(row["report"]).with_suffix(".dcm"))
        assert ds.StudyInstanceUID == row["study_uid"] and ds.PatientID == row["patient_id"]
        assert ds.EncapsulatedDocument[:ds.EncapsulatedDocumentLength] == (out / row["report"]).read_bytes()
    assert len(list(out.glob("*.dcm"))) == 5                     # the JPEG study has none
    # all there: nothing written; a removed .dcm is written again, from its PDF
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.dcm")}
    assert run_batch([inbox], BatchOptions(out=out, gradcam="none", dicom=True), model=model).reused == 6
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.dcm")} == stamps
    gone = out / Path(dicom_studies[0]["report"]).with_suffix(".dcm")
    gone.unlink()
    rerun = run_batch([inbox], BatchOptions(out=out, gradcam="none", dicom=True), model=model)
    assert rerun.reused == 6 and gone.is_file()
    assert {p: hashlib.sha256(p.read_bytes()).digest() for p in inbox.rglob("*") if p.is_file()} == before


def test_both_commands_take_dicom(tmp_path, write_dicom):
    from click.testing import CliRunner

    from cxrscreen.cli import main

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_dicom(phantom(96, 96), name="inbox/one.dcm")
    for command in (["batch", str(inbox), "--out", str(tmp_path / "b")],
                    ["watch", str(inbox), "--out", str(tmp_path / "w"), "--once", "--settle", "0"]):
        result = CliRunner().invoke(main, [*command, "--dicom", "--gradcam", "none"])
        assert result.exit_code == 0, result.output
        (dcm,) = (tmp_path / command[3]).glob("*.dcm")
        assert pydicom.dcmread(dcm).Modality == "DOC"


def test_a_value_too_long_for_its_vr_is_copied_and_logged_once_naming_the_report(tmp_path, write_dicom,
                                                                                  caplog, recwarn):
    """The report copies the images' identity as they have it, an over-long value too (a PACS files it by
    these strings). pydicom warns of each such value as it is set: that came out as anonymous Python
    warnings on stderr, one per report at best; now one log line names the report."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # writing the test image warns too
        path = write_dicom(phantom(64, 64), name="long.dcm", patient_id="P" * 300)
        images = _images(path)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4 report")
    with caplog.at_level("WARNING", logger="cxrscreen.encapsulate"):
        written = write_encapsulated_pdf(tmp_path / "report.dcm", pdf, images)
    assert [str(w.message) for w in recwarn] == []
    lines = [r.getMessage() for r in caplog.records if r.name == "cxrscreen.encapsulate"]
    assert lines == [f"{written}: written with 1 warning: The value length (300) exceeds the maximum length of 64 "
                     "allowed for VR LO. (values copied from the images as they are)"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # pydicom warns as it reads the value back
        assert pydicom.dcmread(written).PatientID == "P" * 300
