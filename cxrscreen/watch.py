"""`cxrscreen watch`: screen studies as they arrive in an inbox, each exactly once.

The life of one file:

1. **observed**: a watchdog event, or the periodic rescan that backs it up
   (network mounts deliver no events);
2. **settled**: its size and mtime have not changed for ``settle`` seconds and
   its header parses. A file that stays unparseable for three more settle
   periods is taken as failed. Hidden and temporary names (``.part``, ``.tmp``,
   ``~``...) are never looked at, so write-then-rename transfers are safe;
3. **taken**: one ledger transaction records it (path, size, mtime, SHA-256,
   study) as a pending image, skipped (with the reason) or failed;
4. **screened**: with its study, once no new file of the study was taken for
   ``settle`` seconds (and no unsettled file waits in the same folder, for at
   most ``HOLD_BACK_SETTLES`` settle periods). Studies that become ready together
   are screened in shared batches by one :class:`~cxrscreen.pipeline.Screener`;
5. **reported**: the PDF (and with ``--dicom`` its Encapsulated PDF ``.dcm``) is
   written under a name fixed by (study, version), by the report thread (or
   ``--report-processes``) while the model scores the next studies; once it is
   written, one transaction records the version and the files' outcomes. A study that
   gains images after its report gets version 2, 3... (``<name>.v2.pdf``), the
   older reports kept;
6. **moved** (optional): to ``--archive`` after the report, or to
   ``--quarantine`` with a ``.reason.txt`` when it failed. Moves are renames,
   or copy + fsync + rename + delete across filesystems, recorded before and
   after in the ledger.

See :mod:`cxrscreen.ledger` for why a ``kill -9`` at any point neither loses nor
repeats a report.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import shutil
import sqlite3
import stat as stat_module
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .encapsulate import (dicom_report_name, rejection_code, rejection_note_name, withdrawn_description,
                          write_encapsulated_pdf, write_rejection_note)
from .errors import OutputError, UsageError
from .infer import LoadedModel, load_model, sha256_file
from .ingest import (EVERY_IMAGE, PRESENTATION_STATE_TAG, REJECTED_TAG, SCAN_PROBE, SCAN_THREADS, SELECTION_RULES,
                     Selection, Waits, changes_its_study, group_studies, is_ignored, newest_presentations, not_regular,
                     once_they_wait, read_record, temporary_suffix, walk, withdrawn_title)
from .ledger import STANDS_SQL, FileRow, Ledger, StudyRow, fsync_dir, in_use
from .pipeline import (REPORTS_AHEAD_BATCHES, ReportJob, ReportWriter, Screener, check_screening_options, file_rows,
                       lock_holder, make_report, output_lock, rank_rows, release, resolve_threshold, study_row,
                       unscreened_study_rows)
from .records import FileOutcome, Radiograph, Status, Study
from .report import StudyResult, atomic_write, brief_caution, report_filename, write_summary, write_worklist
from .typeset import undecodable_as_hex

log = logging.getLogger("cxrscreen.watch")

STATE_FILE = ".cxrscreen-watch.sqlite"
UNPARSED_SETTLES = 3         # an unparseable, unchanging file is failed after this many more settle periods
HOLD_BACK_SETTLES = 10       # a ready study waits at most this long for unsettled files in its folder
EMPTY_FOLDER_AGE = 3600.0    # --remove-empty-folders: seconds an inbox folder must stay empty and unchanged
SUMMARY_EVERY = 30.0         # seconds between summary/worklist rewrites while busy
RETRY_SECONDS = 60.0         # a round that failed with a tool error is retried after this long
DICOM_COMPLETE = "dicom_reports_complete"   # ledger meta: "yes" when every current report has its .dcm
STALLED_TRANSFER_AGE = 3600.0  # seconds a *.part (or other temporary name) stays unchanged before it is logged
UNLISTABLE_KEY = "unlistable_folders"      # ledger meta: JSON list of the inbox folders the last rescan could not list
SELECTION_KEY = "selection"                 # ledger meta: the last start's Selection, as JSON


def report_name(base: str, version: int) -> str:
    """The file name of version ``version`` of the report first written as ``base``: X.pdf, X.v2.pdf, ..."""
    return base if version == 1 else f"{Path(base).stem}.v{version}.pdf"


@dataclass(frozen=True)
class WatchOptions:
    inbox: Path
    out: Path
    archive: Path | None = None
    quarantine: Path | None = None
    settle: float = 10.0
    rescan: float = 5.0
    state: Path | None = None
    model_path: Path | None = None
    threshold: float | None = None
    calibration: Path | None = None
    batch_size: int = 16
    workers: int = 2
    gradcam: str = "all"
    selection: Selection = Selection()   # which images are screened (lateral views, other body parts, site names)
    dicom: bool = False          # also write each report as a DICOM Encapsulated PDF (cxrscreen.encapsulate)
    report_processes: int = 0    # processes that write the reports; 0: a thread of the daemon (pipeline.report_executor)
    remove_empty_folders: bool = False   # folders of the inbox empty for EMPTY_FOLDER_AGE are removed
    once: bool = False
    worklist_days: float = 7.0   # summary/worklist window; 0 = every study the ledger holds
    max_images: int = 128        # per screening round: bounds how long SIGTERM waits for the round to end
    poll: float = 0.25

    def __post_init__(self) -> None:
        inbox = Path(self.inbox)
        if not inbox.is_dir():
            raise UsageError(f"inbox {inbox} is not a folder")
        if self.settle < 0 or self.rescan <= 0:
            raise UsageError("--settle must be >= 0 and --rescan > 0")
        check_screening_options(self.gradcam, self.batch_size, self.workers, self.threshold)
        if self.worklist_days < 0:
            raise UsageError("--worklist-days must be >= 0 (0: every study)")
        if self.max_images < 1:
            raise UsageError("max_images must be at least 1")
        if self.report_processes < 0:
            raise UsageError("--report-processes must be >= 0 (0: a thread of the daemon)")
        root = inbox.resolve()
        for name, folder in (("--out", self.out), ("--archive", self.archive), ("--quarantine", self.quarantine),
                             ("--state", self.state)):
            if folder is not None and Path(folder).resolve().is_relative_to(root):
                raise UsageError(f"{name} {folder} is inside the inbox {inbox}: it would be screened as input")
            if folder is not None and root.is_relative_to(Path(folder).resolve()) and name != "--state":
                raise UsageError(f"the inbox {inbox} is inside {name} {folder}")

    @property
    def state_file(self) -> Path:
        return Path(self.state) if self.state else Path(self.out) / STATE_FILE


RECENT_FAILURES = 5     # the failed files `cxrscreen status` names


def health(out: Path | str, state: Path | str | None = None, *, max_wait: float = 1800.0,
           now: float | None = None) -> dict:
    """What a monitoring check needs to know about a watch daemon, read from its ledger without
    disturbing it (SQLite read-only; the daemon's lock is only tested): whether a daemon holds the
    ledger, the studies by status (``done`` also split into ``reported`` and ``not_screened``), how long
    the oldest pending study has waited since its last file, when the last report was written, and the
    files failed in the last 24 hours (``failed_recently``: the newest :data:`RECENT_FAILURES` of them, each
    with its path as it came into the inbox, step, tag and reason). ``healthy`` is false,
    with the reasons in ``problems``, when no daemon runs or a study has waited over ``max_wait``
    seconds (a study is due ``--settle`` seconds after its last file)."""
    state_file = Path(state) if state else Path(out) / STATE_FILE
    if not state_file.is_file():
        raise UsageError(f"no watch ledger at {state_file} (give --state if the daemon runs with one)")
    now = time.time() if now is None else now
    running = in_use(state_file)
    holder = lock_holder(out) if running else ""
    try:
        db = sqlite3.connect(f"{state_file.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            # a done study has a report that stands, or none (its images all skipped, or withdrawn since)
            studies = dict(db.execute(f"SELECT CASE WHEN status != 'done' THEN status WHEN {STANDS_SQL} THEN "
                                      "'reported' ELSE 'not_screened' END, COUNT(*) FROM studies "
                                      "GROUP BY 1").fetchall())
            # and the studies of files skipped (or failed) as they came, none of them an image to screen: a
            # lateral-only or non-chest study has no row of its own, as in the summary
            for kind, n in db.execute("SELECT kind, COUNT(*) FROM (SELECT CASE WHEN MAX(status = 'failed') THEN "
                                      "'failed' ELSE 'not_screened' END AS kind FROM files WHERE study_uid != '' AND "
                                      "study_uid NOT IN (SELECT study_uid FROM studies) GROUP BY study_uid) "
                                      "GROUP BY kind"):
                studies[kind] = studies.get(kind, 0) + n
            oldest = db.execute("SELECT MIN(last_arrival) FROM studies WHERE status = 'pending'").fetchone()[0]
            last_report = db.execute("SELECT MAX(created) FROM reports").fetchone()[0]
            failed_day = db.execute("SELECT COUNT(*) FROM files WHERE status = 'failed' AND taken_at >= ?",
                                    (now - 86400,)).fetchone()[0]
            recent = [dict(zip(("path", "step", "tag", "reason"), row)) for row in db.execute(
                "SELECT inbox_path, step, tag, reason FROM files WHERE status = 'failed' AND taken_at >= ? "
                "ORDER BY taken_at DESC, id DESC LIMIT ?", (now - 86400, RECENT_FAILURES))]
            unlistable = db.execute("SELECT value FROM meta WHERE key = ?", (UNLISTABLE_KEY,)).fetchone()
            unlistable = json.loads(unlistable[0]) if unlistable else []
        finally:
            db.close()
    except (sqlite3.Error, ValueError) as exc:   # unreadable to this user, or not a ledger: the check fails
        raise OutputError(f"cannot read the ledger: {exc}", path=state_file, step="status") from None
    waited = max(0.0, now - oldest) if oldest is not None else None
    problems = []
    if not running:
        problems.append("no watch daemon holds this ledger")
    elif unlistable:        # what a stopped daemon saw last is not news
        problems.append(f"{len(unlistable)} inbox folder(s) cannot be listed, their files not seen: "
                        + ", ".join(unlistable[:3]) + (", ..." if len(unlistable) > 3 else ""))
    if waited is not None and waited > max_wait:
        problems.append(f"a study has waited {waited / 60:.0f} min since its last file (limit {max_wait / 60:.0f})")
    return {"ledger": str(state_file), "running": running, "holder": holder,
            "studies": {"done": studies.get("reported", 0) + studies.get("not_screened", 0),
                        **{k: studies.get(k, 0) for k in ("reported", "not_screened", "pending", "failed")}},
            "oldest_pending_wait_s": round(waited, 1) if waited is not None else None,
            "last_report_at": last_report, "failed_files_24h": failed_day, "failed_recently": recent,
            "unlistable_folders": unlistable if running else [],
            "healthy": not problems, "problems": problems}


def kv(**fields) -> str:
    """One structured log line: ``key=value`` pairs, values quoted when they need it (logfmt)."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = format(value, ".6g") if isinstance(value, float) else undecodable_as_hex(str(value))
        if not text or any(c in text for c in ' "=\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float                     # monotonic time this size/mtime was first seen
    unparsed_since: float | None = None
    special: bool = False            # a FIFO, socket, device or dangling symbolic link: recorded, never opened


@dataclass
class _StudyWork:
    row: StudyRow
    files: dict[str, FileRow]        # by current location
    prior_failed: list[FileOutcome]
    added: list[str]                 # names of files new since the last report
    notes: list[str] = dataclasses.field(default_factory=list)  # presentation states, rejection notes new since


@dataclass
class _Reporting:
    """A study whose report is being written (by the report thread or processes) while the model scores the
    next ones; the ledger records it once the report is there."""
    result: StudyResult
    work: _StudyWork
    version: int
    base: str
    report: str                      # "" when nothing of the study was scored: no report
    outcomes: dict[int, tuple]
    failed: list[FileOutcome]        # its files that failed in this screening (those that failed at intake not)
    writing: ReportJob | None = None  # None: no report to wait for


def _log_file(status: str, path, step: str, tag: str, reason: str, uid: str = "") -> None:
    """The ``event=file`` line of a file skipped or failed, as it is taken or (failed at decoding) as its study is
    screened (``uid``, its study's, where known): a failure is a WARNING, the rest INFO."""
    log.log(logging.WARNING if status == "failed" else logging.INFO,
            kv(event="file", status=status, path=path, uid=uid or None, step=step or None, tag=tag or None,
               reason=reason))


def move_file(src: Path, dest: Path) -> None:
    """Move durably: a rename on one filesystem, else copy + fsync + rename into place + delete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.cxrscreen-tmp")
        try:
            with open(src, "rb") as reader, open(tmp, "wb") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
                writer.flush()
                os.fsync(writer.fileno())
            shutil.copystat(src, tmp)
            os.replace(tmp, dest)
        except BaseException:       # a full archive disk: no half copy left behind to fill it further
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
        os.unlink(src)
    else:
        fsync_dir(dest.parent)
    fsync_dir(src.parent)


def _free_path(dest: Path) -> Path:
    n = 1
    candidate = dest
    while candidate.exists() or candidate.is_symlink():
        candidate = dest.with_name(f"{dest.stem}__{n}{dest.suffix}")
        n += 1
    return candidate


def _candidate_stat(path: str) -> tuple[os.stat_result, bool] | None:
    """A file's stat (its target's) and whether it is a symbolic link whose target is missing (listed, once it
    stays so, never opened); None when it is gone, or cannot be stat-ed and is no such link."""
    try:
        return os.stat(path), False
    except OSError:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return (st, True) if stat_module.S_ISLNK(st.st_mode) else None


def _hashed(path: str, record) -> tuple:
    """``(record, the file's SHA-256)``; for a file that cannot be read, a FAILED record saying so, and ''."""
    try:
        return record, sha256_file(Path(path))
    except OSError as exc:
        return FileOutcome(Path(path), Status.FAILED, f"cannot read: {exc}", step="read"), ""


def _unparsed(record) -> bool:
    """A file whose header could not be parsed, or that is not recognised: maybe still being written."""
    return isinstance(record, FileOutcome) and (record.status is Status.FAILED or record.step == "discover")


def _not_noise_at_stop(record: logging.LogRecord) -> bool:
    """watchdog's inotify thread logs that a callback was "called when the thread is inactive" as it stops."""
    return "called when the thread is inactive" not in record.getMessage()


class Watcher:
    """The daemon. :meth:`run` returns when ``stop`` is set (SIGTERM/SIGINT), or in ``once`` mode when
    everything in the inbox is handled. The model is loaded once."""

    def __init__(self, options: WatchOptions, *, model: LoadedModel | None = None,
                 stop: threading.Event | None = None) -> None:
        self.options = options
        self.stop = stop or threading.Event()
        self.inbox = Path(options.inbox).resolve()
        self.out = Path(options.out)
        self._model = model
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._rescan_soon = threading.Event()
        self.candidates: dict[str, _Candidate] = {}
        self._reads = Waits(SCAN_PROBE)        # whether settled files are read in threads (a share): learnt once
        self._stats = Waits(SCAN_PROBE)        # whether the files seen are stat-ed in threads, likewise
        self._unlistable: set[str] = set()     # inbox folders that could not be listed at the last rescan
        self._stalled: set[str] = set()        # temporary names logged as stalled transfers, still there
        self._linked_own: set[str] = set()     # links in the inbox to our own folders, logged, still there
        self.known: dict[str, tuple[int, int]] = {}
        self.failed_files = 0
        self.reports_written = 0
        self._summary_due = False
        self._summary_at = -SUMMARY_EVERY
        self._summary_gap = 0.0      # SUMMARY_EVERY after a write failed: not a failing write every poll
        self._summary_cost = 0.0     # seconds the last rewrite took
        self._retry_after: dict[str, float] = {}   # study uid -> monotonic time, after an unexpected error
        self._report_failures: dict[str, int] = {}  # study uid -> reports of it that could not be made
        self._held: dict[str, str] = {}             # study uid -> the error it waits out, for the summary
        self._round_started = time.monotonic()
        self.round_errors = 0

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        # --out is held while the daemon runs (no batch or second daemon writes into it), and the
        # temporary files of reports that a kill -9 interrupted are cleared
        with output_lock(self.out, f"cxrscreen watch of {self.inbox}"):
            return self._run_locked()

    def _run_locked(self) -> int:
        state = self.options.state_file
        try:
            self.ledger = Ledger(state)     # locked: one daemon per ledger
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(f"cannot open the ledger: {exc}", path=state, step="start") from exc
        try:
            return self._run()
        except (sqlite3.Error, OSError) as exc:   # at start (once running, the loop pauses on these instead)
            raise OutputError(f"cannot write the ledger or the output folder: {exc}", path=state,
                              step="start") from exc
        finally:
            self.ledger.close()

    def _run(self) -> int:
        o = self.options
        model = self._model or load_model(o.model_path)
        self.model = model
        self.threshold, self.operating, calibration = resolve_threshold(model, o.threshold, o.calibration,
                                                                        o.selection)
        self.screener = Screener(model, self.threshold, gradcam=o.gradcam, batch_size=o.batch_size,
                                 workers=o.workers)
        self._reporter = ReportWriter(o.report_processes, lost_note=kv(
            event="report_processes_lost", note="a report process stopped; the reports are written by a thread"))
        try:
            return self._serve(model, calibration)
        finally:
            self._reporter.shutdown(cancel_futures=True)

    def _serve(self, model: LoadedModel, calibration: str) -> int:
        o = self.options
        self._note_model(calibration)
        self._recover()
        self._selection_start()
        self._dicom_start()
        observer = self._start_observer()
        counts = self.ledger.counts()
        log.info(kv(event="start", inbox=self.inbox, out=self.out, state=o.state_file, model=model.path.name,
                    model_sha256=model.sha256[:16], compute=model.compute, threshold=self.threshold,
                    calibration=calibration or None, settle=o.settle,
                    rescan=o.rescan, include_lateral=o.selection.include_lateral or None,
                    any_body_part=o.selection.any_body_part or None,
                    chest_body_parts=",".join(sorted(o.selection.chest_body_parts)) or None,
                    frontal_views=",".join(sorted(o.selection.frontal_views)) or None,
                    pending_studies=counts["studies"].get("pending", 0), once=o.once))
        stopped_by = "once: inbox handled"
        try:
            next_rescan = 0.0
            recover = False
            while not self.stop.is_set():
                try:
                    if recover:
                        self._recover()
                        recover = False
                    now = time.monotonic()
                    if now >= next_rescan or self._rescan_soon.is_set():
                        self._rescan_soon.clear()
                        self._rescan(now)
                        next_rescan = now + o.rescan
                    self._drain_events(now)
                    self._settle()
                    screened = self._screen_ready()
                    if screened:
                        self._summary_due = True
                    busy = self._busy()
                    if self._summary_wanted(busy):
                        self._write_summary()
                except (sqlite3.Error, OSError) as exc:
                    # The ledger cannot be written (its disk is full, an I/O error): each step is one transaction,
                    # so nothing is half-recorded. Wait, then go on as a restart would, without reloading the model.
                    self.round_errors += 1
                    log.error(kv(event="paused", error=f"{type(exc).__name__}: {exc}", ledger=o.state_file,
                                 retry_in=None if o.once else RETRY_SECONDS))
                    if o.once:
                        stopped_by = "once: paused, the ledger could not be written"
                        break
                    recover = True
                    self.stop.wait(RETRY_SECONDS)
                    continue
                if o.once and not busy:
                    break
                if not screened:    # after a round, straight on to the next: a burst is screened without pauses
                    self.stop.wait(o.poll)
            else:
                stopped_by = "signal"
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if self._summary_due:
                self._write_summary()
            counts = self.ledger.counts()
            log.info(kv(event="stop", reason=stopped_by, reports_written=self.reports_written,
                        failed_files=self.failed_files, pending_studies=counts["studies"].get("pending", 0),
                        unsettled_files=len(self.candidates), unlistable_folders=len(self._unlistable) or None))
        return 1 if o.once and (self.failed_files or self.round_errors or self._summary_due or self._unlistable) else 0

    def _recover(self) -> None:
        """What a start does after a crash: finish interrupted moves, move handled files, re-read the ledger."""
        for row in self.ledger.files_to_move():          # a move interrupted by a crash
            self._finish_move(row, Path(row.move_to))
        for row in self.ledger.handled_in_place():        # handled, but a crash (or no --archive then) left it
            self._relocate(row)
        self.known = self.ledger.known_locations()

    def _selection_start(self) -> None:
        """When this start's selection differs from the last one's (a site name added with --chest-body-part or
        --frontal-view, --include-lateral or --any-body-part given), read again the files the view and body part
        rules skipped that are still there, in the inbox or the archive: those it now screens are pending again
        and their studies reported (again, amended, where an image of theirs was reported). Without this they
        stayed skipped: the ledger never reads a file it has handled twice."""
        current = json.dumps(self.options.selection.as_json(), sort_keys=True)
        if self.ledger.get_meta(SELECTION_KEY) == current:
            return
        tags = {rule.tag for rule in SELECTION_RULES if rule.override or rule.widen}
        retaken = 0
        for f in self.ledger.skipped_by(tags):
            location = Path(f.location)
            try:
                st = location.stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                continue        # changed since: in the inbox the observer takes the new content
            record = read_record(location, self.options.selection)
            if isinstance(record, Radiograph):
                uid = f.study_uid or record.study_uid
                self.ledger.retake(f.id, uid)
                log.info(kv(event="file_retaken", path=location, study=uid, skipped_for=f.reason,
                            note="screened by this start's options"))
                retaken += 1
        if retaken:
            log.info(kv(event="selection_widened", files=retaken, note="files skipped before are screened now"))
        with self.ledger.transaction():
            self.ledger.set_meta(SELECTION_KEY, current)

    def _dicom_start(self) -> None:
        """With --dicom, back-fill the .dcm of studies reported without it, unless the ledger says every
        report has its .dcm (set by a back-fill that missed none; cleared by any start without --dicom, whose
        reports have none). The check stats two files per study reported, ever: minutes on a network mount
        for a ledger of years, at every start."""
        if not self.options.dicom:
            if self.ledger.get_meta(DICOM_COMPLETE) != "no":
                with self.ledger.transaction():
                    self.ledger.set_meta(DICOM_COMPLETE, "no")
            return
        if self.ledger.get_meta(DICOM_COMPLETE) != "yes" and self._backfill_dicom():
            with self.ledger.transaction():
                self.ledger.set_meta(DICOM_COMPLETE, "yes")
        self._backfill_rejection_notes()

    def _backfill_rejection_notes(self) -> None:
        """With --dicom, at each start: a study withdrawn while no rejection note was written of its .dcm reports
        (by cxrscreen 0.3.5 or older, by a start without --dicom, or a note that failed) gets it. Withdrawn
        studies are few: this stats a file or two of each."""
        for row in self.ledger.withdrawn_studies():
            if self.stop.is_set():
                return
            if (row.report_base and not (self.out / rejection_note_name(row.report_base)).exists()
                    and any(self.out.joinpath(dicom_report_name(report_name(row.report_base, v))).exists()
                            for v in range(1, row.version + 1))):
                self._withdraw_dicom_reports(row, [f.reason for f in self.ledger.study_files(row.study_uid)
                                                   if f.tag == REJECTED_TAG])

    def _withdraw_dicom_reports(self, row: StudyRow, reasons: list[str]) -> Path | None:
        """The rejection note of the .dcm of every version of the reports of ``row``'s study, whose images the
        notes these ``reasons`` name withdrew (file rows' reasons, :func:`~cxrscreen.ingest.withdrawn_reason`):
        its path; None when there is none to write (no .dcm, or no image withdrawn by a note), or when it could
        not be written (logged: the daemon goes on, and its next start tries again)."""
        titles = {withdrawn_title(reason) for reason in reasons} - {""}
        if not titles:
            return None
        sent = [self.out / dicom_report_name(report_name(row.report_base, v)) for v in range(1, row.version + 1)]
        note = self.out / rejection_note_name(row.report_base)
        try:
            written = write_rejection_note(note, sent, rejection_code(titles),
                                           withdrawn_description(row.study_uid, titles))
        except Exception as exc:        # the disk, or a .dcm damaged since: this note only
            log.error(kv(event="rejection_note_failed", uid=row.study_uid, note=note.name,
                         error=f"{type(exc).__name__}: {exc}"))
            return None
        if written is not None:
            log.warning(kv(event="rejection_note", uid=row.study_uid, note=written.name,
                           withdraws=",".join(p.name for p in sent if p.exists()),
                           note_for="send it to the PACS the reports were sent to"))
        return written

    def _backfill_dicom(self) -> bool:
        """With --dicom, once: the current report of each study reported before the daemon ran with
        --dicom gets its .dcm, made from the PDF and the study's scored images, read where the ledger says
        they are now (the archive). A study read from JPEG/PNG has none to have (its UID is ours: "file-...",
        never a DICOM UID, which is digits and dots), nor one withdrawn since its report (no longer standing)."""
        missing = [s for s in self.ledger.studies("done")
                   if s.report and not s.withdrawn and not s.study_uid.startswith("file-")
                   and (self.out / s.report).is_file()
                   and not (self.out / dicom_report_name(s.report)).exists()]
        if missing:
            log.info(kv(event="dicom_backfill", studies=len(missing), note="reported before --dicom"))
        complete = True
        for row in missing:
            if self.stop.is_set():
                return False
            images = []
            for f in self.ledger.study_files(row.study_uid):
                if f.status == "scored" and f.version == row.version:
                    record = read_record(Path(f.location), EVERY_IMAGE)
                    if isinstance(record, Radiograph):
                        images.append(dataclasses.replace(record, study_uid=row.study_uid))
            try:
                written = write_encapsulated_pdf(self.out / dicom_report_name(row.report), self.out / row.report,
                                                 images, version=row.version) if images else None
            except OSError:
                raise       # the disk: the start fails, naming it
            except Exception as exc:     # this study's .dcm only; the daemon goes on
                log.error(kv(event="dicom_backfill_failed", uid=row.study_uid, error=f"{type(exc).__name__}: {exc}"))
                complete = False
                continue
            if written is None:
                log.warning(kv(event="dicom_backfill_failed", uid=row.study_uid,
                               error="none of its scored images is where the ledger says, as DICOM"))
                complete = False
            else:
                log.info(kv(event="dicom_backfilled", uid=row.study_uid, dicom=written.name))
        return complete

    def _busy(self) -> bool:
        """Files still settling, or pending studies that are not waiting out an error."""
        now = time.monotonic()
        return bool(self.candidates) or any(self._retry_after.get(s.study_uid, 0.0) <= now
                                            for s in self.ledger.studies("pending"))

    def _note_model(self, calibration: str) -> None:
        previous = self.ledger.get_meta("model_sha256")
        if previous and previous != self.model.sha256:
            log.warning(kv(event="model_changed", previous=previous[:16], now=self.model.sha256[:16],
                           note="studies already reported keep their reports; new versions use this model"))
        with self.ledger.transaction():
            self.ledger.set_meta("model_sha256", self.model.sha256)
            self.ledger.set_meta("threshold", self.threshold)
            self.ledger.set_meta("calibration", calibration)
            self.ledger.set_meta("tool_version", __version__)
            self.ledger.set_meta(UNLISTABLE_KEY, "[]")     # what an earlier run saw; this one's first rescan tells

    # ------------------------------------------------------------------ observing

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError as exc:   # pragma: no cover - watchdog is a dependency
            log.warning(kv(event="observer_unavailable", error=exc, note="relying on the periodic rescan"))
            return None
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:   # a folder moved in brings files that raise no events of their own
                    watcher._rescan_soon.set()
                    return
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if path:
                        watcher._mark(os.fsdecode(path))

        logging.getLogger("watchdog.observers.inotify").addFilter(_not_noise_at_stop)   # added once however often
        # watchdog walks a folder it watches again (one created while its parent is walked, after an event queue
        # overflow) and warns that it replaces each folder's callback with itself: a RuntimeWarning naming no
        # file in the daemon's journal, seen in a burst of 300 files in 30 folders; the watches are as before
        warnings.filterwarnings("ignore", message="Callback with id '.*' already exists for watch",
                                category=RuntimeWarning, module=r"watchdog\.")
        observer = Observer()
        try:
            observer.schedule(Handler(), str(self.inbox), recursive=True)
            observer.start()
        except OSError as exc:   # e.g. the inotify watch limit: the rescan still finds everything
            log.warning(kv(event="observer_unavailable", error=exc, note="relying on the periodic rescan"))
            return None
        return observer

    def _ignored(self, path: str) -> bool:
        try:
            parts = Path(path).relative_to(self.inbox).parts
        except ValueError:
            return True
        return not parts or any(p.startswith(".") for p in parts[:-1]) or is_ignored(parts[-1])

    def _mark(self, path: str) -> None:
        path = os.path.normpath(path)
        if not self._ignored(path):
            with self._dirty_lock:
                self._dirty.add(path)

    def _drain_events(self, now: float) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        for path, seen in self._stat_all(dirty):
            self._observe(path, now, seen)

    def _rescan(self, now: float) -> None:
        root = os.path.normpath(self.inbox)
        errors: list[OSError] = []
        left_out: list[tuple[str, str]] = []
        avoided: list[tuple[str, str]] = []

        def found() -> Iterator[str]:
            for folder, dirs, files in walk(self.inbox, errors, left_out=left_out, avoid=self._own_folders(),
                                            avoided=avoided):
                if self.options.remove_empty_folders and not dirs and not files and os.path.normpath(folder) != root:
                    self._remove_if_stale(folder)
                for name in files:
                    yield os.path.normpath(os.path.join(folder, name))

        for path, seen in self._stat_all(found()):
            self._observe(path, now, seen)
        self._report_unlistable(errors)
        self._report_stalled([path for path, _ in left_out if temporary_suffix(path)])
        self._report_links_to_own(avoided)

    def _own_folders(self) -> dict[tuple[int, int], str]:
        """The device and inode of the folders this daemon writes to (``--archive`` and ``--quarantine``,
        ``--out``, the ledger's), by option name: a link in the inbox to one of them is not walked. The archive
        and quarantine carry no marker that :func:`~cxrscreen.ingest.walk` would know them by, and through such
        a link every rescan took the files archived as new ones and moved them into the archive again, one
        folder deeper each time (a quarantined file, failed again, likewise, its ``.reason.txt`` with it)."""
        own = {}
        for name, folder in (("--out", self.out), ("--archive", self.options.archive),
                             ("--quarantine", self.options.quarantine), ("--state", self.options.state_file.parent)):
            try:
                st = os.stat(folder) if folder is not None else None
            except OSError:                 # not made yet (the archive is made by the first move)
                continue
            if st is not None:
                own.setdefault((st.st_dev, st.st_ino), name)
        return own

    def _report_links_to_own(self, avoided: list[tuple[str, str]]) -> None:
        """Log, once, a link in the inbox to one of the daemon's own folders (``(path, option)`` as
        :func:`~cxrscreen.ingest.walk` found them), which is not walked."""
        for path, folder in avoided:
            if path not in self._linked_own:
                log.warning(kv(event="link_to_own_folder", path=path, folder=folder,
                               note="not scanned: its files would be taken again as new ones"))
        self._linked_own = {path for path, _ in avoided}

    def _report_stalled(self, temporaries: list[str]) -> None:
        """Log, once, a file of the inbox under a temporary name (``*.part``...) left unchanged for
        STALLED_TRANSFER_AGE: a transfer that failed, whose study is then screened without it. It is never
        read (it may be half a file); the log is where a daemon can say so."""
        stalled = set()
        for path in temporaries:
            try:
                st = os.stat(path)
            except OSError:
                continue
            age = time.time() - st.st_mtime
            if stat_module.S_ISREG(st.st_mode) and age >= STALLED_TRANSFER_AGE:
                stalled.add(path)
                if path not in self._stalled:
                    log.warning(kv(event="transfer_stalled", path=path, age_min=round(age / 60),
                                   note="a temporary name unchanged this long: a transfer that failed? not read"))
        self._stalled = stalled

    def _report_unlistable(self, errors: list[OSError]) -> None:
        """Log a folder of the inbox that cannot be listed when it becomes so, and again when it can be: its
        files are not seen meanwhile, and a daemon's log is where that must show (once, not every rescan)."""
        now_unlistable = {os.fsdecode(e.filename or self.inbox): e for e in errors}
        if now_unlistable.keys() == self._unlistable:
            return
        for folder in sorted(now_unlistable.keys() - self._unlistable):
            log.error(kv(event="folder_unreadable", path=folder, error=now_unlistable[folder].strerror,
                         note="its files are not seen until it can be listed"))
        for folder in sorted(self._unlistable - now_unlistable.keys()):
            log.info(kv(event="folder_readable", path=folder))
        self._unlistable = set(now_unlistable)
        with self.ledger.transaction():      # for `cxrscreen status`, a monitoring system's view
            self.ledger.set_meta(UNLISTABLE_KEY, json.dumps(sorted(self._unlistable)))

    def _remove_if_stale(self, folder: str) -> None:
        """Remove an inbox folder left empty (a PACS that makes one per study, its files archived) once it
        has not changed for EMPTY_FOLDER_AGE: thousands of them make every rescan slow, on NFS very slow.
        rmdir removes only an empty folder, so a file that has just arrived keeps it."""
        try:
            if time.time() - os.stat(folder).st_mtime < EMPTY_FOLDER_AGE:
                return
            os.rmdir(folder)
        except OSError:
            return
        log.info(kv(event="folder_removed", path=folder, note="empty and unchanged for an hour or more"))

    def _stat_all(self, paths: Iterable[str]) -> Iterator[tuple[str, tuple | None]]:
        """``(path, _candidate_stat(path))`` for each of ``paths``, in order: one at a time, or ahead in threads
        once those stats wait more than they compute (an inbox on a share: a round trip each, for every file
        in the inbox at every rescan, and for every waiting file at every poll)."""
        return once_they_wait(_candidate_stat, paths, self._stats, threads=SCAN_THREADS, name="cxr-stat")

    def _observe(self, path: str, now: float, seen: tuple | None) -> None:
        """Note what ``seen`` (:func:`_candidate_stat` of ``path``) says of a file: a candidate, and since
        when it has been as it is now; or not one (gone, a folder, or taken already as it is)."""
        if seen is None:
            self.candidates.pop(path, None)
            return
        st, special = seen
        if stat_module.S_ISDIR(st.st_mode):     # a dangling link whose target came as a folder: walked, not read
            self.candidates.pop(path, None)
            return
        special = special or not stat_module.S_ISREG(st.st_mode)    # a FIFO, socket or device: never opened
        signature = (st.st_size, st.st_mtime_ns)
        if self.known.get(path) == signature:
            self.candidates.pop(path, None)
            return
        current = self.candidates.get(path)
        if current is None or (current.size, current.mtime_ns, current.special) != (*signature, special):
            self.candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now, special=special)

    # ------------------------------------------------------------------ taking settled files

    def _settle(self) -> None:
        settle = self.options.settle
        due = []
        for path, seen in self._stat_all(sorted(self.candidates)):
            now = time.monotonic()
            self._observe(path, now, seen)
            candidate = self.candidates.get(path)
            if candidate is not None and now - candidate.since >= settle:
                due.append((path, candidate))
        # their headers read and their bytes hashed one at a time, or ahead in threads once those reads wait
        # (a share); each then taken here, in order
        for (path, candidate), read in once_they_wait(self._read_settled, due, self._reads, threads=SCAN_THREADS,
                                                      name="cxr-take"):
            self._take(path, candidate, time.monotonic(), read)

    def _read_settled(self, item: tuple[str, _Candidate]) -> tuple:
        """What taking a settled file reads of it, in any thread: ``(record, SHA-256, stat or None)``; the
        digest is '' where the file is not to be hashed (a FIFO or device; changed or gone since it settled;
        unreadable, the record saying so) and None for a file whose header could not be parsed (hashed only
        if it is taken)."""
        path, candidate = item
        if candidate.special:       # read_record only stats these
            return read_record(Path(path)), "", None
        record = read_record(Path(path), self.options.selection)
        try:
            st = os.stat(path)
        except OSError:
            return record, "", None
        if (st.st_size, st.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
            return record, "", st          # changed since it settled: observed again, not taken
        if _unparsed(record):
            return record, None, st        # hashed only if it is taken
        return *_hashed(path, record), st

    def _take(self, path: str, candidate: _Candidate, now: float, read: tuple) -> None:
        o = self.options
        record, digest, st = read
        if candidate.special:       # a dangling link's target may still come
            if now - candidate.since < (1 + UNPARSED_SETTLES) * o.settle and os.path.islink(path):
                return
        else:
            if st is None:
                self.candidates.pop(path, None)
                return
            if (st.st_size, st.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                self.candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now)   # changed while read
                return
            if _unparsed(record):
                if candidate.unparsed_since is None:
                    candidate.unparsed_since = now
                    log.debug(kv(event="unparsed", path=path, reason=record.reason, note="waiting, may be incomplete"))
                if now - candidate.unparsed_since < UNPARSED_SETTLES * o.settle:
                    return
                record, digest = _hashed(path, record)
        fields = dict(status="", step="", tag="", reason="", **record.identifiers())
        if isinstance(record, Radiograph):
            earlier = self.ledger.file_with_hash(digest)
            if earlier is not None and earlier.location != path:
                fields.update(study_uid=earlier.study_uid or record.study_uid, status="skipped", step="select",
                              reason=f"identical copy of {earlier.inbox_path}, already taken; not screened twice")
            else:
                fields["status"] = "pending"
        else:
            fields.update(status=record.status.value, step=record.step, tag=record.tag, reason=record.reason)
        # the ledger is asked only for a presentation state or rejection note, not for every file skipped as it comes
        note = isinstance(record, FileOutcome) and (record.rejection is not None or record.presentation is not None)
        changes = note and self._report_stands(record.study_uid) and (
            record.rejection is not None or self._shows_otherwise(record))
        resent = changes and digest and self.ledger.file_with_hash(digest) is not None
        self.ledger.take_file(path=path, size=candidate.size, mtime_ns=candidate.mtime_ns, sha256=digest, **fields)
        if changes and not resent and self.ledger.reopen(record.study_uid):
            log.info(kv(event="study_reopened", uid=record.study_uid, path=path,
                        reason=f"a {'rejection note' if record.rejection else 'presentation state'} came after its "
                               f"report"))
        self.known[path] = (candidate.size, candidate.mtime_ns)
        self.candidates.pop(path, None)
        self._summary_due = True
        if fields["status"] != "pending":
            _log_file(fields["status"], path, fields["step"], fields["tag"], fields["reason"], fields["study_uid"])
        if fields["status"] == "failed":
            self.failed_files += 1
        self._relocate(self.ledger.file_at(path))     # a pending image waits for its study's report

    def _report_stands(self, study_uid: str) -> bool:
        """Whether the study has a report that stands, which a presentation state or rejection note that comes
        after it can change (a study pending or failed is screened with them anyway; one withdrawn has nothing
        left to change)."""
        row = self.ledger.study(study_uid) if study_uid else None
        return row is not None and row.status == "done" and row.stands

    def _shows_otherwise(self, record: FileOutcome) -> bool:
        """Whether a presentation state just taken changes how an image of its reported study is shown: it is
        the newest for an image it references, and turns or mirrors it otherwise than the one that applied
        before (or none did). So one that neither turns nor mirrors reopens the study only where it displaces
        one that did (a reader's window-level change, which PACS save as presentation states, changes nothing),
        and a copy of one already taken changes nothing. For a study whose report stands (:meth:`_report_stands`)."""
        earlier = [self._read_again(f, FileOutcome(Path(f.location), Status.SKIPPED, f.reason, step=f.step, tag=f.tag,
                                                   study_uid=f.study_uid))
                   for f in self.ledger.study_files(record.study_uid)
                   if f.status == "skipped" and f.tag == PRESENTATION_STATE_TAG and f.location]
        before, after = newest_presentations(earlier), newest_presentations([*earlier, record])

        def turn(shown) -> tuple[int, bool]:
            return (shown.rotation, shown.flip) if shown is not None else (0, False)
        return any(turn(before.get(uid)) != turn(after.get(uid)) for uid in record.presentation.images)

    # ------------------------------------------------------------------ screening ready studies

    def _screen_ready(self) -> bool:
        o = self.options
        now = time.time()
        busy_dirs = {os.path.dirname(p) for p in self.candidates}
        works: dict[str, _StudyWork] = {}
        items: list[Radiograph | FileOutcome] = []
        n_images = 0
        for row in self.ledger.ready_studies(now - o.settle):
            if self._retry_after.get(row.study_uid, 0.0) > time.monotonic():
                continue
            files = self.ledger.study_files(row.study_uid)
            pending = [f for f in files if f.status == "pending"]
            if busy_dirs and now - row.last_arrival < o.settle * (1 + HOLD_BACK_SETTLES) and \
                    any(os.path.dirname(f.location) in busy_dirs for f in pending):
                continue   # an unsettled file next to this study's new files may belong to it
            study_items = self._study_items(row, files)
            if study_items is None:
                continue
            reported = self.ledger.report_time(row.study_uid, row.version) if row.version else None
            work = _StudyWork(row, {f.location: f for f in files}, [], [Path(f.inbox_path).name for f in pending],
                              [Path(f.inbox_path).name for f in files if reported is not None
                               and f.taken_at > reported and changes_its_study(f.step, f.tag)])
            for item in study_items:
                if isinstance(item, FileOutcome) and item.status is Status.FAILED and \
                        work.files[str(item.path)].status == "failed":
                    work.prior_failed.append(item)
                else:
                    items.append(item)
            works[row.study_uid] = work
            n_images += sum(isinstance(i, Radiograph) for i in study_items)
            if n_images >= o.max_images:
                break
        if not works:
            return False
        try:
            self._screen_round(works, items)
        except Exception as exc:   # a tool error (disk full, model failure): log it, retry these studies later
            log.exception(kv(event="round_failed", studies=len(works), error=f"{type(exc).__name__}: {exc}",
                             retry_in=RETRY_SECONDS))
            self.round_errors += 1
            for uid in works:
                if self.ledger.study(uid).status == "pending":
                    self._retry_after[uid] = time.monotonic() + RETRY_SECONDS
                    self._held[uid] = f"its screening round failed ({type(exc).__name__}: {exc}); tried again later"
        return True

    def _screen_round(self, works: dict[str, _StudyWork], items: list[Radiograph | FileOutcome]) -> None:
        """Score the round's studies and report each: the reports are written in the background (a thread, or
        --report-processes) while the model scores the next studies, and each study is recorded in the
        ledger, in the order screened, once its report is there. At most two batches' studies wait."""
        self._round_started = time.monotonic()
        studies, loose = group_studies(items)
        screened = {s.study_uid for s in studies}
        for uid in [u for u in works if u not in screened]:     # nothing left to score in these studies
            result = StudyResult(Study(uid, ()))
            result.failed.extend(x for x in loose if x.study_uid == uid and x.status is Status.FAILED)
            self._finish(self._start_report(result, works[uid], extra_skipped=[
                x for x in loose if x.study_uid == uid and x.status is Status.SKIPPED]))
        under_way: deque[_Reporting] = deque()
        stream = self.screener.screen(studies)
        try:
            for result in stream:
                try:
                    under_way.append(self._start_report(result, works[result.study.study_uid]))
                except Exception as exc:    # its report cannot even be begun (a name no test foresaw): it waits
                    self._report_failed(result, exc)
                while len(under_way) > REPORTS_AHEAD_BATCHES * self.options.batch_size:
                    self._finish(under_way.popleft())
                if self.stop.is_set():
                    log.info(kv(event="abandon", note="stopping: the reports under way are finished, the rest of "
                                                      "this round stays pending"))
                    break
            while under_way:
                self._finish(under_way.popleft())
        finally:
            stream.close()
            for reporting in under_way:     # the round failed: these stay pending, their reports are not waited for
                if reporting.writing is not None:
                    reporting.writing.future.cancel()

    def _report_failed(self, result: StudyResult, exc: Exception) -> None:
        """A study whose report could not be made (a bug, an input no test foresaw) stays pending and is
        tried again later, each time twice as late (up to an hour), so that it neither blocks the studies
        screened with it nor fills the log; the summary lists it as pending."""
        uid = result.study.study_uid
        release(result)
        self.round_errors += 1
        tries = self._report_failures[uid] = self._report_failures.get(uid, 0) + 1
        delay = min(RETRY_SECONDS * 2 ** (tries - 1), 3600.0)
        self._retry_after[uid] = time.monotonic() + delay
        self._held[uid] = (f"its report could not be made ({type(exc).__name__}: {exc}; {tries} "
                           f"{'try' if tries == 1 else 'tries'}); tried again later, see the log")
        log.error(kv(event="report_failed", uid=uid, error=f"{type(exc).__name__}: {exc}", tries=tries,
                     retry_in=round(delay, 1)), exc_info=exc)

    def _study_items(self, row: StudyRow, files: list[FileRow]) -> list[Radiograph | FileOutcome] | None:
        """The study's files as records to screen or outcomes to list; None to wait (a file is changing)."""
        o, uid = self.options, row.study_uid
        items: list[Radiograph | FileOutcome] = []
        for f in files:
            location = Path(f.location)
            if f.status in ("skipped", "failed"):
                outcome = FileOutcome(location, Status(f.status), f.reason, step=f.step, tag=f.tag, study_uid=uid)
                if f.status == "skipped" and changes_its_study(f.step, f.tag):
                    outcome = self._read_again(f, outcome)
                items.append(outcome)
                continue
            try:
                st = location.stat()
            except OSError:
                items.append(FileOutcome(location, Status.FAILED, "the file disappeared before it was screened",
                                         step="read", study_uid=uid))
                continue
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                if location.is_relative_to(self.inbox):
                    return None       # being rewritten in the inbox: the observer takes the new content
                items.append(FileOutcome(location, Status.FAILED, "changed after it was taken (size or mtime "
                                         "differs from the ledger)", step="read", study_uid=uid))
                continue
            record = read_record(location, o.selection)
            items.append(dataclasses.replace(record, study_uid=uid))
        return items

    def _read_again(self, f: FileRow, outcome: FileOutcome) -> FileOutcome:
        """A skipped presentation state or rejection note read again, to carry what it does to its study's images;
        as the ledger has it (changing nothing) when it has changed or cannot be read since it was taken."""
        location = Path(f.location)
        try:
            st = location.stat()
        except OSError:
            st = None
        record = read_record(location) if st is not None and (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns) \
            else None
        if record is None:
            log.warning(kv(event="note_not_applied", path=f.location, reason="changed or gone since it was taken"))
        if not isinstance(record, FileOutcome) or (record.presentation is None and record.rejection is None):
            return outcome
        return dataclasses.replace(outcome, presentation=record.presentation, rejection=record.rejection)

    def _start_report(self, result: StudyResult, work: _StudyWork,
                      extra_skipped: list[FileOutcome] = ()) -> _Reporting:
        """What the ledger will record of this study, and its report handed to the report writer."""
        row = work.row
        result.failed.extend(work.prior_failed)
        outcomes: dict[int, tuple] = {}
        failed: list[FileOutcome] = []
        for item in result.images:
            outcomes[work.files[str(item.image.path)].id] = ("scored", "", "", "")
        for outcome in [*result.failed, *result.study.skipped, *extra_skipped]:
            f = work.files.get(str(outcome.path))
            if f is not None and f.status in ("pending", "scored"):
                outcomes[f.id] = (outcome.status.value, outcome.step, outcome.tag, outcome.reason)
                if outcome.status is Status.FAILED:
                    failed.append(outcome)
        version = row.version + 1
        job = _Reporting(result, work, version, row.report_base, "", outcomes, failed)
        if result.images:
            job.base = job.base or report_filename(result.study)
            job.report = report_name(job.base, version)
            amendment = ""
            if version > 1:
                added = ", ".join(work.added) or ("none" if work.notes else "none (re-screened)")
                amendment = (f"Amended report, version {version}: supersedes version {version - 1} ({row.report}), "
                             f"which is kept unchanged. Images added since: {added}."
                             + (f" Presentation states and rejection notes added since: {', '.join(work.notes)}."
                                if work.notes else ""))
            job.writing = self._reporter.submit(functools.partial(
                make_report, self.out / job.report, result, threshold=self.threshold,
                operating_point=self.operating, model_name=self.model.path.name, model_sha256=self.model.sha256,
                population=self.model.card.trained_on, amendment=amendment, version=version,
                dicom=self.out / dicom_report_name(job.report) if self.options.dicom else None))
        return job

    def _finish(self, job: _Reporting) -> None:
        """Once its report is written: record the study (one transaction), log it, move its files."""
        result, uid = job.result, job.work.row.study_uid
        dicom = None
        if job.writing is not None:
            try:
                dicom = job.writing.result()
            except (OSError, OutputError):
                release(result)
                raise   # the disk: the round fails, and its studies wait (see _screen_ready)
            except Exception as exc:    # this study's report cannot be made: it alone waits, the round goes on
                self._report_failed(result, exc)
                return
            self.reports_written += 1
        self.failed_files += len(job.failed)
        score, flag = result.score, ("yes" if result.score >= self.threshold else "no") if job.report else ""
        first = result.study.first
        identity = first.identifiers() if first else {}
        reason = "; ".join(f"{x.path.name}: {x.reason}" for x in result.failed)
        if not job.report and not result.failed:       # nothing failed, nothing left to screen
            withdrawn = any(tag == REJECTED_TAG for _, _, tag, _ in job.outcomes.values())
            reason = ("every image of it is withdrawn by a rejection note" if withdrawn else
                      "no image of it is left to screen") + "; not screened" + (
                f" (its report version {job.work.row.version}, {job.work.row.report}, no longer stands)"
                if job.work.row.version else "")
            log.warning(kv(event="study_withdrawn", uid=uid, reason=reason))
        self.ledger.record_study(uid, version=job.version, report_base=job.base, report=job.report, score=score,
                                 flag=flag, threshold=self.threshold, model_sha256=self.model.sha256,
                                 identity=identity, outcomes=job.outcomes, reason=reason, warning=result.warning,
                                 appearance=result.appearance, appearance_caution=result.appearance_caution,
                                 unscored_frames=result.unscored_frames)
        if self.options.dicom and not job.report and job.work.row.version:    # its reports stand no more
            self._withdraw_dicom_reports(job.work.row, [reason for _, _, tag, reason in job.outcomes.values()
                                                        if tag == REJECTED_TAG])
        self._held.pop(uid, None)
        release(result)
        for outcome in job.failed:
            _log_file("failed", outcome.path, outcome.step, outcome.tag, outcome.reason, uid)
        log.info(kv(event="study", uid=uid, version=job.version if job.report else None,
                    status="reported" if job.report else "failed" if result.failed else "withdrawn", score=score,
                    flag=flag or None,
                    images=len(result.images), failed=len(result.failed), skipped=len(result.study.skipped),
                    seconds=round(time.monotonic() - self._round_started, 2),
                    waited=round(time.time() - job.work.row.last_arrival, 1), report=job.report or None,
                    dicom=dicom.name if dicom else None,
                    caution=brief_caution(result.warning, result.appearance_caution, result.unscored_frames) or None))
        for f in self.ledger.study_files(uid):
            self._relocate(f)

    # ------------------------------------------------------------------ archive and quarantine

    def _relocate(self, f: FileRow | None) -> None:
        """Move a handled file out of the inbox: failed -> quarantine, scored/skipped -> archive (if set)."""
        if f is None or f.location != f.inbox_path or f.status == "pending":
            return
        if not_regular(f.location):    # a FIFO or dangling link stays: a copy across filesystems would open it
            return
        root = self.options.quarantine if f.status == "failed" else self.options.archive
        if root is None:
            return
        arrived = Path(f.inbox_path)
        relative = arrived.relative_to(self.inbox) if arrived.is_relative_to(self.inbox) else Path(arrived.name)
        dest = _free_path(Path(root) / relative)
        self.ledger.begin_move(f.id, str(dest))
        self._finish_move(f, dest)

    def _finish_move(self, f: FileRow, dest: Path) -> None:
        src = Path(f.location)
        try:
            if f.status == "failed":
                dest.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(dest.with_name(dest.name + ".reason.txt"), "w") as handle:
                    handle.write(f"file: {f.inbox_path}\nstatus: failed\nstep: {f.step}\ntag: {f.tag}\n"
                                 f"reason: {f.reason}\nsize: {f.size}\nsha256: {f.sha256}\n"
                                 f"taken: {time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(f.taken_at))}\n"
                                 f"by: cxrscreen {__version__}\n")
            if src.exists():
                move_file(src, dest)
            elif not dest.exists():
                log.error(kv(event="move_lost", path=src, dest=dest, note="neither the file nor its copy exists"))
                self.ledger.end_move(f.id, None)
                return
        except OSError as exc:   # e.g. a read-only inbox: leave the file where it is, and say so
            log.error(kv(event="move_failed", path=src, dest=dest, error=exc))
            self.ledger.end_move(f.id, str(src))
            return
        self.ledger.end_move(f.id, str(dest))
        self.known.pop(str(src), None)
        log.info(kv(event="quarantined" if f.status == "failed" else "archived", path=src, to=dest))

    # ------------------------------------------------------------------ summary and worklist

    def _pending_row(self, s: StudyRow) -> dict:
        """The summary row of a study never reported yet, or whose report was withdrawn: its identity from its
        files' headers, and why it waits (its files are still coming, or the error it waits out)."""
        files = self.ledger.study_files(s.study_uid)
        known = next((f for f in files if f.patient_id or f.accession), files[0] if files else None)
        why = f"not reported yet: screened once no new file of it has come for {self.options.settle:g} s (--settle)"
        if s.version and s.reason:      # its report was withdrawn (every image), and a new file came since
            why = f"{s.reason}; {why}"
        return study_row(s.study_uid, self.threshold, status="pending",
                         patient_id=known.patient_id if known else "", patient_name=known.patient_name if known else "",
                         accession=known.accession if known else "",
                         study_date=known.study_date if known else "", files=[f.location for f in files],
                         reason=self._held.get(s.study_uid) or why)

    def _reported_or_waiting(self, uid: str) -> bool:
        """Whether the ledger has a row of its own for this study in the summary (reported, pending or failed),
        rather than one made from its skipped files (one whose every image a rejection note withdrew)."""
        row = self.ledger.study(uid)
        return row is not None and bool(row.version or row.status != "done")

    def _rejection_note_of(self, s: StudyRow) -> dict:
        """``{"rejection_note": name}`` when the withdrawn study ``s`` has a rejection note of its .dcm reports."""
        note = rejection_note_name(s.report_base) if s.report_base else ""
        return {"rejection_note": note} if note and (self.out / note).is_file() else {}

    def _summary_wanted(self, busy: bool) -> bool:
        """Whether the summary and worklist are to be rewritten now that something changed: once the inbox is
        quiet (or SUMMARY_EVERY after a rewrite failed), and while studies come every SUMMARY_EVERY seconds or
        twenty times as long as the last rewrite took, so that it never takes more than 5% of a burst (as
        batch's checkpoints): a window of 20,000 studies (``--worklist-days``) takes 12 s to write."""
        since = time.monotonic() - self._summary_at
        return self._summary_due and (since > max(SUMMARY_EVERY, 20 * self._summary_cost)
                                      or not busy and since > self._summary_gap)

    def _write_summary(self) -> None:
        started = time.monotonic()
        days = self.options.worklist_days
        since = time.time() - days * 86400 if days else 0.0
        rows = []
        for s in self.ledger.recent_studies(since):
            standing = s.stands
            if not standing and s.status == "pending":      # not reported (or withdrawn) yet: listed, with why it waits
                rows.append(self._pending_row(s))
                continue
            if s.withdrawn:      # listed as batch lists a study with no image left: skipped, why, not flagged
                rows.append(study_row(s.study_uid, self.threshold, status="skipped", patient_id=s.patient_id,
                                      patient_name=s.patient_name, accession=s.accession, study_date=s.study_date,
                                      version=s.version, reason=s.reason, withdrawn_report=s.report,
                                      files=[f.location for f in self.ledger.study_files(s.study_uid)],
                                      **self._rejection_note_of(s)))
                continue
            if not standing and s.status != "failed":
                continue
            rows.append(study_row(s.study_uid, self.threshold, status="scored" if standing else "failed",
                                  flag=s.flag or "no", score=round(s.score, 6) if standing else "",
                                  patient_id=s.patient_id, patient_name=s.patient_name, accession=s.accession,
                                  study_date=s.study_date, report=s.report if standing else "", version=s.version,
                                  pending_amendment=s.status == "pending",
                                  warning=s.warning, appearance=round(s.appearance, 3) if s.appearance is not None
                                  else "", appearance_caution=s.appearance_caution,
                                  unscored_frames=s.unscored_frames if standing else "",
                                  files=[f.location for f in self.ledger.study_files(s.study_uid)],
                                  reason="; ".join(x for x in (s.reason, self._held.get(s.study_uid, "")
                                                               if s.status == "pending" else "") if x)))
        outcomes = [FileOutcome(Path(f.location or f.inbox_path), Status(f.status), f.reason, step=f.step, tag=f.tag,
                                study_uid=f.study_uid, patient_id=f.patient_id, accession=f.accession,
                                study_date=f.study_date, patient_name=f.patient_name)
                    for f in self.ledger.failed_and_skipped(since)]
        files = file_rows(outcomes)
        listed = {r["study_uid"] for r in rows}
        # a study the ledger knows (pending, screened earlier, failed) is not "unscreened"
        rows = rank_rows(rows + unscreened_study_rows(
            files, self.threshold, lambda uid: uid in listed or self._reported_or_waiting(uid))) + files
        meta = {"tool_version": __version__, "mode": "watch", "inbox": str(self.inbox), "model": str(self.model.path),
                "model_sha256": self.model.sha256, "compute": self.model.compute, "threshold": self.threshold,
                "operating_point": self.operating,
                "appearance_limit": self.model.appearance.limit if self.model.appearance else None,
                "selection": self.options.selection.as_json(), "ledger": str(self.options.state_file),
                "worklist_days": days or "all", **self.ledger.counts()}
        self._summary_at = time.monotonic()
        try:
            write_summary(self.out, rows, meta)
            write_worklist(self.out / "worklist.pdf", rows, meta)
        except OSError as exc:   # disk full, permissions: the reports and the ledger are what matter; try again later
            log.error(kv(event="summary_failed", out=self.out, error=exc.strerror or str(exc),
                         path=exc.filename, retry_in=SUMMARY_EVERY))
            self._summary_gap = SUMMARY_EVERY
            return
        finally:
            self._summary_cost = time.monotonic() - started
        self._summary_due, self._summary_gap = False, 0.0
