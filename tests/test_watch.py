"""`cxrscreen watch` with a real watchdog observer on temporary inboxes, and the bundled model.

Waits are bounded (a generous deadline, then the test fails); nothing asserts on timing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import latin1_named, pdf_text, phantom
from cxrscreen import pipeline as pipeline_module
from cxrscreen import watch as watch_module
from cxrscreen.cli import main
from cxrscreen.errors import UsageError
from cxrscreen.testing import make_dicom, save
from cxrscreen.watch import STATE_FILE, Watcher, WatchOptions, health, kv, move_file

DEADLINE = 180.0


def write_study(folder: Path, study: str, images: int = 1, *, start: int = 0, rows: int = 96) -> list[Path]:
    """``images`` DICOM files of one study (same StudyInstanceUID), each with its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    return [save(make_dicom(phantom(rows, rows), seed=f"{study}/{i}", study_seed=study, patient_id=study.upper()),
                 folder / f"{study}_{i:03d}.dcm") for i in range(start, start + images)]


def dicom_bytes(tmp_path: Path, study: str, index: int = 0, rows: int = 96) -> bytes:
    scratch = tmp_path / "scratch"
    path = write_study(scratch, study, 1, start=index, rows=rows)[0]
    data = path.read_bytes()
    path.unlink()
    return data


def deliver(tmp_path: Path, folder: Path, study: str, images: int = 1, *, start: int = 0, rows: int = 96,
            cut: int = 0) -> list[Path]:
    """Like write_study, into a folder a running daemon watches: each file lands in one write() call, so no
    file is ever seen half-written, whatever the load (slow copies have their own test). ``cut`` drops that
    many bytes from the end of the last file (a truncated transfer)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + images):
        data = dicom_bytes(tmp_path, study, i, rows)
        if cut and i == start + images - 1:
            data = data[:-cut]
        path = folder / f"{study}_{i:03d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def wait_for(condition, what: str, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {deadline:.0f}s waiting for {what}")


def ledger_rows(out: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(out / STATE_FILE)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def ledger_tables(out: Path) -> list[str]:
    return sorted(name for (name,) in ledger_rows(out, "SELECT name FROM sqlite_master WHERE type = 'table'"))


def done_studies(out: Path) -> int:
    # the daemon thread makes the file (WAL mode) a moment before the transaction that creates its tables
    if not (out / STATE_FILE).exists() or "studies" not in ledger_tables(out):
        return 0
    return ledger_rows(out, "SELECT COUNT(*) FROM studies WHERE status = 'done'")[0][0]


def reports(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.pdf") if p.name != "worklist.pdf")


class Running:
    """A Watcher in a thread of this process (the observer is real; the model is loaded once per module)."""

    def __init__(self, options: WatchOptions, model) -> None:
        self.stop = threading.Event()
        self.watcher = Watcher(options, model=model, stop=self.stop)
        self.code = None
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.code = self.watcher.run()
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    def close(self):
        self.stop.set()
        self.thread.join(timeout=DEADLINE)
        assert not self.thread.is_alive(), "the watcher did not stop"
        if self.error:
            raise self.error
        return self.code


@pytest.fixture
def dirs(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    return inbox, out


def test_slow_copy_and_part_rename_are_never_read_early(dirs, model, tmp_path, monkeypatch):
    inbox, out = dirs
    reads: list[tuple[str, int]] = []
    real_read = watch_module.read_record

    def spy(path, *args, **kwargs):
        reads.append((Path(path).name, Path(path).stat().st_size))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(watch_module, "read_record", spy)
    slow = dicom_bytes(tmp_path, "slowcopy", rows=256)
    renamed = dicom_bytes(tmp_path, "partrename", rows=256)
    running = Running(WatchOptions(inbox, out, settle=1.0, rescan=0.5, gradcam="none"), model)
    try:
        (inbox / "sub").mkdir()
        target = inbox / "sub" / "slow.dcm"
        chunks = [slow[i:i + len(slow) // 8 + 1] for i in range(0, len(slow), len(slow) // 8 + 1)]
        with open(target, "wb") as handle:           # 8 chunks, 0.4 s apart: longer than settle in all
            for chunk in chunks:
                handle.write(chunk)
                handle.flush()
                time.sleep(0.4)
        part = inbox / "sub" / "renamed.dcm.part"     # written as .part with a pause longer than settle
        with open(part, "wb") as handle:
            handle.write(renamed[: len(renamed) // 2])
            handle.flush()
            time.sleep(1.5)
            handle.write(renamed[len(renamed) // 2:])
        part.rename(inbox / "sub" / "renamed.dcm")
        wait_for(lambda: done_studies(out) == 2, "both studies to be reported")
    finally:
        running.close()
    assert reads, "the files were never read"
    assert all(size == (len(slow) if name == "slow.dcm" else len(renamed)) for name, size in reads), reads
    assert not any(name.endswith(".part") for name, _ in reads)
    assert len(reports(out)) == 2
    assert ledger_rows(out, "SELECT status, size FROM files ORDER BY inbox_path") == [
        ("scored", len(renamed)), ("scored", len(slow))]


def test_a_burst_of_300_files_in_30_studies_is_fully_processed(dirs, model, tmp_path):
    inbox, out = dirs
    # the bytes are made first, so the burst itself is 300 plain writes in a tight loop: a study's files must
    # not be further apart than --settle, or the daemon rightly reports the study before its last files
    burst = {inbox / f"study{s:02d}" / f"burst{s:02d}_{i:03d}.dcm": dicom_bytes(tmp_path, f"burst{s:02d}", i, 64)
             for s in range(30) for i in range(10)}
    running = Running(WatchOptions(inbox, out, settle=1.0, rescan=1.0, gradcam="none", batch_size=32), model)
    try:
        for path, data in burst.items():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        wait_for(lambda: done_studies(out) == 30, "30 studies to be reported")
        # and the worklist/summary catch up once the daemon is idle
        wait_for(lambda: (out / "summary.csv").exists() and
                 sum(1 for line in (out / "summary.csv").read_text().splitlines() if ",study," in line) == 30,
                 "the summary to list 30 studies")
    finally:
        running.close()
    assert len(reports(out)) == 30
    assert ledger_rows(out, "SELECT status, COUNT(*) FROM files GROUP BY status") == [("scored", 300)]
    assert ledger_rows(out, "SELECT COUNT(*), COUNT(DISTINCT study_uid), MAX(version) FROM reports") == [(30, 30, 1)]
    assert ledger_rows(out, "SELECT MIN(images), MAX(images) FROM reports") == [(10, 10)]


def test_a_burst_is_screened_round_after_round_without_the_idle_poll_between(dirs, model):
    """The loop's poll (0.25 s) is how often an idle daemon looks again. After each round (at most
    max_images images) it also waited a poll before the next, which a burst paid at every round."""
    inbox, out = dirs
    for s in range(3):
        write_study(inbox / f"s{s}", f"round{s}", images=2)
    steps: list[str] = []

    class Recording(threading.Event):
        def wait(self, timeout=None):       # never sleeps: the order of the steps is what is checked
            steps.append("wait")
            return self.is_set()

    watcher = Watcher(WatchOptions(inbox, out, settle=0.0, rescan=3600.0, gradcam="none", once=True,
                                   max_images=2, poll=3600.0), model=model, stop=Recording())
    screen_ready = watcher._screen_ready

    def recorded():
        screened = screen_ready()
        steps.append("round" if screened else "idle")
        return screened

    watcher._screen_ready = recorded
    assert watcher.run() == 0
    assert steps.count("round") == 3 and done_studies(out) == 3
    assert "round,wait" not in ",".join(steps), steps


def test_watchdog_walking_a_watched_folder_again_warns_of_nothing(dirs, model, recwarn):
    """watchdog re-walks a folder it watches (a folder created while its parent is walked, an event queue
    overflow) and warned "Callback with id ... already exists for watch ... It will be Overwritten" for each
    folder, a RuntimeWarning naming no file that the 300-file burst test met now and then and a daemon wrote to
    its journal. The watches are the same after it; the warning is not shown."""
    inbox, out = dirs
    (inbox / "study1" / "series1").mkdir(parents=True)
    watcher = Watcher(WatchOptions(inbox, out, settle=0.0, rescan=3600.0, gradcam="none", once=True), model=model)
    observer = watcher._start_observer()
    try:
        emitter = next(iter(observer.emitters))
        group = emitter._inotify                        # watchdog's InotifyWatchGroup for the inbox
        watched = dict(group._active_callbacks_by_path)
        assert len(watched) == 3
        group._add_all_callbacks(os.fsencode(inbox))    # what it does on a queue overflow
        assert group._active_callbacks_by_path == watched
    finally:
        observer.stop()
        observer.join()
    assert not [w for w in recwarn.list if "already exists for watch" in str(w.message)]
    # a second start (a daemon's observer restarted, a test's next Watcher) adds no second logging filter
    observer = watcher._start_observer()
    observer.stop()
    observer.join()
    assert len(logging.getLogger("watchdog.observers.inotify").filters) == 1


def test_an_amended_study_gets_a_second_version_and_keeps_the_first(dirs, model, tmp_path):
    inbox, out = dirs
    archive = tmp_path / "archive"
    running = Running(WatchOptions(inbox, out, archive=archive, settle=0.5, rescan=0.5, gradcam="all"), model)
    try:
        deliver(tmp_path, inbox / "a", "amended", images=1)
        first = wait_for(lambda: reports(out), "the first report")
        wait_for(lambda: (archive / "a" / "amended_000.dcm").exists(), "the first image to be archived")
        deliver(tmp_path, inbox / "a", "amended", images=1, start=1)     # a late image of the same study
        wait_for(lambda: len(reports(out)) == 2, "the amended report")
        wait_for(lambda: (archive / "a" / "amended_001.dcm").exists(), "the late image to be archived")
    finally:
        running.close()
    v1, v2 = first[0], next(p for p in reports(out) if p != first[0])
    assert v2.name == v1.stem + ".v2.pdf" and v1.exists()
    text = pdf_text(v2)
    assert "Amended report, version 2" in text and "amended_001.dcm" in text
    assert "maximum over 2" in text       # the archived first image is screened again with the new one
    assert ledger_rows(out, "SELECT version, images FROM reports ORDER BY version") == [(1, 1), (2, 2)]
    assert not list(inbox.rglob("*.dcm"))


def test_a_presentation_state_is_applied_with_its_study_or_amends_its_report_when_it_comes_later(
        dirs, model, tmp_path, caplog):
    """An image stored on its side (no Patient Orientation) that its presentation state shows upright is scored
    upright: with the image (one report), or arriving after the report (a second version, saying why). A newer
    one that shows it as stored amends the report again; one that shows it as the last did (a copy, or a newer
    one that only changes the window) does not."""
    import numpy as np
    import pydicom

    from cxrscreen.testing import make_presentation_state

    inbox, out = dirs
    archive, scratch = tmp_path / "archive", tmp_path / "scratch"

    def sideways(study: str) -> Path:
        return save(make_dicom(np.ascontiguousarray(np.rot90(phantom(96, 96), 1)), seed=f"{study}/0",
                               study_seed=study, patient_id=study.upper()), scratch / f"{study}.dcm")

    def presentation(image: Path, name: str = "ps", rotation: int = 90, created: str = "20261101120000") -> bytes:
        return save(make_presentation_state([pydicom.dcmread(image)], seed=f"{image.stem}/{name}", rotation=rotation,
                                            created=created), scratch / f"{image.stem}_{name}.dcm").read_bytes()

    together, later = sideways("together"), sideways("later")
    caplog.set_level("INFO", logger="cxrscreen.watch")
    running = Running(WatchOptions(inbox, out, archive=archive, settle=0.5, rescan=0.5, gradcam="none"), model)
    try:
        write_study(inbox / "upright", "upright")
        (inbox / "t").mkdir()
        (inbox / "t" / "ps.dcm").write_bytes(presentation(together))
        (inbox / "t" / "image.dcm").write_bytes(together.read_bytes())
        (inbox / "l").mkdir()
        (inbox / "l" / "image.dcm").write_bytes(later.read_bytes())
        wait_for(lambda: done_studies(out) == 3, "three reports")
        (inbox / "l" / "ps.dcm").write_bytes(presentation(later))
        wait_for(lambda: len(reports(out)) == 4, "the amended report")
        wait_for(lambda: (archive / "l" / "ps.dcm").exists(), "the presentation state to be archived")
        (inbox / "l" / "ps_resent.dcm").write_bytes(presentation(later))     # the same one again: no v3
        wait_for(lambda: (archive / "l" / "ps_resent.dcm").exists(), "the copy to be archived")
        (inbox / "l" / "stored.dcm").write_bytes(presentation(later, "stored", 0, "20261102120000"))
        wait_for(lambda: len(reports(out)) == 5, "the report of the image shown as stored again")
        wait_for(lambda: (archive / "l" / "stored.dcm").exists(), "the newer presentation state to be archived")
        (inbox / "l" / "window.dcm").write_bytes(presentation(later, "window", 0, "20261103120000"))    # no v4
        wait_for(lambda: (archive / "l" / "window.dcm").exists(), "the window-only presentation state to be archived")
        write_study(inbox / "s", "sentinel")
        wait_for(lambda: done_studies(out) == 4, "the study sent after the copy")
    finally:
        running.close()
    scores = dict(ledger_rows(out, "SELECT patient_id, score FROM studies"))
    assert scores["TOGETHER"] == pytest.approx(scores["UPRIGHT"], abs=1e-6)
    versions = ledger_rows(out, "SELECT s.patient_id, r.version, r.score FROM reports r JOIN studies s "
                                "USING (study_uid) ORDER BY s.patient_id, r.version")
    assert [(p, v) for p, v, _ in versions] == [("LATER", 1), ("LATER", 2), ("LATER", 3), ("SENTINEL", 1),
                                                 ("TOGETHER", 1), ("UPRIGHT", 1)]
    assert versions[0][2] != pytest.approx(versions[1][2], abs=1e-3)      # v1 scored it on its side, v2 upright
    assert versions[2][2] == pytest.approx(versions[0][2], abs=1e-6)      # v3 as stored, as v1
    assert versions[1][2] == pytest.approx(scores["UPRIGHT"], abs=1e-6)
    amended = " ".join(pdf_text(next(p for p in reports(out) if p.name.endswith(".v2.pdf"))).split())
    assert "Images added since: none. Presentation states and rejection notes added since: ps.dcm." in amended
    assert "Shown as its presentation state ps.dcm of 2026-11-01 12:00 shows it: turned 90 degrees clockwise" in amended
    third = " ".join(pdf_text(next(p for p in reports(out) if p.name.endswith(".v3.pdf"))).split())
    assert "Presentation states and rejection notes added since: ps_resent.dcm, stored.dcm." in third
    assert "Shown as its presentation state" not in third
    assert "event=study_reopened" in caplog.text


def test_a_rejection_note_withdraws_its_images_before_or_after_their_report(dirs, model, tmp_path, caplog):
    """A rejection note (IHE IOCM) that comes with its study keeps the images it names from being scored (a study
    left with none is a study of skipped files, not a failure); one that comes after the report amends it
    without them, and when none is left, the study's row says its report no longer stands."""
    import pydicom

    from cxrscreen.testing import make_key_object_selection

    inbox, out = dirs
    archive, scratch = tmp_path / "archive", tmp_path / "scratch"
    caplog.set_level("INFO", logger="cxrscreen.watch")

    def note(name: str, images: list[Path], code: str = "113001") -> bytes:
        return save(make_key_object_selection([pydicom.dcmread(p) for p in images], seed=name, code=code),
                    scratch / f"{name}.dcm").read_bytes()

    two = write_study(scratch / "two", "two", 2)
    wrong = write_study(scratch / "wrong", "wrong", 1)
    alone = write_study(scratch / "alone", "alone", 1)
    running = Running(WatchOptions(inbox, out, archive=archive, settle=0.5, rescan=0.5, gradcam="none"), model)
    try:
        (inbox / "w").mkdir()
        (inbox / "w" / "KO.dcm").write_bytes(note("mwl", wrong, "113038"))
        (inbox / "w" / "image.dcm").write_bytes(wrong[0].read_bytes())
        for folder, files in (("t", two), ("a", alone)):
            (inbox / folder).mkdir()
            for path in files:
                (inbox / folder / path.name).write_bytes(path.read_bytes())
        wait_for(lambda: len(reports(out)) == 2, "the reports of the two studies not withdrawn")
        (inbox / "t" / "KO.dcm").write_bytes(note("retake", two[:1]))
        (inbox / "a" / "KO.dcm").write_bytes(note("all", alone))
        wait_for(lambda: len(reports(out)) == 3, "the amended report without the rejected image")
        wait_for(lambda: "event=study_withdrawn" in caplog.text, "the study whose only image was rejected")
        wait_for(lambda: not list(inbox.rglob("*.dcm")), "every file to be archived")
        wait_for(lambda: listed_in(out, "ALONE").get("status") == "skipped", "the withdrawn study's row")
        summary = summary_studies(out)
        withdrawn_on_worklist = wait_for(lambda: worklist_saying(out, "no longer stands"), "the worklist to say so")
        assert ledger_rows(out, "SELECT status, score, flag FROM studies WHERE patient_id = 'ALONE'") == \
            [("done", None, "")]
        assert health(out)["studies"] == {"done": 3, "reported": 1, "not_screened": 2, "pending": 0, "failed": 0}
        (inbox / "a" / "KO2.dcm").write_bytes(note("again", alone))       # nothing left to withdraw: not reopened
        wait_for(lambda: (archive / "a" / "KO2.dcm").exists(), "the second note to be archived")
        assert caplog.text.count("event=study_withdrawn") == 2 and caplog.text.count("event=study_reopened") == 2
        retake = write_study(scratch / "retake", "alone", 1, start=1)[0]      # the retake of the rejected image
        (inbox / "a" / retake.name).write_bytes(retake.read_bytes())
        wait_for(lambda: listed_in(out, "ALONE").get("version") == 2, "the retake's report")
    finally:
        running.close()
    versions = ledger_rows(out, "SELECT s.patient_id, r.version, r.images FROM reports r JOIN studies s "
                                "USING (study_uid) ORDER BY s.patient_id, r.version")
    assert versions == [("ALONE", 1, 1), ("ALONE", 2, 1), ("TWO", 1, 2), ("TWO", 2, 1)]
    retaken = listed_in(out, "ALONE")       # reported again: scored, flagged by its own score
    (score,), = ledger_rows(out, "SELECT score FROM reports WHERE version = 2 AND images = 1 AND study_uid = "
                                 "(SELECT study_uid FROM studies WHERE patient_id = 'ALONE')")
    assert (retaken["status"], retaken["score"], retaken["flag"], retaken["reason"]) == \
        ("scored", round(score, 6), "yes" if score >= running.watcher.threshold else "no", "")
    amended = " ".join(pdf_text(out / ledger_rows(out, "SELECT report FROM studies WHERE patient_id = 'TWO'")[0][0])
                       .split())
    assert "Images added since: none. Presentation states and rejection notes added since: KO.dcm." in amended
    assert "two_000.dcm: skipped - rejected by the rejection note KO.dcm (Rejected for Quality Reasons)" in amended
    assert summary["WRONG"]["status"] == "skipped" and "Incorrect Modality Worklist Entry" in summary["WRONG"]["reason"]
    alone = summary["ALONE"]     # no longer flagged, nor ranked by the score of a report that no longer stands
    assert (alone["status"], alone["flag"], alone["score"], alone["report"], alone["version"]) == \
        ("skipped", "no", "", "", 1)
    assert "its report version 1" in alone["reason"] and "no longer stands" in alone["reason"]
    assert alone["withdrawn_report"].startswith("ALONE_") and alone["withdrawn_report"].endswith(".pdf")
    assert f"its earlier report {alone['withdrawn_report']} no longer stands" in withdrawn_on_worklist
    assert ledger_rows(out, "SELECT status, tag FROM files WHERE inbox_path LIKE '%/w/image.dcm'") == [
        ("skipped", "(0008,0018) SOPInstanceUID")]


def test_a_withdrawn_studys_dicom_reports_get_a_rejection_note_and_a_start_writes_one_missing(
        dirs, model, tmp_path, caplog):
    """With --dicom, a study reported twice (an image came later: v2) whose every image is then withdrawn (for the
    patient's safety): both .dcm reports, sent to the PACS, are withdrawn there by one rejection note of
    cxrscreen's own, with the images' reason, which the worklist names. A start with --dicom writes the note a
    withdrawn study lacks (withdrawn by 0.3.5, or by a start without --dicom)."""
    import pydicom

    from cxrscreen.testing import make_key_object_selection

    inbox, out = dirs
    archive, scratch = tmp_path / "archive", tmp_path / "scratch"
    caplog.set_level("INFO", logger="cxrscreen.watch")
    images = write_study(scratch, "later", 2)
    options = WatchOptions(inbox, out, archive=archive, settle=0.3, rescan=0.5, gradcam="none", dicom=True)
    running = Running(options, model)
    try:
        (inbox / images[0].name).write_bytes(images[0].read_bytes())
        wait_for(lambda: len(reports(out)) == 1, "the first report")
        (inbox / images[1].name).write_bytes(images[1].read_bytes())
        wait_for(lambda: len(reports(out)) == 2, "the amended report")
        note = make_key_object_selection([pydicom.dcmread(p) for p in images], seed="unsafe", code="113037",
                                         meaning="Rejected for Patient Safety Reasons")
        save(note, inbox / "KO.dcm")
        wait_for(lambda: "event=rejection_note " in caplog.text, "the rejection note of the reports")
        worklist = wait_for(lambda: worklist_saying(out, "withdrawn on the PACS by"), "the worklist to name it")
    finally:
        running.close()
    sent = sorted(out.glob("LATER_*.dcm"))
    (written,) = [p for p in sent if p.name.endswith(".rejection.dcm")]
    sent.remove(written)
    assert [p.name.endswith(".v2.dcm") for p in sent] == [False, True]
    ours = pydicom.dcmread(written)
    assert ours.ConceptNameCodeSequence[0].CodeValue == "113037"
    referenced = ours.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in referenced} == {pydicom.dcmread(p).SOPInstanceUID for p in sent}
    assert listed_in(out, "LATER")["rejection_note"] == written.name and f"withdrawn on the PACS by {written.name}" \
        in worklist

    from cxrscreen.ledger import Ledger

    ledger = Ledger(out / STATE_FILE)               # the database finds the studies StudyRow calls withdrawn
    try:
        assert [s.study_uid for s in ledger.withdrawn_studies()] == [s.study_uid for s in ledger.studies()
                                                                      if s.withdrawn] == [ours.StudyInstanceUID]
    finally:
        ledger.close()
    written.unlink()                                # as a withdrawal by 0.3.5 left it
    for dicom, expected in ((False, False), (True, True)):
        starts = caplog.text.count("event=start ")
        running = Running(WatchOptions(inbox, out, archive=archive, settle=0.3, rescan=0.5, gradcam="none",
                                       dicom=dicom), model)
        try:
            wait_for(lambda: caplog.text.count("event=start ") > starts, "the start")     # after the back-fills
        finally:
            running.close()
        assert written.exists() is expected and running.watcher.reports_written == 0
    assert pydicom.dcmread(written).SOPInstanceUID == ours.SOPInstanceUID     # the same note as before


def test_corrupt_and_truncated_files_land_in_quarantine_with_their_reason(dirs, model, tmp_path):
    inbox, out = dirs
    quarantine = tmp_path / "quarantine"
    running = Running(WatchOptions(inbox, out, quarantine=quarantine, settle=0.3, rescan=0.5, gradcam="none"),
                      model)
    try:
        (inbox / "junk").mkdir()
        (inbox / "junk" / "corrupt.dcm").write_bytes(b"DICM" * 10)
        good, truncated = deliver(tmp_path, inbox / "mixed", "mixed", images=2, rows=128,
                                  cut=4000)                    # header intact, pixel data cut short
        wait_for(lambda: (quarantine / "junk" / "corrupt.dcm.reason.txt").exists(), "the corrupt file's reason")
        wait_for(lambda: done_studies(out) == 1, "the study with one good image")
        wait_for(lambda: (quarantine / "mixed" / truncated.name).exists(), "the truncated file in quarantine")
    finally:
        running.close()
    assert (quarantine / "junk" / "corrupt.dcm").read_bytes() == b"DICM" * 10
    reason = (quarantine / "junk" / "corrupt.dcm.reason.txt").read_text()
    assert "status: failed" in reason and "reason: " in reason and str(inbox / "junk" / "corrupt.dcm") in reason
    truncated_reason = (quarantine / "mixed" / f"{truncated.name}.reason.txt").read_text()
    assert "step: decode" in truncated_reason or "trunc" in truncated_reason.lower()
    assert good.exists() and not (inbox / "junk" / "corrupt.dcm").exists() and not truncated.exists()
    assert running.watcher.failed_files == 2


def _daemon_command(inbox: Path, out: Path) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "cxrscreen", "watch", str(inbox), "--out", str(out), "--settle", "0.3",
               "--rescan", "0.5", "--batch-size", "2"]
    return command, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def start_daemon(inbox: Path, out: Path) -> subprocess.Popen:
    """`cxrscreen watch` as a real process (stderr piped: the log lines)."""
    command, env = _daemon_command(inbox, out)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_first_report(daemon: subprocess.Popen, out: Path) -> None:
    """Until the daemon has written a report (it must still be running then: mid-run)."""
    wait_for(lambda: reports(out) or daemon.poll() is not None, "the first report")
    assert daemon.poll() is None, daemon.stderr.read()


def finish_once(inbox: Path, out: Path) -> subprocess.CompletedProcess:
    """A restart with --once: handle whatever is left, then exit."""
    command, env = _daemon_command(inbox, out)
    return subprocess.run(command + ["--once"], env=env, capture_output=True, text=True, timeout=600)


def test_kill_9_mid_run_then_restart_reports_every_study_exactly_once(dirs):
    inbox, out = dirs
    for s in range(12):
        write_study(inbox / f"s{s:02d}", f"killed{s:02d}", images=2)
    daemon = start_daemon(inbox, out)
    try:
        wait_for_first_report(daemon, out)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=60)
    assert done_studies(out) < 12, "the daemon finished before it could be killed mid-run"
    finished = finish_once(inbox, out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert done_studies(out) == 12
    assert len(reports(out)) == 12 and not any(".v2" in p.name for p in reports(out))
    assert ledger_rows(out, "SELECT COUNT(*), COUNT(DISTINCT study_uid), MAX(version) FROM reports") == [(12, 12, 1)]
    assert not list(out.glob(".*.tmp"))


def test_sigterm_stops_cleanly_and_the_rest_is_resumed(dirs):
    inbox, out = dirs
    for s in range(6):
        write_study(inbox / f"s{s}", f"termed{s}", images=2)
    daemon = start_daemon(inbox, out)
    try:
        wait_for_first_report(daemon, out)
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, stderr[-3000:]
    assert "event=signal signal=SIGTERM" in stderr and 'event=stop reason=signal' in stderr
    finished = finish_once(inbox, out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert done_studies(out) == 6 and len(reports(out)) == 6


def test_identical_copy_is_skipped_and_files_already_there_are_processed(dirs, model):
    inbox, out = dirs
    original = write_study(inbox / "x", "dup", images=1)[0]
    (inbox / "y").mkdir()
    (inbox / "y" / "again.dcm").write_bytes(original.read_bytes())
    code = Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model).run()
    assert code == 0
    rows = ledger_rows(out, "SELECT inbox_path, status, reason FROM files ORDER BY inbox_path")
    assert rows[0][1] == "scored" and rows[1][1] == "skipped" and "identical copy of" in rows[1][2]
    assert len(reports(out)) == 1
    # a second --once run finds nothing new and writes nothing
    before = {p: p.stat().st_mtime_ns for p in reports(out)}
    assert Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model).run() == 0
    assert {p: p.stat().st_mtime_ns for p in reports(out)} == before


def test_files_on_a_share_are_read_and_hashed_in_threads_and_taken_in_order(dirs, model, monkeypatch):
    """An inbox on NFS or SMB: each settled file's header read and hash wait for round trips. Once they
    wait more than they compute, the next files are read ahead in threads; each is still taken (recorded,
    checked against the files taken before it) in order, here, so an identical copy is still found."""
    inbox, out = dirs
    for study in range(6):
        write_study(inbox / f"s{study}", f"share{study}", images=4)
    (inbox / "s9").mkdir()
    (inbox / "s9" / "copy.dcm").write_bytes((inbox / "s0" / "share0_000.dcm").read_bytes())
    taken_in, read_record = [], watch_module.read_record

    def slow_read(path, *args):
        time.sleep(0.01)          # round trips
        taken_in.append(threading.current_thread().name)
        return read_record(path, *args)

    monkeypatch.setattr(watch_module, "read_record", slow_read)
    code = Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model).run()
    assert code == 0
    rows = ledger_rows(out, "SELECT inbox_path, status, reason FROM files ORDER BY inbox_path")
    assert len(rows) == 25 and [r[1] for r in rows].count("scored") == 24
    assert rows[-1][0].endswith("copy.dcm") and rows[-1][1] == "skipped" and "identical copy of" in rows[-1][2]
    threads = [name for name in taken_in if name.startswith("cxr-take")]
    assert len(threads) >= 25 - 16 and len(set(threads)) > 1       # after the first 16 reads, several at a time
    assert done_studies(out) == 6 and len(reports(out)) == 6


def test_files_seen_on_a_share_are_stat_ed_in_threads_in_order(dirs, model, monkeypatch):
    """An inbox on NFS or SMB: every rescan stats every file in the inbox, and every poll every file waiting
    to settle, each a round trip. Once those stats wait more than they compute, the next are made ahead in
    threads; each file is still observed in order, and every study is taken and reported."""
    inbox, out = dirs
    for study in range(5):
        write_study(inbox / f"s{study}", f"stat{study}", images=4)
    stat_in, candidate_stat = [], watch_module._candidate_stat

    def slow_stat(path):
        time.sleep(0.005)          # a round trip
        stat_in.append(threading.current_thread().name)
        return candidate_stat(path)

    monkeypatch.setattr(watch_module, "_candidate_stat", slow_stat)
    code = Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model).run()
    assert code == 0 and done_studies(out) == 5 and len(reports(out)) == 5
    threads = [name for name in stat_in if name.startswith("cxr-stat")]
    assert len(stat_in) - len(threads) == 16 and len(set(threads)) > 1     # the probe, then several at a time
    assert ledger_rows(out, "SELECT COUNT(*) FROM files WHERE status = 'scored'") == [(20,)]


def one_image_study(inbox: Path, name: str, **header) -> Path:
    """A study of one image in ``inbox/name/name.dcm``, patient NAME, with these make_dicom header fields."""
    (inbox / name).mkdir()
    return save(make_dicom(phantom(96, 96), seed=f"{name}/0", study_seed=name, patient_id=name.upper(), **header),
                inbox / name / f"{name}.dcm")


def listed_in(out: Path, patient_id: str) -> dict:
    """The study row of summary.json of that patient, {} while there is none (or no summary yet)."""
    try:
        return summary_studies(out).get(patient_id, {})
    except (OSError, ValueError):
        return {}


def worklist_saying(out: Path, words: str) -> str:
    """The worklist's text (spaces normalised) once it says ``words``, else ''."""
    try:
        text = " ".join(pdf_text(out / "worklist.pdf").split())
    except Exception:       # not written yet, or being replaced
        return ""
    return text if words in text else ""


def summary_studies(out: Path) -> dict[str, dict]:
    """The study rows of summary.json by patient id."""
    return {r["patient_id"]: r for r in json.loads((out / "summary.json").read_text())["rows"] if r["kind"] == "study"}


def test_a_study_with_no_frontal_image_has_a_study_row_in_the_summary(dirs, model):
    inbox, out = dirs
    write_study(inbox / "front", "front", images=1)
    one_image_study(inbox, "side", view_position="LL")
    code = Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model).run()
    assert code == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    studies = {r["status"]: r for r in rows if r["kind"] == "study"}
    assert sorted(studies) == ["scored", "skipped"]
    side = studies["skipped"]
    assert side["rank"] == 2 and side["score"] == "" and not side["report"] and side["patient_id"] == "SIDE"
    assert "side.dcm: skipped, view 'LL'" in side["reason"]
    assert [r["study_uid"] for r in rows if r["kind"] == "file"] == [side["study_uid"]]
    # the patient's name, kept by the ledger for the scored study, the skipped one and its file alike
    assert {r["patient_name"] for r in rows} == {"SYNTHETIC^PATIENT"}
    assert pdf_text(out / "worklist.pdf").count("SYNTHETIC, PATIENT") == 2


def test_a_full_output_disk_is_logged_and_retried_and_never_stops_the_daemon(dirs, model, monkeypatch, caplog):
    """A summary that could not be written raised out of the daemon (systemd then restarted it into the
    same error); a report that could not be written already failed only its round. Both are logged now,
    the study stays pending, and the next start reports it."""
    inbox, out = dirs
    write_study(inbox / "a", "a")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "x"))

    monkeypatch.setattr(pipeline_module, "write_study_report", full)
    monkeypatch.setattr(watch_module, "write_summary", full)
    options = WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True)
    with caplog.at_level("INFO", logger="cxrscreen"):
        assert Watcher(options, model=model).run() == 1
    assert "event=round_failed" in caplog.text and "event=summary_failed" in caplog.text
    assert 'error="No space left on device"' in caplog.text
    assert not reports(out) and ledger_rows(out, "SELECT status FROM studies") == [("pending",)]
    monkeypatch.undo()
    assert Watcher(options, model=model).run() == 0
    assert len(reports(out)) == 1 and done_studies(out) == 1
    assert json.loads((out / "summary.json").read_text())["studies"]["done"] == 1


def test_a_full_ledger_disk_pauses_the_daemon_which_then_goes_on_and_loses_nothing(dirs, model, monkeypatch, caplog):
    """The ledger's disk filling up (SQLite's "database or disk is full", made here by a page limit) raised
    out of the daemon with a traceback. Now it pauses, then goes on as a restart would: every study once."""
    inbox, out = dirs
    for s in range(10):
        write_study(inbox / f"s{s}", f"full{s}", images=3)
    room = threading.Event()

    class FullLedger(watch_module.Ledger):
        def __init__(self, path):
            super().__init__(path)
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {pages}")

        def transaction(self):
            if room.is_set():
                self.db.execute("PRAGMA max_page_count = 1073741823")
            return super().transaction()

    monkeypatch.setattr(watch_module, "Ledger", FullLedger)
    monkeypatch.setattr(watch_module, "RETRY_SECONDS", 0.5)
    with caplog.at_level("INFO", logger="cxrscreen"):
        running = Running(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none"), model)
        try:
            wait_for(lambda: "event=paused" in caplog.text, "the daemon to pause")
            assert 'error="OperationalError: database or disk is full"' in caplog.text
            room.set()
            wait_for(lambda: done_studies(out) == 10, "10 studies to be reported")
        finally:
            assert running.close() == 0
    assert len(reports(out)) == 10
    assert ledger_rows(out, "SELECT status, COUNT(*) FROM files GROUP BY status") == [("scored", 30)]
    assert ledger_rows(out, "SELECT COUNT(*), COUNT(DISTINCT study_uid), MAX(version) FROM reports") == [(10, 10, 1)]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_and_a_dangling_link_in_the_inbox_are_listed_and_left_in_place(dirs, model, tmp_path):
    """The daemon ignored both without a word (batch listed them): a study file exported as a link to
    storage that is not mounted was missing from every list. Now both are in the ledger and the summary,
    neither is opened (a FIFO would block the daemon) nor moved, and the study beside them is reported."""
    inbox, out = dirs
    write_study(inbox / "a", "fifo")
    os.mkfifo(inbox / "a" / "pipe.dcm")
    (inbox / "a" / "IM0002.dcm").symlink_to("/mnt/offline-storage/IM0002.dcm")
    options = WatchOptions(inbox, out, archive=tmp_path / "archive", quarantine=tmp_path / "quarantine",
                           settle=0.2, rescan=0.5, gradcam="none", once=True)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", Watcher(options, model=model).run()),
                              daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the daemon blocked (on opening the FIFO?)"
    assert result["code"] == 1 and done_studies(out) == 1
    files = {Path(r["path"]).name: r for r in json.loads((out / "summary.json").read_text())["rows"]
             if r["kind"] == "file"}
    assert (files["pipe.dcm"]["status"], files["pipe.dcm"]["reason"]) == \
        ("skipped", "a FIFO (named pipe), not a regular file: not opened")
    assert (files["IM0002.dcm"]["status"], files["IM0002.dcm"]["reason"]) == \
        ("failed", "a symbolic link to /mnt/offline-storage/IM0002.dcm, which does not exist")
    assert (inbox / "a" / "pipe.dcm").exists() and (inbox / "a" / "IM0002.dcm").is_symlink()
    assert sorted(p.name for p in (tmp_path / "archive").rglob("*.dcm")) == ["fifo_000.dcm"]


def test_a_report_that_cannot_be_made_waits_alone_and_does_not_block_its_round(dirs, model, monkeypatch, caplog):
    """An exception while making one study's report failed the whole round, and the round was retried with
    that study in it: a study whose report always failed held back the studies screened with it."""
    inbox, out = dirs
    for name in ("poison", "good1", "good2"):
        write_study(inbox / name, name)
    broken = threading.Event()
    broken.set()
    real = pipeline_module.write_study_report

    def broken_for_one(path, result, **kwargs):
        if broken.is_set() and result.study.first.patient_id == "POISON":
            raise RuntimeError("no room for the overlay")
        return real(path, result, **kwargs)

    monkeypatch.setattr(pipeline_module, "write_study_report", broken_for_one)
    monkeypatch.setattr(watch_module, "RETRY_SECONDS", 0.3)
    with caplog.at_level("INFO", logger="cxrscreen"):
        running = Running(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none"), model)
        try:
            wait_for(lambda: done_studies(out) == 2, "the two other studies to be reported")
            wait_for(lambda: caplog.text.count("event=report_failed") >= 2, "the study to be tried again")
            assert 'error="RuntimeError: no room for the overlay"' in caplog.text and "tries=2" in caplog.text
            assert ledger_rows(out, "SELECT DISTINCT s.status FROM studies s JOIN files f USING (study_uid) "
                                    "WHERE f.patient_id = 'POISON'") == [("pending",)]
            # the summary and worklist list it, pending, with why (a study never reported was left out of them)
            wait_for(lambda: "no room for the overlay" in listed_in(out, "POISON").get("reason", ""),
                     "the summary to say so")
            poison = listed_in(out, "POISON")
            assert poison["status"] == "pending" and not poison["report"] and poison["score"] == ""
            assert poison["reason"].startswith("its report could not be made (RuntimeError: no room for the overlay;")
            assert len(poison["files"]) == 1 and poison["accession"]
            assert "pending" in pdf_text(out / "worklist.pdf")
            broken.clear()
            wait_for(lambda: done_studies(out) == 3, "the study to be reported once it can be")
        finally:
            running.close()
    assert ledger_rows(out, "SELECT COUNT(*), MAX(version) FROM reports") == [(3, 1)] and len(reports(out)) == 3


def test_a_linked_folder_is_screened_and_one_that_cannot_be_listed_is_logged_and_reported(
        dirs, model, tmp_path, monkeypatch, caplog):
    """The rescan passed over a link to a folder, and a folder it could not list, without a word: their
    studies never came, and nothing said why. Now a link is followed (its target walked once), and a folder
    that cannot be listed is logged when it becomes so and when it is readable again, not every rescan, and
    `cxrscreen status` names it while it lasts."""
    inbox, out = dirs
    write_study(tmp_path / "storage" / "s1", "linked")
    (inbox / "s1").symlink_to(tmp_path / "storage" / "s1", target_is_directory=True)
    (inbox / "loop").symlink_to(inbox, target_is_directory=True)
    write_study(inbox / "locked", "locked")
    scandir, refused = os.scandir, {str(inbox / "locked")}

    def refusing(path="."):
        if os.fsdecode(path) in refused:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    options = WatchOptions(inbox, out, settle=0.2, rescan=0.2, gradcam="none")
    with caplog.at_level("INFO", logger="cxrscreen"):
        running = Running(options, model)
        try:
            wait_for(lambda: done_studies(out) == 1, "the linked study to be reported")
            time.sleep(1.0)             # five rescans
            assert caplog.text.count("event=folder_unreadable") == 1
            assert f'path={inbox / "locked"} error="Permission denied"' in caplog.text
            state = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).stdout)
            assert state["unlistable_folders"] == [str(inbox / "locked")] and not state["healthy"]
            assert state["problems"] == [f"1 inbox folder(s) cannot be listed, their files not seen: {inbox / 'locked'}"]
            refused.clear()
            wait_for(lambda: done_studies(out) == 2, "the study to be reported once its folder can be listed")
            assert caplog.text.count("event=folder_readable") == 1
            state = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).stdout)
            assert state["healthy"] and state["unlistable_folders"] == []
        finally:
            running.close()
    assert sorted(r["patient_id"] for r in json.loads((out / "summary.json").read_text())["rows"]
                  if r["kind"] == "study") == ["LINKED", "LOCKED"]


def test_a_transfer_left_under_a_temporary_name_is_logged_once_and_never_read(dirs, model, caplog):
    """A *.part file that was never renamed (the sender failed) was ignored without a word, and its study
    screened without that image: now the log says so, once, when it has not changed for an hour."""
    inbox, out = dirs
    write_study(inbox / "a", "partial", images=2)
    stalled, fresh = inbox / "a" / "partial_002.dcm.part", inbox / "a" / "partial_003.dcm.part"
    stalled.write_bytes((inbox / "a" / "partial_000.dcm").read_bytes()[:2000])
    fresh.write_bytes(b"half a transfer")
    two_hours_ago = time.time() - 2 * watch_module.STALLED_TRANSFER_AGE
    os.utime(stalled, (two_hours_ago, two_hours_ago))
    with caplog.at_level("INFO", logger="cxrscreen"):
        assert Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.1, gradcam="none", once=True),
                       model=model).run() == 0
    assert caplog.text.count("event=transfer_stalled") == 1
    assert f"event=transfer_stalled path={stalled} age_min=120 " in caplog.text
    assert done_studies(out) == 1 and ledger_rows(out, "SELECT COUNT(*) FROM files") == [(2,)]


def test_remove_empty_folders_removes_only_folders_empty_and_unchanged_for_an_hour(dirs, model, tmp_path):
    """With --archive, a PACS that makes a folder per study left thousands of empty folders in the inbox,
    and every rescan walked them (on NFS, a round trip each)."""
    inbox, out = dirs
    write_study(inbox / "study", "tidy")
    hour_ago = time.time() - 2 * watch_module.EMPTY_FOLDER_AGE
    old, fresh, busy = inbox / "2026" / "old", inbox / "fresh", inbox / "busy"
    for folder in (old, fresh, busy):
        folder.mkdir(parents=True)
    (busy / "IM0001.dcm.part").write_bytes(b"half a transfer")     # a transfer in progress keeps its folder
    for folder in (old, busy):
        os.utime(folder, (hour_ago, hour_ago))
    options = dict(archive=tmp_path / "archive", settle=0.2, rescan=0.3, gradcam="none", once=True)
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    assert old.is_dir() and fresh.is_dir() and not (inbox / "study" / "tidy_000.dcm").exists()   # off by default
    assert Watcher(WatchOptions(inbox, out, remove_empty_folders=True, **options), model=model).run() == 0
    assert not old.exists() and fresh.is_dir() and busy.is_dir() and inbox.is_dir()
    assert (inbox / "study").is_dir()       # emptied by the archive just now: removed an hour later


def test_status_checks_a_daemon_from_its_ledger_for_monitoring(dirs, model):
    """A stopped daemon, or one that took a study and never screened it, was visible only by reading its
    log: `cxrscreen status OUT` says so from the ledger, and exits 1, for a monitoring system."""
    from cxrscreen.ledger import Ledger

    inbox, out = dirs
    save(make_dicom(phantom(96, 96), seed="hand", study_seed="hand", patient_id="HAND", body_part="HAND"),
         inbox / "h" / "hand.dcm")       # a study with nothing to screen, skipped as it came: no ledger row
    write_study(inbox / "a", "status")
    running = Running(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none"), model)
    try:
        wait_for(lambda: done_studies(out) == 1, "the study to be reported")
        wait_for(lambda: ledger_rows(out, "SELECT COUNT(*) FROM files WHERE status = 'skipped'")[0][0] == 1,
                 "the hand to be taken")
        result = CliRunner().invoke(main, ["status", str(out), "--json"])
        assert result.exit_code == 0, result.output
        state = json.loads(result.stdout)
        assert state["running"] and state["holder"].startswith(f"cxrscreen watch of {inbox} (pid ")
        assert state["studies"] == {"done": 2, "reported": 1, "not_screened": 1, "pending": 0, "failed": 0}
        assert state["last_report_at"] > 0
        assert state["healthy"] and state["problems"] == []
    finally:
        running.close()
    stopped = CliRunner().invoke(main, ["status", str(out)])
    assert stopped.exit_code == 1 and "daemon: NOT running" in stopped.output
    assert "ATTENTION: no watch daemon holds this ledger" in stopped.output
    assert "studies: 1 reported, 0 pending, 1 with no image to screen (skipped or withdrawn), 0 failed" in stopped.output
    ledger = Ledger(out / STATE_FILE)        # holds the ledger as a daemon does; a study taken two hours ago
    try:
        ledger.take_file(path=str(inbox / "late.dcm"), size=1, mtime_ns=1, sha256="0" * 64, study_uid="1.2.3",
                         status="pending", now=time.time() - 7200)
        late = CliRunner().invoke(main, ["status", str(out), "--json"])
    finally:
        ledger.close()
    assert late.exit_code == 1
    assert json.loads(late.stdout)["problems"] == ["a study has waited 120 min since its last file (limit 30)"]
    assert CliRunner().invoke(main, ["status", str(inbox)]).exit_code == 2     # no ledger there
    (inbox / STATE_FILE).write_text("not a ledger" * 100)                     # one it cannot read: exit 1, one line
    unreadable = CliRunner().invoke(main, ["status", str(inbox)])
    assert unreadable.exit_code == 1 and "[status]: cannot read the ledger: " in unreadable.output


def test_status_names_the_files_failed_lately_with_their_reasons(dirs):
    """`cxrscreen status` said only how many files failed in the last 24 hours: which, and why, took the log or
    the summary. It names the newest five (newest first), each with its step, tag and reason; older ones not."""
    from cxrscreen.ledger import Ledger

    inbox, out = dirs
    out.mkdir()
    now = time.time()
    ledger = Ledger(out / STATE_FILE)
    try:
        for i in range(7):
            ledger.take_file(path=str(inbox / f"f{i}.dcm"), size=1, mtime_ns=1, sha256=f"{i}" * 64, study_uid="",
                             status="failed", step="read", tag="(0028,0010) Rows" if i % 2 else "",
                             reason=f"reason {i}", now=now - 3600 * (7 - i))
        ledger.take_file(path=str(inbox / "old.dcm"), size=1, mtime_ns=1, sha256="a" * 64, study_uid="",
                         status="failed", step="read", reason="a day and more ago", now=now - 90000)
    finally:
        ledger.close()
    state = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).stdout)
    assert state["failed_files_24h"] == 7
    assert [f["path"] for f in state["failed_recently"]] == [str(inbox / f"f{i}.dcm") for i in (6, 5, 4, 3, 2)]
    assert state["failed_recently"][0] == {"path": str(inbox / "f6.dcm"), "step": "read", "tag": "",
                                           "reason": "reason 6"}
    text = CliRunner().invoke(main, ["status", str(out)]).output
    assert "files failed in the last 24 h: 7 (the newest 5)\n" f"  {inbox / 'f6.dcm'} [read]: reason 6\n" \
           f"  {inbox / 'f5.dcm'} [read (0028,0010) Rows]: reason 5\n" in text, text
    assert "f1.dcm" not in text and "old.dcm" not in text


def test_an_adult_study_is_reported_with_a_caution_that_the_ledger_keeps(dirs, model):
    inbox, out = dirs
    write_study(inbox / "child", "child", images=1)
    one_image_study(inbox, "adult", PatientAge="054Y")
    options = WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True)
    assert Watcher(options, model=model).run() == 0
    rows = summary_studies(out)
    assert rows["CHILD"]["warning"] == "" and rows["ADULT"]["status"] == "scored"
    assert rows["ADULT"]["warning"].startswith("patient aged 54 years, outside the model's training population")
    # the next run rewrites the summary from the ledger alone: the caution is still there
    (out / "summary.json").unlink()
    (inbox / "child" / "late.dcm").write_bytes((inbox / "child" / "child_000.dcm").read_bytes())
    assert Watcher(options, model=model).run() == 0
    again = summary_studies(out)
    assert again["ADULT"]["warning"].startswith("patient aged 54 years")
    # and so are the appearance distance and its caution (a phantom is not a radiograph: over the limit)
    for key in ("appearance", "appearance_caution"):
        assert again["ADULT"][key] == rows["ADULT"][key]
    assert rows["ADULT"]["appearance"] > model.appearance.limit
    assert "adult.dcm is unlike the model's training radiographs" in rows["ADULT"]["appearance_caution"]


def test_unscored_frames_of_a_multi_frame_image_are_in_the_summary_and_the_ledger_keeps_them(dirs, model):
    inbox, out = dirs
    write_study(inbox / "single", "single", images=1)
    one_image_study(inbox, "multi", more_frames=[phantom(96, 96)] * 3)
    options = WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True)
    assert Watcher(options, model=model).run() == 0
    rows = summary_studies(out)
    assert (rows["MULTI"]["unscored_frames"], rows["SINGLE"]["unscored_frames"]) == (3, 0)
    assert "3 frames of multi-frame images not scored" in pdf_text(out / "worklist.pdf")
    # the next run rewrites the summary from the ledger alone
    (out / "summary.json").unlink()
    (inbox / "single" / "late.dcm").write_bytes((inbox / "single" / "single_000.dcm").read_bytes())
    assert Watcher(options, model=model).run() == 0
    assert summary_studies(out)["MULTI"]["unscored_frames"] == 3


def test_dicom_reports_are_written_for_each_version_as_new_instances_of_one_series(dirs, model):
    import pydicom

    inbox, out = dirs
    first = write_study(inbox / "d", "dicomrep", images=1)
    options = WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", dicom=True, once=True)
    assert Watcher(options, model=model).run() == 0
    (v1,) = reports(out)
    write_study(inbox / "d", "dicomrep", images=1, start=1)             # a late image: version 2
    assert Watcher(options, model=model).run() == 0
    v2 = next(p for p in reports(out) if p != v1)
    one, two = (pydicom.dcmread(p.with_suffix(".dcm")) for p in (v1, v2))
    assert one.StudyInstanceUID == two.StudyInstanceUID == pydicom.dcmread(first[0]).StudyInstanceUID
    assert one.SeriesInstanceUID == two.SeriesInstanceUID and one.SOPInstanceUID != two.SOPInstanceUID
    assert (one.InstanceNumber, two.InstanceNumber, len(two.SourceInstanceSequence)) == (1, 2, 2)
    assert two.EncapsulatedDocument[:two.EncapsulatedDocumentLength] == v2.read_bytes()
    assert "amended (version 2)" in two.DocumentTitle


def test_dicom_reports_are_back_filled_once_for_studies_reported_before_dicom(dirs, model, tmp_path, caplog):
    """Turning --dicom on gave no .dcm to the studies the daemon had reported before: a site that chose
    to send reports to its PACS had a gap of every earlier study. Now the next start writes them, from the
    PDF and the archived images, once; a JPEG study has none to have, nor one whose every image was withdrawn
    since its report (its report no longer stands: it was tried at every start, and failed, for want of images)."""
    import cv2
    import pydicom

    from cxrscreen.testing import make_key_object_selection

    inbox, out = dirs
    (original,) = write_study(inbox / "d", "backfill")
    (withdrawn,) = write_study(inbox / "w", "withdrawn")
    cv2.imwrite(str(inbox / "export.jpg"), phantom(96, 96).astype("uint8"))
    options = dict(archive=tmp_path / "archive", settle=0.2, rescan=0.5, gradcam="none", once=True)
    sop = pydicom.dcmread(original).SOPInstanceUID
    note = make_key_object_selection([pydicom.dcmread(withdrawn)], seed="withdrawn")
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    assert len(reports(out)) == 3 and not list(out.glob("*.dcm")) and not original.exists()   # archived
    save(note, inbox / "w" / "KO.dcm")
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    assert ledger_rows(out, "SELECT score FROM studies WHERE patient_id = 'WITHDRAWN'") == [(None,)]
    with caplog.at_level("INFO", logger="cxrscreen"):
        assert Watcher(WatchOptions(inbox, out, dicom=True, **options), model=model).run() == 0
    (dcm,) = out.glob("*.dcm")
    report = pydicom.dcmread(dcm)
    assert report.EncapsulatedDocument[:report.EncapsulatedDocumentLength] == dcm.with_suffix(".pdf").read_bytes()
    assert [item.ReferencedSOPInstanceUID for item in report.SourceInstanceSequence] == [sop]
    assert "event=dicom_backfill studies=1" in caplog.text and "event=dicom_backfilled" in caplog.text
    written = dcm.stat().st_mtime_ns
    assert ledger_rows(out, "SELECT value FROM meta WHERE key = 'dicom_reports_complete'") == [("yes",)]
    # and once is once: later starts do not stat every study reported, ever (minutes on NFS for years of them)
    looked = []
    real_is_file = Path.is_file
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "is_file", lambda self: looked.append(self) or real_is_file(self))
        assert Watcher(WatchOptions(inbox, out, dicom=True, **options), model=model).run() == 0
    assert dcm.stat().st_mtime_ns == written and len(list(out.glob("*.dcm"))) == 1
    assert dcm.with_suffix(".pdf") not in looked
    # a start without --dicom reports without .dcm: the next start with it looks again, and fills the gap
    write_study(inbox / "e", "later")
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    assert ledger_rows(out, "SELECT value FROM meta WHERE key = 'dicom_reports_complete'") == [("no",)]
    assert len(list(out.glob("*.dcm"))) == 1
    assert Watcher(WatchOptions(inbox, out, dicom=True, **options), model=model).run() == 0
    assert len(list(out.glob("*.dcm"))) == 2 and dcm.stat().st_mtime_ns == written


def test_file_names_that_are_not_utf8_are_taken_reported_and_archived(dirs, model, tmp_path):
    """SQLite cannot store such a name as text: the daemon crashed on it, and again on every restart."""
    inbox, out = dirs
    archive = tmp_path / "archive"
    (inbox / "s").mkdir()
    image = latin1_named(inbox / "s", "Bild_ä.dcm", write_study(tmp_path / "src", "latin", images=1)[0].read_bytes())
    latin1_named(inbox / "s", "notes_ÿ.txt", b"not an image")
    options = WatchOptions(inbox, out, archive=archive, settle=0.2, rescan=0.5, gradcam="none", dicom=True, once=True)
    assert Watcher(options, model=model).run() == 0
    moved = Path(str(image).replace(str(inbox), str(archive)))
    assert moved.is_file() and not Path(image).exists() and len(list((archive / "s").iterdir())) == 2
    assert summary_studies(out)["LATIN"]["status"] == "scored"
    assert "notes_\\xff.txt" in pdf_text(out / "worklist.pdf")
    # the ledger gives the exact names back: a restart finds everything handled, and a late image amends
    write_study(inbox / "s", "latin", images=1, start=1)
    assert Watcher(options, model=model).run() == 0
    assert ledger_rows(out, "SELECT version, images FROM reports ORDER BY version") == [(1, 1), (2, 2)]
    assert "Bild_\\xe4.dcm" in pdf_text(next(out.glob("*.v2.pdf")))


def test_worklist_lists_recent_studies_and_the_ledger_keeps_all(dirs, model):
    inbox, out = dirs
    write_study(inbox / "old", "old", images=1)
    write_study(inbox / "new", "new", images=1)
    options = dict(settle=0.2, rescan=0.5, gradcam="none", once=True)
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    db = sqlite3.connect(out / STATE_FILE)
    with db:                                           # as if "old" had been reported ten days ago
        old = db.execute("SELECT study_uid FROM studies ORDER BY last_arrival LIMIT 1").fetchone()[0]
        db.execute("UPDATE studies SET updated = updated - 10 * 86400 WHERE study_uid = ?", (old,))
    db.close()
    write_study(inbox / "third", "third", images=1)    # something new, so the summary is rewritten
    assert Watcher(WatchOptions(inbox, out, worklist_days=7, **options), model=model).run() == 0
    summary = json.loads((out / "summary.json").read_text())
    listed = {row["study_uid"] for row in summary["rows"] if row["kind"] == "study"}
    assert len(listed) == 2 and old not in listed
    assert summary["studies"]["done"] == 3 and summary["worklist_days"] == 7
    write_study(inbox / "fourth", "fourth", images=1)
    assert Watcher(WatchOptions(inbox, out, worklist_days=0, **options), model=model).run() == 0
    summary = json.loads((out / "summary.json").read_text())
    assert old in {row["study_uid"] for row in summary["rows"] if row["kind"] == "study"}
    with pytest.raises(UsageError):
        WatchOptions(inbox, out, worklist_days=-1)


def test_files_skipped_before_are_screened_when_a_start_widens_the_selection(dirs, model, tmp_path, caplog):
    """A site sees its TORAX studies and its laterals skipped, and restarts watch with --chest-body-part TORAX
    and --include-lateral: the files skipped before, archived since, are read again and their studies reported
    (the study with a lateral amended); a start with the same options reads nothing again."""
    from cxrscreen.ingest import Selection

    inbox, out = dirs
    one_image_study(inbox, "torax", body_part="TORAX")
    (inbox / "pair").mkdir()
    for i, view in enumerate(("PA", "LL")):
        save(make_dicom(phantom(96, 96), seed=f"pair/{i}", study_seed="pair", patient_id="PAIR", view_position=view),
             inbox / "pair" / f"{i}.dcm")
    archive = tmp_path / "archive"
    options = dict(archive=archive, settle=0.2, rescan=0.5, gradcam="none", once=True)
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    assert {pid: r["status"] for pid, r in summary_studies(out).items()} == {"PAIR": "scored", "TORAX": "skipped"}
    assert not list(inbox.rglob("*.dcm")) and len(list(archive.rglob("*.dcm"))) == 3

    wider = Selection(include_lateral=True, chest_body_parts={"TORAX"})
    with caplog.at_level("INFO", logger="cxrscreen.watch"):
        assert Watcher(WatchOptions(inbox, out, selection=wider, **options), model=model).run() == 0
    assert "event=selection_widened files=2" in caplog.text
    assert "include_lateral=True chest_body_parts=TORAX" in caplog.text      # on the event=start line
    studies = summary_studies(out)
    assert {pid: (r["status"], len(r["files"])) for pid, r in studies.items()} == {"PAIR": ("scored", 2),
                                                                                   "TORAX": ("scored", 1)}
    versions = ledger_rows(out, "SELECT patient_id, version FROM studies ORDER BY patient_id")
    assert versions == [("PAIR", 2), ("TORAX", 1)]            # the pair amended, TORAX reported once
    assert ledger_rows(out, "SELECT count(*) FROM files WHERE status != 'scored'") == [(0,)]
    assert all(Path(r[0]).is_relative_to(archive) for r in ledger_rows(out, "SELECT location FROM files"))

    caplog.clear()
    with caplog.at_level("INFO", logger="cxrscreen.watch"):
        assert Watcher(WatchOptions(inbox, out, selection=wider, **options), model=model).run() == 0
    assert "file_retaken" not in caplog.text and len(reports(out)) == 3


def test_restart_with_archive_moves_handled_files_and_finishes_an_interrupted_move(dirs, model, tmp_path):
    inbox, out = dirs
    first, second = write_study(inbox / "s", "moved", images=2)
    options = dict(settle=0.2, rescan=0.5, gradcam="none", once=True)
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0
    assert first.exists() and second.exists()          # no --archive: left in place
    archive = tmp_path / "archive"
    planned = archive / "elsewhere" / "first.dcm"      # as if a crash hit between begin_move and the rename
    db = sqlite3.connect(out / STATE_FILE)
    with db:
        db.execute("UPDATE files SET move_to = ? WHERE location = ?", (str(planned), str(first)))
    db.close()
    assert Watcher(WatchOptions(inbox, out, archive=archive, **options), model=model).run() == 0
    assert planned.exists() and (archive / "s" / second.name).exists()
    assert not first.exists() and not second.exists()
    assert sorted(ledger_rows(out, "SELECT location FROM files")) == sorted(
        [(str(planned),), (str(archive / "s" / second.name),)])
    assert len(reports(out)) == 1


def test_a_start_keeps_in_memory_only_the_files_still_in_the_inbox(dirs, model, tmp_path):
    """What tells a rescan that a file is taken already: it held every file the ledger ever moved to the archive
    or the quarantine too (200,000 of a ledger of years: 49 MiB for the daemon's life), which no rescan sees."""
    inbox, out = dirs
    archive, quarantine = tmp_path / "archive", tmp_path / "quarantine"
    options = dict(settle=0.2, rescan=0.5, gradcam="none", once=True)
    write_study(inbox / "a", "archived")
    (inbox / "a" / "broken.dcm").write_bytes(dicom_bytes(tmp_path, "broken")[:-3000])
    assert Watcher(WatchOptions(inbox, out, archive=archive, quarantine=quarantine, **options), model=model).run() == 1
    kept = write_study(inbox / "b", "kept")[0]
    assert Watcher(WatchOptions(inbox, out, **options), model=model).run() == 0     # no --archive: left in place
    watcher = Watcher(WatchOptions(inbox, out, **options), model=model)
    assert watcher.run() == 0
    assert watcher.known == {str(kept): (kept.stat().st_size, kept.stat().st_mtime_ns)}
    assert len(reports(out)) == 2 and ledger_rows(out, "SELECT COUNT(*) FROM files") == [(3,)]
    assert sorted(p.name for p in (archive / "a").iterdir()) == ["archived_000.dcm"]
    assert sorted(p.name for p in (quarantine / "a").iterdir()) == ["broken.dcm", "broken.dcm.reason.txt"]


def test_while_studies_come_the_summary_is_rewritten_at_most_every_twenty_times_what_it_took(dirs, model):
    """Every 30 s whatever it cost: a window of 20,000 studies (--worklist-days) takes 12 s to write, 40% of a
    burst. Now at most 5% of it, as batch's checkpoints; once the inbox is quiet, at once."""
    inbox, out = dirs
    write_study(inbox / "s", "timed")
    watcher = Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model)
    assert watcher.run() == 0 and 0 < watcher._summary_cost < 60        # what the last rewrite took
    now = time.monotonic()
    watcher._summary_due, watcher._summary_at, watcher._summary_cost = True, now - 31, 0.5
    assert watcher._summary_wanted(busy=True)              # 30 s since the last
    watcher._summary_cost = 5.0
    assert not watcher._summary_wanted(busy=True)          # 100 s, not 30
    assert watcher._summary_wanted(busy=False)             # a burst over: at once
    watcher._summary_at = now - 101
    assert watcher._summary_wanted(busy=True)
    watcher._summary_due = False
    assert not watcher._summary_wanted(busy=False)         # nothing changed


def test_a_link_in_the_inbox_to_the_archive_or_quarantine_is_not_walked(dirs, model, tmp_path, caplog):
    """Through such a link each run took the files it had archived as new ones (identical copies, skipped) and
    moved them into the archive again, one folder deeper each time; a quarantined file was failed again, and
    its .reason.txt taken as input. Now such a link is not walked, and the log says so, once a run."""
    inbox, out = dirs
    archive, quarantine = tmp_path / "archive", tmp_path / "quarantine"
    archive.mkdir(), quarantine.mkdir()
    write_study(inbox / "s", "kept")
    (inbox / "s" / "broken.dcm").write_bytes(dicom_bytes(tmp_path, "broken")[:-3000])     # a truncated copy
    (inbox / "old").symlink_to(archive, target_is_directory=True)
    (inbox / "bad").symlink_to(quarantine, target_is_directory=True)
    (inbox / "reports").symlink_to(out, target_is_directory=True)
    (inbox / "s" / "done").symlink_to(archive, target_is_directory=True)       # a second link to the archive
    options = dict(archive=archive, quarantine=quarantine, settle=0.2, rescan=0.1, gradcam="none", once=True)
    with caplog.at_level("INFO", logger="cxrscreen"):
        runs = [Watcher(WatchOptions(inbox, out, **options), model=model).run() for _ in range(3)]
    assert runs == [1, 0, 0]        # the broken file, failed once
    files = sorted(str(p.relative_to(tmp_path)) for p in (archive, quarantine) for p in p.rglob("*") if p.is_file())
    assert files == ["archive/s/kept_000.dcm", "quarantine/s/broken.dcm", "quarantine/s/broken.dcm.reason.txt"]
    assert ledger_rows(out, "SELECT COUNT(*) FROM files") == [(2,)] and done_studies(out) == 1
    for link, folder in (("old", "--archive"), ("bad", "--quarantine"), ("reports", "--out"), ("s/done", "--archive")):
        assert caplog.text.count(f"event=link_to_own_folder path={inbox / link} folder={folder} ") == 3


def test_a_dangling_link_whose_target_comes_as_a_folder_is_not_taken_as_a_file(dirs, tmp_path):
    """It was kept as a candidate file and, once settled, failed ("is a directory") and moved to quarantine:
    the link itself, out of the inbox."""
    inbox, out = dirs
    (inbox / "later").symlink_to(tmp_path / "later", target_is_directory=True)
    watcher = Watcher(WatchOptions(inbox, out, settle=0.0, rescan=1.0, gradcam="none"))
    later = str(inbox / "later")
    watcher._observe(later, 0.0, watch_module._candidate_stat(later))
    assert watcher.candidates[later].special
    (tmp_path / "later").mkdir()
    watcher._observe(later, 1.0, watch_module._candidate_stat(later))
    assert watcher.candidates == {}


def test_options_refuse_folders_inside_the_inbox(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(UsageError, match="inside the inbox"):
        WatchOptions(inbox, inbox / "reports")
    with pytest.raises(UsageError, match="inside the inbox"):
        WatchOptions(inbox, tmp_path / "out", archive=inbox / "done")
    result = CliRunner().invoke(main, ["watch", str(inbox), "--out", str(inbox / "r"), "--once"])
    assert result.exit_code == 2 and "inside the inbox" in result.output


def test_a_second_daemon_on_the_same_ledger_is_refused(tmp_path):
    from cxrscreen.ledger import Ledger

    first = Ledger(tmp_path / "state.sqlite")
    try:
        with pytest.raises(UsageError, match="another cxrscreen watch"):
            Ledger(tmp_path / "state.sqlite")
        assert first.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        first.close()


def test_a_ledger_whose_disk_is_full_at_start_is_an_output_error_not_a_usage_error(tmp_path, monkeypatch):
    """Exit 1 (the disk), not 2 (the command line); a file that is not a database stays a usage error."""
    import sqlite3

    from cxrscreen.errors import OutputError
    from cxrscreen.ledger import Ledger

    def full(self):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "_create_or_migrate", full)
    with pytest.raises(OutputError, match="cannot use the state file: database or disk is full"):
        Ledger(tmp_path / "full.sqlite")
    monkeypatch.undo()
    (tmp_path / "text.sqlite").write_text("not a database, but long enough to be read as one" * 100)
    with pytest.raises(UsageError, match="cannot use the state file"):
        Ledger(tmp_path / "text.sqlite")


def test_a_state_file_of_schema_1_is_migrated_and_a_newer_one_refused(tmp_path):
    import sqlite3

    from cxrscreen.ledger import SCHEMA_VERSION, Ledger

    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)    # the files table as cxrscreen 0.1 (schema 1) created it, with one file
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE files (id INTEGER PRIMARY KEY, inbox_path TEXT NOT NULL, location TEXT, move_to TEXT,
            size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
            study_uid TEXT NOT NULL DEFAULT '', status TEXT NOT NULL, step TEXT NOT NULL DEFAULT '',
            tag TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', taken_at REAL NOT NULL,
            version INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE studies (study_uid TEXT PRIMARY KEY, status TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 0,
            report_base TEXT NOT NULL DEFAULT '', report TEXT NOT NULL DEFAULT '', score REAL,
            flag TEXT NOT NULL DEFAULT '', patient_id TEXT NOT NULL DEFAULT '', accession TEXT NOT NULL DEFAULT '',
            study_date TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', last_arrival REAL NOT NULL,
            updated REAL NOT NULL);
        INSERT INTO studies (study_uid, status, last_arrival, updated) VALUES ('1.2.3', 'done', 5.0, 5.0);
        INSERT INTO files (inbox_path, location, size, mtime_ns, sha256, study_uid, status, reason, taken_at)
            VALUES ('/in/a.dcm', '/in/a.dcm', 10, 1, 'ab', '1.2.3', 'skipped', 'view LL', 5.0);""")
    db.commit()
    db.close()
    ledger = Ledger(path)
    try:
        assert ledger.get_meta("schema_version") == str(SCHEMA_VERSION) == "6"
        old = ledger.file_at("/in/a.dcm")
        assert (old.study_uid, old.reason, old.patient_id, old.patient_name) == ("1.2.3", "view LL", "", "")
        migrated = ledger.study("1.2.3")
        assert (migrated.warning, migrated.appearance, migrated.unscored_frames, migrated.patient_name) == \
            ("", None, 0, "")
        ledger.take_file(path="/in/b.dcm", size=1, mtime_ns=1, sha256="cd", study_uid="1.2.3", status="skipped",
                         patient_id="P1", accession="A1", study_date="20261122", patient_name="Doe^Jane")
        new = ledger.file_at("/in/b.dcm")
        assert (new.patient_id, new.accession, new.study_date, new.patient_name) == \
            ("P1", "A1", "20261122", "Doe^Jane")
        ledger.set_meta("schema_version", SCHEMA_VERSION + 1)
    finally:
        ledger.close()
    with pytest.raises(UsageError, match="newer than this cxrscreen"):
        Ledger(path)
    fresh = Ledger(tmp_path / "fresh.sqlite")
    assert fresh.get_meta("schema_version") == "6" and fresh.file_at("/nowhere") is None
    fresh.close()


def test_a_schema_5_state_file_unflags_the_studies_whose_every_image_was_withdrawn(tmp_path):
    """cxrscreen 0.3.4 (schema 5) kept the score and flag of a report whose every image a rejection note withdrew
    since: the worklist went on flagging it. Opened by this version, such a study keeps its version and reason
    and loses its score and flag; a study with an image still scored keeps both."""
    from cxrscreen.ledger import Ledger

    path = tmp_path / "state.sqlite"
    ledger = Ledger(path)
    try:
        for uid, file_status in (("1.1", "skipped"), ("1.2", "scored")):
            ledger.take_file(path=f"/in/{uid}.dcm", size=1, mtime_ns=1, sha256=uid, study_uid=uid, status="pending")
            ledger.record_study(uid, version=1, report_base=uid, report=f"{uid}.pdf", score=0.9, flag="yes",
                                threshold=0.5, model_sha256="m", identity={}, outcomes={
                                    ledger.file_at(f"/in/{uid}.dcm").id: ("scored", "", "", "")})
        with ledger.transaction() as db:     # as 0.3.4 recorded the withdrawal: the file skipped, the flag kept
            db.execute("UPDATE files SET status = 'skipped', version = 0 WHERE study_uid = '1.1'")
            db.execute("UPDATE studies SET reason = 'withdrawn' WHERE study_uid = '1.1'")
        ledger.set_meta("schema_version", 5)
    finally:
        ledger.close()
    ledger = Ledger(path)
    try:
        withdrawn, standing = ledger.study("1.1"), ledger.study("1.2")
        assert (withdrawn.status, withdrawn.version, withdrawn.score, withdrawn.flag, withdrawn.reason) == \
            ("done", 1, None, "", "withdrawn") and withdrawn.withdrawn
        assert (standing.score, standing.flag) == (0.9, "yes") and not standing.withdrawn
    finally:
        ledger.close()


def test_creating_the_ledger_is_one_transaction(tmp_path, monkeypatch):
    import cxrscreen.ledger as ledger_module

    # a statement that fails after the files table is made: nothing of the schema may be left behind
    broken = ledger_module._SCHEMA.replace("CREATE TABLE IF NOT EXISTS studies", "CREATE TABLE studies_x (;")
    monkeypatch.setattr(ledger_module, "_SCHEMA", broken)
    with pytest.raises(UsageError, match="cannot use the state file"):
        ledger_module.Ledger(tmp_path / STATE_FILE)
    assert ledger_tables(tmp_path) == []
    monkeypatch.undo()
    ledger = ledger_module.Ledger(tmp_path / STATE_FILE)     # the lock was released; the next start creates it whole
    ledger.close()
    assert ledger_tables(tmp_path) == ["files", "meta", "reports", "studies"]


def test_move_file_across_filesystems_copies_syncs_and_deletes(tmp_path, monkeypatch):
    src = tmp_path / "in" / "a.dcm"
    src.parent.mkdir()
    src.write_bytes(b"x" * 5000)
    real_rename = os.rename

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", cross_device)
    move_file(src, tmp_path / "archive" / "a.dcm")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not src.exists() and (tmp_path / "archive" / "a.dcm").read_bytes() == b"x" * 5000
    assert not list((tmp_path / "archive").glob(".*"))

    # the archive's disk full half-way through the copy: the file stays, no half copy is left
    src.write_bytes(b"y" * 5000)
    real_copy = watch_module.shutil.copyfileobj

    def full(reader, writer, length):
        writer.write(reader.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(watch_module.shutil, "copyfileobj", full)
    with pytest.raises(OSError, match="No space left"):
        move_file(src, tmp_path / "archive" / "b.dcm")
    monkeypatch.setattr(watch_module.shutil, "copyfileobj", real_copy)
    assert src.read_bytes() == b"y" * 5000 and sorted(p.name for p in (tmp_path / "archive").iterdir()) == ["a.dcm"]


def test_log_lines_are_logfmt():
    line = kv(event="study", uid="1.2.3", score=0.123456789, flag="yes", report="a b.pdf", skipped=None)
    assert line == 'event=study uid=1.2.3 score=0.123457 flag=yes report="a b.pdf"'


def test_reports_are_written_while_the_model_scores_and_a_study_is_recorded_once_its_report_is_there(
        dirs, model, monkeypatch):
    """watch wrote each report inline, after its study was scored, so a burst of studies took scoring plus
    report time per study (a GPU server waited on reportlab). The reports are written in the background
    now; a study is recorded (done, archived, in the summary) only once its report is written, in the
    order screened."""
    inbox, out = dirs
    for s in range(3):
        write_study(inbox / f"s{s}", f"burst{s}")
    real_write, real_start = pipeline_module.write_study_report, Watcher._start_report
    writing, go_on = threading.Event(), threading.Event()
    started: list[str] = []

    def first_report_waits(path, result, **kwargs):
        if not writing.is_set():
            writing.set()
            assert go_on.wait(DEADLINE)
        return real_write(path, result, **kwargs)

    def spy(self, result, work, **kwargs):
        started.append(result.study.study_uid)
        return real_start(self, result, work, **kwargs)

    monkeypatch.setattr(pipeline_module, "write_study_report", first_report_waits)
    monkeypatch.setattr(Watcher, "_start_report", spy)
    running = Running(WatchOptions(inbox, out, archive=out.parent / "archive", settle=0.2, rescan=0.5,
                                   gradcam="none"), model)
    try:
        wait_for(writing.is_set, "the first report to be under way")
        wait_for(lambda: len(started) == 3, "the other studies to be scored while the first report is written")
        assert done_studies(out) == 0 and not reports(out)
        assert ledger_rows(out, "SELECT status, COUNT(*) FROM studies GROUP BY status") == [("pending", 3)]
        assert not (out.parent / "archive").exists()
        go_on.set()
        wait_for(lambda: done_studies(out) == 3, "the three studies to be recorded")
    finally:
        go_on.set()
        assert running.close() == 0
    assert len(reports(out)) == 3 and len(list((out.parent / "archive").rglob("*.dcm"))) == 3


def test_report_processes_write_what_the_thread_writes_and_a_dead_one_loses_nothing(dirs, model, tmp_path,
                                                                                    monkeypatch, caplog):
    """--report-processes for watch, as for batch: the same reports, DICOM copies and ledger as the report
    thread, amended versions included; a report process killed (out of memory) costs no study."""
    import pydicom

    from conftest import die_in_a_report_process

    runs = {}
    for processes in (0, 2):
        inbox, out = tmp_path / f"inbox{processes}", tmp_path / f"out{processes}"
        for s in range(3):
            write_study(inbox / f"s{s}", f"proc{s}", images=2)
        options = WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="flagged", dicom=True, once=True,
                               report_processes=processes)
        assert Watcher(options, model=model).run() == 0
        write_study(inbox / "s0", "proc0", images=1, start=2)          # a late image: version 2
        assert Watcher(options, model=model).run() == 0
        runs[processes] = out, ledger_rows(out, "SELECT study_uid, version, report, score, flag FROM reports "
                                                "ORDER BY report")
    (thread_out, thread_rows), (process_out, process_rows) = runs[0], runs[2]
    assert process_rows == thread_rows and [r[1] for r in thread_rows].count(2) == 1 and len(thread_rows) == 4
    for _, version, name, _, _ in thread_rows:
        assert pdf_text(process_out / name) == pdf_text(thread_out / name)
        dcm = pydicom.dcmread((process_out / name).with_suffix(".dcm"))
        assert dcm.InstanceNumber == version
        assert dcm.EncapsulatedDocument[:dcm.EncapsulatedDocumentLength] == (process_out / name).read_bytes()

    monkeypatch.setattr(watch_module, "make_report", die_in_a_report_process)
    inbox, out = tmp_path / "inbox_killed", tmp_path / "out_killed"
    for s in range(3):
        write_study(inbox / f"s{s}", f"killed{s}")
    options = WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True, report_processes=2,
                           max_images=1)       # a round per study: the first breaks the pool, the next find it broken
    with caplog.at_level("INFO", logger="cxrscreen"):
        assert Watcher(options, model=model).run() == 0
    assert "event=report_processes_lost" in caplog.text
    assert done_studies(out) == 3 and len(reports(out)) == 3


def test_a_file_that_fails_at_decoding_is_named_in_the_log_with_its_reason(dirs, model, caplog):
    """The daemon's journal said only `event=study ... status=failed failed=1` of a file that failed when its
    study was screened: not which file, nor why (a file that fails as it is taken had its own line). It now has
    a WARNING `event=file status=failed` line naming the file, its study, step and reason, before the study's."""
    import cv2
    import numpy as np

    from conftest import phantom

    inbox, out = dirs
    picture = cv2.imencode(".png", (phantom(200, 180) >> 4).astype(np.uint8))[1].tobytes()
    (inbox / "changed.png").write_bytes(picture[:60] + bytes([picture[60] ^ 1]) + picture[61:])
    caplog.set_level("INFO", logger="cxrscreen.watch")
    code = Watcher(WatchOptions(inbox, out, settle=0.2, rescan=0.5, gradcam="none", once=True), model=model).run()
    assert code == 1
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("event=")]
    failed = [i for i, (level, text) in enumerate(lines) if text.startswith("event=file status=failed")]
    assert len(failed) == 1, lines
    level, text = lines[failed[0]]
    assert level == "WARNING" and f"path={inbox / 'changed.png'} uid=file-" in text and "step=decode" in text
    assert "reason=\"the PNG data is damaged: its 'IDAT' chunk at byte 33 fails its CRC check" in text, text
    assert lines[failed[0] + 1][1].startswith("event=study ") and "status=failed" in lines[failed[0] + 1][1]
