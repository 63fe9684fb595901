"""The batch job: ingest -> normalise -> batch -> predict -> explain -> report.

:func:`run_batch` wires the stages and nothing else. Headers are scanned first
(cheap, no pixels) so studies are known before any image is decoded; pixels are
then decoded by a pool of worker threads, at most ``2 x batch_size`` images
ahead of inference, so memory stays flat however large the folder. Batches
mix images of different studies; a study's report is written as soon as its
last image is scored, and its pixels are released.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import LOG_FORMAT, __version__
from .encapsulate import (dicom_images, dicom_report_name, rejection_code, rejection_note_name, withdrawn_description,
                          write_encapsulated_pdf, write_rejection_note)
from .errors import CxrError, InputError, Interrupted, ModelError, OutputError, StoppedAtOnce, UsageError
from .explain import GradCam, overlay
from .infer import LoadedModel, load_model
from .ingest import (REJECTED_TAG, Selection, group_studies, read_ahead, scan, selection_options_text,
                     withdrawn_title)
from .normalise import load_unit_image, pixels_digest, to_model_input
from .records import FileOutcome, Radiograph, Status, Study
from .report import (SUMMARY_FIELDS, ImageResult, StudyResult, atomic_write, report_filename, write_study_report,
                     write_summary, write_worklist)

STATE_FILE = ".cxrscreen-state.json"
OUTPUT_LOCK = ".cxrscreen.lock"
THUMBNAIL_SIDE = 512

log = logging.getLogger("cxrscreen")


@dataclass(frozen=True)
class BatchOptions:
    out: Path
    model_path: Path | None = None
    threshold: float | None = None
    batch_size: int = 16
    workers: int = 2
    gradcam: str = "all"               # all | flagged | none
    calibration: Path | None = None    # default: the newest calibration file made for this model
    force: bool = False
    selection: Selection = Selection()  # which images are screened (lateral views, other body parts, site names)
    dicom: bool = False                # also write each report as a DICOM Encapsulated PDF (cxrscreen.encapsulate)
    # Processes that write the reports: 0, a thread of this process; None, report_processes() decides (what
    # the CLI asks for). Not by default in the library: a report process is spawned, and spawning runs the
    # caller's main script again in it unless that script guards itself with `if __name__ == "__main__":`.
    report_processes: int | None = 0

    def __post_init__(self) -> None:
        check_screening_options(self.gradcam, self.batch_size, self.workers, self.threshold)
        if self.report_processes is not None and self.report_processes < 0:
            raise UsageError("--report-processes must be 0 (a thread) or more")


# Fewer studies than this are reported by a thread: starting a process costs about a second.
PROCESS_REPORTS_FROM = 64


def report_processes(studies: int, cpus: int | None = None) -> int:
    """How many processes write the PDF reports of ``studies`` new studies by default: one per four CPUs,
    at most four, from ``PROCESS_REPORTS_FROM`` studies; else 0 (a thread of the screening process).

    reportlab is pure Python: one thread writes about 70 reports a second, and on a GPU server it is what
    the run waits for. A machine of two CPUs gets 0: there the model needs both."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus // 4) if studies >= PROCESS_REPORTS_FROM else 0


def report_executor(processes: int) -> Executor:
    """``processes`` report processes (spawned: the model's threads are not forked), or one thread when 0
    or when this system cannot run them (no working semaphores, e.g. a container without /dev/shm)."""
    if processes:
        try:
            return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_report_process,
                                       initargs=(logging.getLogger().getEffectiveLevel(),))
        except (OSError, ImportError, NotImplementedError) as exc:
            log.warning("report processes unavailable (%s): the reports are written by a thread", exc)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-report")


def _start_report_process(level: int) -> None:
    """Run in each report process as it starts: its log lines (a DICOM report written with warnings) take the
    CLI's format and the screening process's level, and the stop signals are left to the parent."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    _leave_stop_signals_to_the_parent()


def _leave_stop_signals_to_the_parent() -> None:
    """SIGINT and SIGTERM are ignored in a report process. Stopping is the
    screening process's decision (it finishes the reports under way): a terminal's Ctrl-C reaches the
    whole process group, and systemd's stop signals every process of the service, which killed the report
    processes mid-report (their reports were then written again by the screening process, with a
    traceback from each on the way). They end when the screening process shuts its pool down."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Studies whose reports may be under way while the model scores, in batches (bounds the thumbnails held).
REPORTS_AHEAD_BATCHES = 2


@dataclass
class ReportJob:
    """One study's report, handed to a :class:`ReportWriter`."""
    future: Future
    make: Callable[[], Path | None]      # writes it in this process

    def result(self) -> Path | None:
        """Wait for the report (what ``make`` returns); written here when its report process died first."""
        try:
            return self.future.result()
        except BrokenProcessPool:
            return self.make()


class ReportWriter:
    """Writes the reports of ``batch`` and ``watch`` in the background (:func:`report_executor`). A report
    process that dies (killed, out of memory) breaks its pool: the reports it held are written by the
    screening process when waited for (:meth:`ReportJob.result`), the later ones by a thread, and
    ``lost_note`` is logged once."""

    def __init__(self, processes: int, lost_note: str) -> None:
        self._executor = report_executor(processes)
        self._lost_note = lost_note

    def submit(self, make: Callable[[], Path | None]) -> ReportJob:
        try:
            return ReportJob(self._executor.submit(make), make)
        except BrokenProcessPool:
            log.warning(self._lost_note)
            self._executor.shutdown(wait=False)
            self._executor = report_executor(0)
            return ReportJob(self._executor.submit(make), make)

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        self._executor.shutdown(wait=True, cancel_futures=cancel_futures)


def make_report(path: Path, result: StudyResult, *, threshold: float, operating_point: dict, model_name: str,
                model_sha256: str, population: str, dicom: Path | None, amendment: str = "",
                version: int = 1) -> Path | None:
    """Write one study's PDF report (and its DICOM copy at ``dicom``), in this process or in a report
    process (module level, so that it pickles), for ``batch`` and ``watch`` alike. ``amendment`` and
    ``version``: an amended report of ``watch``. Returns the DICOM report written (None: none asked, or
    no image of the study is DICOM)."""
    with _writing(path, "write the report"):
        write_study_report(path, result, threshold=threshold, operating_point=operating_point,
                           model_name=model_name, model_sha256=model_sha256, amendment=amendment,
                           population=population)
    if dicom is None:
        return None
    with _writing(dicom, "write the DICOM report"):
        return write_encapsulated_pdf(dicom, path, [r.image for r in result.images], version=version)


def check_screening_options(gradcam: str, batch_size: int, workers: int, threshold: float | None) -> None:
    """The checks batch and watch share (the options of ``cli.screening_options``)."""
    if gradcam not in ("all", "flagged", "none"):
        raise UsageError(f"--gradcam must be all, flagged or none, not {gradcam!r}")
    if batch_size < 1 or workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"--threshold {threshold} is outside [0, 1]")


@dataclass
class BatchSummary:
    rows: list[dict]
    studies: int = 0
    unscreened_studies: int = 0    # studies none of whose files could be screened (counted in studies)
    flagged: int = 0
    outside_population: int = 0    # scored studies whose patient is outside the model card's age range
    unfamiliar: int = 0            # scored studies with an image unlike the training radiographs (appearance)
    unscored_frames: int = 0       # frames 2..N of multi-frame images (only frame 1 is scored)
    scored_images: int = 0
    reused: int = 0
    skipped_files: int = 0
    failed_files: int = 0
    failed_reports: int = 0        # scored studies whose report could not be made (their rows say why)
    pending: int = 0               # studies not screened because the run was stopped (``stop``) before them
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        """Whether the run was stopped before some study (a stop after the last one changes nothing)."""
        return self.pending > 0

    @property
    def exit_code(self) -> int:
        """0 when every input was scored or deliberately skipped, 1 when some failed or were not screened."""
        return 1 if self.failed_files or self.failed_reports or self.interrupted else 0

    def to_json(self) -> dict:
        return {"studies": self.studies, "unscreened_studies": self.unscreened_studies, "flagged": self.flagged,
                "outside_population": self.outside_population, "unfamiliar_studies": self.unfamiliar,
                "unscored_frames": self.unscored_frames,
                "scored_images": self.scored_images,
                "reused_studies": self.reused, "skipped_files": self.skipped_files,
                "failed_files": self.failed_files, "failed_reports": self.failed_reports,
                "interrupted": self.interrupted, "pending_studies": self.pending,
                "seconds": round(self.seconds, 2), **self.meta,
                "rows": self.rows}


def _run_key(model: LoadedModel, threshold: float, gradcam: str) -> str:
    """What every study's key shares in one run: the model, its card (a card edit such as its population
    redoes studies), the threshold, the Grad-CAM mode and the tool version."""
    card = json.dumps(model.card.raw, sort_keys=True, default=str)
    return f"{model.sha256}|{card}|{threshold!r}|{gradcam}|{__version__}"


def _study_key(study: Study, run_key: str) -> str:
    digest = hashlib.sha256(run_key.encode())
    for path in sorted(str(p) for p in study.source_files):
        # surrogateescape: a file name that is not UTF-8 hashes as its bytes, where "strict" raised
        try:
            stat = Path(path).stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{path}|missing".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _reports_no_longer_standing(unscreened: list[dict], earlier: dict, out: Path, file_rows: list[dict],
                                dicom: bool) -> dict:
    """Of the studies with nothing screened in this run, those skipped (every image withdrawn by a rejection
    note, or left out by the options) whose report an earlier run wrote into this folder: each row's reason
    says that the report, still on disk, no longer stands. With ``dicom``, a study whose images rejection notes
    withdrew and whose report was written as ``.dcm`` too gets a rejection note of that ``.dcm`` (once), for a
    PACS it was sent to; one left out by the options gets none (its images still stand). Returns their
    entries for the run's state, so the next run says so too."""
    titles: dict[str, set] = {}          # study -> the reasons of the notes that withdrew its images
    for r in file_rows:
        if r["tag"] == REJECTED_TAG:
            titles.setdefault(r["study_uid"], set()).add(withdrawn_title(r["reason"]))
    kept = {}
    for row in unscreened:
        uid = row["study_uid"]
        entry = earlier.get(uid) or {}
        report = entry.get("withdrawn_report") or entry.get("row", {}).get("report", "")
        if row["status"] != "skipped" or not report or not (out / report).is_file():
            continue
        row["reason"] += f"; its report of an earlier run into this folder, {report}, no longer stands"
        row["withdrawn_report"] = report      # the worklist says so where the report's link would be
        dcm = dicom_report_name(report)
        sent = dcm if (out / dcm).is_file() else ""
        note = entry.get("rejection_note", "")
        if note and not (out / note).is_file():
            note = ""                         # removed since: written again with --dicom, else not named
        if dicom and uid in titles and sent and not note:
            note = rejection_note_name(report)
            try:
                with _writing(out / note, "write the rejection note of the study's DICOM report"):
                    written = write_rejection_note(out / note, [out / sent], rejection_code(titles[uid]),
                                                   withdrawn_description(uid, titles[uid]))
            except Exception as exc:        # after screening: the run's state is still saved, the next run retries
                cause = (exc.cause if isinstance(exc, OutputError) else
                         f"cannot write the rejection note of the study's DICOM report: {type(exc).__name__}: {exc}")
                log.error("%s: %s", out / note, cause)
                row.update(status="failed", step="report", reason=f"{row['reason']}; {cause}")
                written = None
            note = written.name if written else ""
        if note:
            row["rejection_note"] = note
            named = f" {sent}" if sent else ""
            row["reason"] += f"; rejection note {note} withdraws its DICOM report{named} on the PACS"
        kept[uid] = {"withdrawn_report": report, "rejection_note": note}
    return kept


def _load_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _prepare(image: Radiograph, spec) -> tuple[np.ndarray, np.ndarray]:
    """Decode and normalise one image: (model input, thumbnail unit image)."""
    import cv2

    unit = load_unit_image(image.path, image.kind, image.presentation)
    scale = THUMBNAIL_SIDE / max(unit.shape)
    thumb = cv2.resize(unit, (max(1, round(unit.shape[1] * scale)), max(1, round(unit.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else unit
    return to_model_input(unit, spec), thumb


def _decoded_stream(images: list[Radiograph], spec, workers: int, ahead: int):
    """Yield (image, (model_input, thumbnail) or CxrError) in order, decoding ``ahead`` images in advance."""
    def task(image):
        try:
            return _prepare(image, spec)
        except CxrError as exc:
            return exc.with_path(image.path)
        except Exception as exc:  # a decoder bug must fail one file, never the batch
            return InputError(f"{type(exc).__name__}: {exc}", path=image.path, step="normalise")

    # a consumer that stops early (watch on SIGTERM) does not wait for the queued decodes
    yield from read_ahead(task, images, threads=workers, ahead=ahead, name="cxr-decode")


class Screener:
    """The model, threshold and Grad-CAM, set up once: turns studies into scored :class:`StudyResult` s.

    Batches mix images of different studies; :meth:`screen` yields each study as soon as its
    last image is scored (or has failed), so a caller can report it and release its pixels.
    Used by ``batch``, ``watch`` and ``calibrate`` alike, so all three score identically.
    When the model has an appearance reference (:mod:`cxrscreen.appearance`), every image's appearance
    distance comes from the same forward pass as its score, whatever the Grad-CAM mode. ``digests``: each
    :class:`ImageResult` gets a digest of its model input (``pixels``: the same picture, as the model sees it).
    """

    def __init__(self, model: LoadedModel, threshold: float = 0.5, *, gradcam: str = "all", batch_size: int = 16,
                 workers: int = 2, thumbnails: bool = True, digests: bool = False) -> None:
        self.model, self.threshold, self.gradcam = model, threshold, gradcam
        self.batch_size, self.workers, self.thumbnails = batch_size, workers, thumbnails
        self.digests = digests
        self.appearance = model.appearance
        wanted = gradcam != "none" or self.appearance is not None
        self.cam = (GradCam(model.screening_model, model.card.gradcam_layer or None, batch_size=batch_size)
                    if wanted else None)
        if self.appearance is not None and self.cam.method != "forward":
            raise ModelError(f"{model.path}: the card names an appearance reference, but the model's head is not "
                             f"global pooling and one Dense unit, whose pooled features it measures",
                             step="load-model")

    def screen(self, studies: list[Study], *,
               progress: Callable[[int, int, int], None] | None = None) -> Iterator[StudyResult]:
        population = self.model.card.population
        results = {study.study_uid: StudyResult(study, warning=population.age_warning(study.first.age_years)
                                                if population and study.first else "")
                   for study in studies}
        remaining = {uid: len(r.study.images) for uid, r in results.items()}
        images = [image for study in studies for image in study.images]
        finished: deque[StudyResult] = deque(r for uid, r in results.items() if remaining[uid] == 0)
        done = failed = 0     # images scored or failed; of them failed

        def one_done(uid: str) -> None:
            remaining[uid] -= 1
            if remaining[uid] == 0:
                finished.append(results[uid])

        def flush(batch: list[tuple[Radiograph, np.ndarray, np.ndarray]]) -> None:
            nonlocal done
            if not batch:
                return
            inputs = np.stack([b[1] for b in batch])
            heatmaps = [None] * len(batch)
            distances = [None] * len(batch)
            if self.gradcam == "all" or self.appearance is not None:
                scores, cams, pooled = self.cam.run(inputs)
                if self.gradcam != "none":
                    heatmaps = [c if self.gradcam == "all" or s >= self.threshold else None
                                for s, c in zip(scores, cams)]
                if self.appearance is not None:
                    distances = [float(d) for d in self.appearance.distances(pooled)]
            else:
                scores = self.model.predict(inputs, self.batch_size)
                hot = [i for i, s in enumerate(scores) if s >= self.threshold] if self.gradcam == "flagged" else []
                if hot:
                    _, cams = self.cam(inputs[hot])
                    for i, c in zip(hot, cams):
                        heatmaps[i] = c
            for (image, prepared, thumb), score, heat, distance in zip(batch, scores, heatmaps, distances):
                results[image.study_uid].images.append(
                    ImageResult(image, float(score), thumb if self.thumbnails else None,
                                overlay(thumb, heat) if heat is not None else None,
                                heat_empty=heat is not None and float(heat.max()) == 0.0, appearance=distance,
                                appearance_caution=self.appearance.caution(distance, image.path.name)
                                if distance is not None else "",
                                pixels=pixels_digest(prepared) if self.digests else ""))
                one_done(image.study_uid)
            done += len(batch)
            if progress:
                progress(done, len(images), failed)
            batch.clear()

        batch: list = []
        while finished:
            yield finished.popleft()
        for image, prepared in _decoded_stream(images, self.model.card.preprocessing, self.workers,
                                               2 * self.batch_size):
            if isinstance(prepared, CxrError):
                results[image.study_uid].failed.append(FileOutcome.from_error(prepared, **image.identifiers()))
                done += 1
                failed += 1
                one_done(image.study_uid)
                if progress:
                    progress(done, len(images), failed)
            else:
                batch.append((image, prepared[0], prepared[1]))
                if len(batch) >= self.batch_size:
                    flush(batch)
            while finished:
                yield finished.popleft()
        flush(batch)
        while finished:
            yield finished.popleft()


def run_batch(inputs: list[Path], options: BatchOptions, *,
              progress: Callable[[int, int, int], None] | None = None, model: LoadedModel | None = None,
              stop: threading.Event | None = None) -> BatchSummary:
    """Screen every input; write reports, summary.csv/json and worklist.pdf into ``options.out``.
    ``progress(done, total, failed)`` is called as images are scored or fail (``done`` counts both).

    ``options.out`` is held for the whole run (:func:`output_lock`): a second batch, or a watch daemon,
    writing into it at the same time is refused.

    ``stop`` (the CLI sets it on SIGTERM or Ctrl-C): once set, no further study is screened; the reports
    under way are finished, and the summary and worklist are written with every study not screened listed
    as ``pending`` (``summary.interrupted``, exit code 1); a re-run reuses the studies reported and
    screens the rest. Set while the headers are still being read, the run raises :class:`Interrupted`
    and writes nothing. The run's state is also saved while it runs (:data:`CHECKPOINT_SECONDS`), so a run
    that is killed outright (``kill -9``, a power cut, the OOM killer) is resumed the same way."""
    started = time.time()
    for item in inputs:
        if not Path(item).exists():
            raise UsageError(f"input {item} does not exist")
    out = Path(options.out)
    if any(out.exists() and Path(item).is_dir() and out.samefile(item) for item in inputs):
        raise UsageError(f"--out {out} is the folder to screen: give the reports a folder of their own "
                         "(it may lie inside the one screened)")
    kept: dict = {}
    with output_lock(out, "cxrscreen batch"):
        try:
            return _run_batch(inputs, options, out, started, progress, model, stop or threading.Event(), kept)
        except KeyboardInterrupt as exc:
            if "state" not in kept:         # while the model loaded or the headers were read: nothing to keep
                raise
            raise _keep_reported(out, kept) from exc


def _keep_reported(out: Path, kept: dict) -> StoppedAtOnce:
    """A batch stopped at once (a second Ctrl-C): the state of the studies reported so far saved now, as a
    checkpoint would save it (the last may be 30 seconds old): each whose report is all there, no other."""
    state = kept["state"]
    for result, report, _, study_state in kept.get("jobs", ()):
        if report.future.done() and not report.future.cancelled() and report.future.exception() is None:
            state[result.study.study_uid] = study_state
    try:
        _save_state(out, state)
        saved = True
    except OSError:
        saved = False
    return StoppedAtOnce(len(state), saved=saved, summary=kept.get("summary", False))


def _until_stopped(items: Iterator, stop: threading.Event) -> Iterator:
    """``items``, until ``stop`` is set: then Interrupted (the headers are read before anything is written)."""
    for item in items:
        if stop.is_set():
            raise Interrupted("stopped while reading the headers, before screening began: nothing was written",
                              step="scan")
        yield item


def _run_batch(inputs: list[Path], options: BatchOptions, out: Path, started: float,
               progress: Callable[[int, int, int], None] | None, model: LoadedModel | None,
               stop: threading.Event, kept: dict) -> BatchSummary:
    """:func:`run_batch` in its output lock. ``kept`` is given the run's state (``state``) and its report jobs
    (``jobs``) once they exist, and ``summary`` once it writes the summary: what a stop at once keeps and
    says (:func:`_keep_reported`)."""
    # the card and the file's digest now (a model that does not fit its card fails before anything is read);
    # the Keras model once there is a study to score: a re-run that finds every study reported starts no backend
    model = model or load_model(options.model_path, keras=False)
    threshold, operating, calibration = resolve_threshold(model, options.threshold, options.calibration,
                                                          options.selection)

    studies, loose = group_studies(_until_stopped(scan(inputs, options.selection), stop))
    earlier = _load_state(out)
    state = {} if options.force else earlier
    new_state: dict = kept.setdefault("state", {})
    to_score: list[Study] = []
    reused_rows: list[dict] = []
    reused_failures: list[FileOutcome] = []
    run_key = _run_key(model, threshold, options.gradcam)
    keys: dict[str, str] = {}       # taken before scoring: a file changed during the run is redone next time
    for study in studies:
        key = keys[study.study_uid] = _study_key(study, run_key)
        previous = state.get(study.study_uid)
        # a row written by an older cxrscreen that lacks a column of today's rows is redone, not reused
        if (previous and previous.get("key") == key and previous["row"].keys() >= set(SUMMARY_FIELDS)
                and (out / previous["row"].get("report", "")).is_file()):
            if options.dicom and not _dicom_written(previous.get("dicom"), out):
                # asked for now, or its .dcm was removed: made from the report already there, not re-scored
                failed = {f["path"] for f in previous.get("failed", [])}
                report = out / previous["row"]["report"]
                with _writing(out / dicom_report_name(report.name), "write the DICOM report"):
                    written = write_encapsulated_pdf(out / dicom_report_name(report.name), report,
                                                     [img for img in study.images if str(img.path) not in failed])
                previous = {**previous, "dicom": written.name if written else ""}
            reused_rows.append({**previous["row"], "reused": True})
            new_state[study.study_uid] = previous
            # files of the study that failed last time still failed: they must not vanish from the summary
            reused_failures.extend(FileOutcome(Path(f["path"]), Status.FAILED, f["reason"], step=f["step"],
                                               tag=f["tag"], study_uid=study.study_uid)
                                   for f in previous.get("failed", []))
            continue
        to_score.append(study)

    if to_score and not stop.is_set():
        model.load_keras()
        screener = Screener(model, threshold, gradcam=options.gradcam, batch_size=options.batch_size,
                            workers=options.workers)
        stream = screener.screen(to_score if not stop.is_set() else [], progress=progress)   # stopped meanwhile
    else:
        stream = (result for result in ())
    rows: list[dict] = []
    results: list[StudyResult] = []

    # Reports are written in the background while the model scores: by one thread (reportlab is
    # Python-bound, inference runs in the backend's threads with the GIL released), or, for a large run on
    # a machine with CPUs to spare, by report processes (report_processes()). At most 2 batches wait.
    reporter = ReportWriter(options.report_processes if options.report_processes is not None
                            else report_processes(len(to_score)),
                            lost_note="a report process stopped; the remaining reports are written by a thread")
    report_jobs: deque = kept.setdefault("jobs", deque())
    saved = _Checkpoints(out)

    def write_report(result: StudyResult, path: Path) -> ReportJob:
        return reporter.submit(functools.partial(
            make_report, path, result, threshold=threshold, operating_point=operating, model_name=model.path.name,
            model_sha256=model.sha256, population=model.card.trained_on,
            dicom=out / dicom_report_name(path.name) if options.dicom else None))

    def wait_for(job: tuple[StudyResult, ReportJob, dict, dict]) -> None:
        result, report, row, state = job
        uid = result.study.study_uid
        try:
            report.result()
            new_state[uid] = state       # recorded once its report is all there, else the next run redoes it
            saved.maybe(new_state)
        except Exception as exc:
            if isinstance(exc, OutputError):
                raise
            # A report that cannot be made (a bug, an input no test foresaw) fails its study, not the batch:
            # the row keeps its score and flag, says why, and the run exits 1.
            log.error("the report of study %s could not be made", uid, exc_info=exc)
            made = (out / row["report"]).is_file()      # the PDF, when only its .dcm failed
            row.update(status="failed", step="report", report=row["report"] if made else "",
                       reason="; ".join(x for x in (row["reason"], f"its report could not be made: "
                                                    f"{type(exc).__name__}: {exc}") if x))
        finally:
            release(result)

    def wait_for_first() -> None:
        """The oldest report job waited for, then dropped: a stop at once while it waits keeps it in ``kept``."""
        wait_for(report_jobs[0])
        report_jobs.popleft()

    try:
        for result in stream:
            results.append(result)
            row = _study_row(result, threshold)
            if result.images:
                dicom = dicom_report_name(row["report"]) if dicom_images([r.image for r in result.images]) else ""
                state = {"key": keys[result.study.study_uid], "row": row,
                         # the DICOM report: its name, "" when the study has none to have (JPEG/PNG), None when not asked
                         "dicom": dicom if options.dicom else None,
                         "failed": [{"path": str(o.path), "reason": o.reason, "step": o.step, "tag": o.tag}
                                    for o in result.failed]}
                report_jobs.append((result, write_report(result, out / row["report"]), row, state))
                while len(report_jobs) > REPORTS_AHEAD_BATCHES * options.batch_size:
                    wait_for_first()
            rows.append(row)
            if stop.is_set():        # SIGTERM or Ctrl-C: this study is reported, the rest are left pending
                stream.close()
                break
        while report_jobs:
            wait_for_first()
    except OutputError as exc:
        # The output cannot be written (disk full, permissions): every later report would fail too, so
        # stop, and keep the state of the studies already reported, so that a re-run goes on from them.
        stream.close()
        for job in report_jobs:
            try:
                wait_for(job)
            except OutputError:
                pass
        try:
            _save_state(out, new_state)
            kept = f"{len(new_state)} studies reported are kept in {STATE_FILE}: a re-run goes on from them"
        except OSError as again:
            kept = f"the state of this run could not be saved either ({again.strerror or again}): a re-run redoes it"
        raise OutputError(f"{exc.cause}; screening stopped, {kept}", path=exc.path, step=exc.step) from exc.__cause__
    finally:
        reporter.shutdown()

    file_rows = _file_rows(studies, loose + reused_failures, results)
    reached = {r.study.study_uid for r in results}
    pending = [pending_study_row(study, threshold) for study in to_score if study.study_uid not in reached]
    screened = {r["study_uid"] for r in rows + reused_rows + pending}
    unscreened = unscreened_study_rows(file_rows, threshold, screened.__contains__)
    new_state.update(_reports_no_longer_standing(unscreened, earlier, out, file_rows, options.dicom))
    rows = rank_rows(rows + reused_rows + pending + unscreened)
    summary = BatchSummary(rows=rows + file_rows)
    summary.pending = len(pending)
    summary.studies = len(rows)
    summary.unscreened_studies = sum(r["status"] in ("skipped", "failed") and not r["report"] for r in rows)
    summary.flagged = sum(r["flag"] == "yes" for r in rows)
    summary.outside_population = sum(bool(r.get("warning")) for r in rows)
    summary.unfamiliar = sum(bool(r.get("appearance_caution")) for r in rows)
    summary.unscored_frames = sum(r.get("unscored_frames") or 0 for r in rows)
    summary.scored_images = sum(len(r.images) for r in results)
    summary.reused = len(reused_rows)
    summary.skipped_files = sum(r["status"] == "skipped" for r in file_rows)
    summary.failed_files = sum(r["status"] == "failed" for r in file_rows)
    summary.failed_reports = sum(r["step"] == "report" for r in rows)
    summary.seconds = time.time() - started
    summary.meta = {"tool_version": __version__, "model": str(model.path), "model_sha256": model.sha256,
                    "compute": model.compute or "not started: no study scored", "threshold": threshold,
                    "operating_point": operating,
                    "appearance_limit": model.appearance.limit if model.appearance else None,
                    "calibration": calibration, "dicom_reports": options.dicom,
                    "selection": options.selection.as_json(), "inputs": [str(p) for p in inputs]}
    # a stop at once from here keeps this run's whole state, and may leave the summary or worklist half-written
    kept.update(summary=True, state=new_state, jobs=())
    # the state first: when the summary cannot be written, a re-run reuses the reports and writes it
    with _writing(out / STATE_FILE, "save the run's state"):
        _save_state(out, new_state)
    with _writing(out / "summary.csv", "write the summary"):
        write_summary(out, summary.rows, {k: v for k, v in summary.to_json().items() if k != "rows"})
    with _writing(out / "worklist.pdf", "write the worklist"):
        write_worklist(out / "worklist.pdf", summary.rows, {**summary.meta, "pending_studies": summary.pending})
    return summary


@contextmanager
def output_lock(out: Path, who: str):
    """Hold the output folder for one cxrscreen at a time, and clear what a killed run left there.

    Two runs writing into one folder overwrite each other's reports, summary and state (cron starting
    a batch while the last one still runs; a batch into a watch daemon's folder): the second is refused
    (a UsageError naming the first, which the lock file holds). Once held, the temporary files of an
    interrupted ``atomic_write`` (``.NAME.XXXX.tmp``) are removed: no other cxrscreen is writing them.
    Where the filesystem has no locks (some network mounts), it goes on without, with a warning."""
    with _writing(out, "write into the output folder"):
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / OUTPUT_LOCK, "a+b", buffering=0)     # unbuffered: nothing left to flush at close
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(f"{out} is being written by {lock_holder(out) or 'another cxrscreen'}: wait for it to "
                         "finish, or give another --out", path=out) from None
    except OSError as exc:
        log.warning("cannot lock %s (%s): going on without; do not run two cxrscreen into it at once",
                    out, exc.strerror or exc)
    try:
        try:        # who holds it, for the message of the one refused; a full disk only loses that
            handle.truncate(0)
            handle.write(f"{who} (pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode("utf-8", "backslashreplace"))
        except OSError:
            pass
        for leftover in out.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        handle.close()      # and with it the lock


def lock_holder(out: Path | str) -> str:
    """The line the run holding ``out`` wrote into its lock file (command, pid, host, since); "" if none."""
    try:
        return (Path(out) / OUTPUT_LOCK).read_bytes().decode("utf-8", "replace").strip()
    except OSError:
        return ""


# A run's state is saved while it runs, at most this often, so that a run killed outright (kill -9, a power
# cut, the OOM killer) goes on from the studies it reported; and never more than 5% of the run's time.
CHECKPOINT_SECONDS = 30.0


class _Checkpoints:
    """Saves the state of a running batch (the studies reported so far) every ``CHECKPOINT_SECONDS``, or
    twenty times as long as the last save took (a state of 100,000 studies is about 100 MB)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.at = time.monotonic()
        self.cost = 0.0

    def maybe(self, state: dict) -> None:
        begun = time.monotonic()
        if begun - self.at < max(CHECKPOINT_SECONDS, 20 * self.cost):
            return
        with _writing(self.out / STATE_FILE, "save the run's state"):
            _save_state(self.out, state)
        self.at = time.monotonic()
        self.cost = self.at - begun


def _save_state(out: Path, state: dict) -> None:
    with atomic_write(out / STATE_FILE, "w") as handle:
        json.dump(state, handle, indent=1, default=str)


@contextmanager
def _writing(path: Path, what: str):
    """Turn an OSError while writing ``path`` into an OutputError that names it and the system's cause."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot {what}: {exc.strerror or exc}", path=path, step="write") from exc


def _dicom_written(name: str | None, out: Path) -> bool:
    """Whether a reused study's DICOM report is there (or cannot be: a JPEG/PNG study)."""
    return name == "" or (bool(name) and (out / name).is_file())


def resolve_threshold(model: LoadedModel, threshold: float | None, calibration_file: Path | None,
                      selection: Selection = Selection()) -> tuple[float, dict, str]:
    """(threshold, operating point, calibration file or "") from --threshold, a calibration, or the card.

    A calibration made with other selection options than ``selection``, the run's, is used and logged: its
    threshold was set on other images (calibrated on frontal images only, say, for a run that scores laterals)."""
    from .calibrate import select_calibration

    if threshold is not None:
        return threshold, {"source": "threshold set by the user (--threshold): operating point unknown"}, ""
    calibration = select_calibration(model.path, model.sha256, calibration_file)
    if calibration is not None:
        made_with = calibration.figures.get("selection")
        if made_with is not None and made_with != selection.as_json():
            log.warning("%s was calibrated with other selection options (%s) than this run's (%s): its threshold "
                        "was set on other images; calibrate again with this run's options", calibration.path,
                        selection_options_text(made_with), selection_options_text(selection.as_json()))
        return calibration.threshold, calibration.operating_point, str(calibration.path)
    return model.card.threshold, card_operating_point(model.card), ""


def card_operating_point(card) -> dict:
    """The operating point a report quotes for the card's threshold: the held-out test split's figures where
    the card has them at that threshold, else the validation split's. The threshold was chosen on validation,
    so its figures there are the optimistic ones (the default model: specificity 0.984 on validation, 0.761
    on test): a reader should see what the threshold did on images that chose nothing."""
    validation = dict(card.operating_point)
    test = card.test_point
    if not test:
        validation["source"] = "the model's validation split (model card), where the threshold was chosen"
        return validation
    chosen = "the threshold was chosen on its validation split"
    if card.target_sensitivity is not None:
        chosen += f" for {card.target_sensitivity:g} sensitivity"
    if all(isinstance(validation.get(k), float) for k in ("sensitivity", "specificity")):
        chosen += f", where it gave {validation['sensitivity']:.3f} and specificity {validation['specificity']:.3f}"
    return {"sensitivity": float(test["sensitivity"]), "specificity": float(test["specificity"]),
            "source": f"the model's held-out test split ({int(test['n_positive'])} pneumonia and "
                      f"{int(test['n_negative'])} normal images; {chosen})"}


def study_row(study_uid: str, threshold: float, **fields) -> dict:
    """A summary row of kind ``study``: every column, blank (not flagged) unless given in ``fields``.
    batch, watch and the rows of unscreened studies all build theirs here."""
    return {**dict.fromkeys(SUMMARY_FIELDS, ""), "kind": "study", "rank": 0, "flag": "no", "threshold": threshold,
            "study_uid": study_uid, "files": [], **fields}


def _study_row(result: StudyResult, threshold: float) -> dict:
    study, first, score = result.study, result.study.first, result.score
    scored = score is not None
    return study_row(threshold=threshold, **first.identifiers(), status="scored" if scored else "failed",
                     flag="yes" if scored and score >= threshold else "no", score=round(score, 6) if scored else "",
                     report=report_filename(study) if scored else "", files=[str(p) for p in study.source_files],
                     reason="; ".join(f"{o.path.name}: {o.reason}" for o in result.failed),
                     warning=result.warning if scored else "",
                     appearance=round(result.appearance, 3) if result.appearance is not None else "",
                     appearance_caution=result.appearance_caution,
                     unscored_frames=result.unscored_frames if scored else "")


def pending_study_row(study: Study, threshold: float) -> dict:
    """The summary row of a study that a stopped run did not screen (status ``pending``)."""
    identity = study.first.identifiers() if study.first else {"study_uid": study.study_uid}
    return study_row(threshold=threshold, **identity, status="pending", files=[str(p) for p in study.source_files],
                     reason="not screened: the run was stopped before this study; run the same command again "
                            "to screen it (the studies reported are reused)")


def rank_rows(rows: list[dict]) -> list[dict]:
    """Flagged first, then by score; of the studies with no score, those still pending (to be screened)
    before those with nothing screenable."""
    rows.sort(key=lambda r: (r["flag"] != "yes", -(r["score"] if r["score"] != "" else -1.0),
                             r["status"] != "pending", r["study_uid"]))
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    return rows


def release(result: StudyResult) -> None:
    """Drop a study's pixels once its report is written."""
    for item in result.images:
        item.thumbnail = item.overlay = None


def _file_rows(studies: list[Study], loose: list[FileOutcome], results: list[StudyResult]) -> list[dict]:
    outcomes = list(loose)
    for study in studies:
        outcomes.extend(study.skipped)
    for result in results:
        outcomes.extend(result.failed)
    return file_rows(outcomes)


def file_rows(outcomes: list[FileOutcome]) -> list[dict]:
    """Summary rows of skipped and failed files, failures first (every column; the study's ones blank)."""
    return [{**dict.fromkeys(SUMMARY_FIELDS, ""), "kind": "file", "status": o.status.value, **o.identifiers(),
             "files": [str(o.path)], "path": str(o.path), "step": o.step, "tag": o.tag, "reason": o.reason}
            for o in sorted(outcomes, key=lambda o: (o.status != Status.FAILED, str(o.path)))]


def unscreened_study_rows(files: list[dict], threshold: float, screened: Callable[[str], bool]) -> list[dict]:
    """A study row for each study that has files in ``files`` (skipped or failed file rows) but none
    screened: a lateral-only or non-chest study, or one whose every file failed before decoding.

    ``screened(uid)`` says whether the study has (or is getting) a row of its own. The row's status is
    ``failed`` when any of its files failed, else ``skipped``; its reason names each file, and its patient
    id and name, accession and date are the first its files' headers gave. Files with no study UID (not DICOM, or
    unreadable) stay file rows only.
    """
    by_study: dict[str, list[dict]] = {}
    for row in files:
        if row["study_uid"] and not screened(row["study_uid"]):
            by_study.setdefault(row["study_uid"], []).append(row)
    return [study_row(uid, threshold, status="failed" if any(r["status"] == "failed" for r in rows) else "skipped",
                      files=[r["path"] for r in rows],
                      reason="; ".join(f"{Path(r['path']).name}: {r['status']}, {r['reason']}" for r in rows),
                      **{key: next((r[key] for r in rows if r[key]), "")
                         for key in ("patient_id", "patient_name", "accession", "study_date")})
            for uid, rows in by_study.items()]


def score_studies(studies: list[Study], model: LoadedModel, *, batch_size: int = 16, workers: int = 2,
                  progress: Callable[[int, int, int], None] | None = None
                  ) -> tuple[dict[str, float], list[FileOutcome], dict[str, list[tuple[Path, str]]]]:
    """Study scores exactly as :func:`run_batch` computes them (same decoding, maximum over images),
    without reports or Grad-CAM. Returns ``({study_uid: score}, failed files, {study_uid: [(path, digest) of each
    scored image]})``: the digests of their model inputs tell the same picture in two studies
    (:func:`cxrscreen.normalise.pixels_digest`)."""
    scores: dict[str, float] = {}
    failed: list[FileOutcome] = []
    pixels: dict[str, list[tuple[Path, str]]] = {}
    screener = Screener(model, gradcam="none", batch_size=batch_size, workers=workers, thumbnails=False,
                        digests=True)
    for result in screener.screen(studies, progress=progress):
        failed.extend(result.failed)
        if result.score is not None:
            scores[result.study.study_uid] = result.score
            pixels[result.study.study_uid] = [(r.image.path, r.pixels) for r in result.images]
    return scores, failed, pixels
