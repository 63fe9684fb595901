"""Command line: parse options, call the library, map the result to an exit code.

Exit codes: 0 every input scored or deliberately skipped; 1 some inputs failed or
were not screened (a run stopped by SIGTERM or Ctrl-C), or a tool error such as an
unloadable model; 2 usage errors; 130 a second Ctrl-C (batch, watch: stopped at once, saying what is kept), or
``calibrate`` stopped by Ctrl-C; 143 ``calibrate`` stopped by SIGTERM (saying what it had written)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import LOG_FORMAT, __version__
from .errors import CxrError, StoppedAtOnce, UsageError

log = logging.getLogger("cxrscreen")


def _fail(exc: CxrError) -> None:
    click.echo(f"cxrscreen: error: {exc.message}", err=True)
    sys.exit(2 if isinstance(exc, UsageError) else 1)


def screening_options(command):
    """The options batch and watch share: model, threshold, batching, Grad-CAM, selection."""
    options = [
        click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="A .keras model with its .json card (default: the bundled model)."),
        click.option("--threshold", type=float, help="Override the calibrated threshold."),
        click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
                     help="A calibration file (default: the newest one beside the model made for it, "
                          "else the card's)."),
        click.option("--batch-size", default=16, show_default=True),
        click.option("--workers", default=2, show_default=True, help="Decoding threads."),
        click.option("--gradcam", type=click.Choice(["all", "flagged", "none"]), default="all", show_default=True),
        click.option("--dicom", is_flag=True,
                     help="Also write each report as a DICOM Encapsulated PDF of its study (<report>.dcm), "
                          "for the PACS, and a rejection note of those whose images are all withdrawn since "
                          "(<report>.rejection.dcm)."),
    ]
    for option in reversed(options):
        command = option(command)
    return selection_options(command)


def selection_options(command):
    """The options that choose which images are screened (batch, watch, calibrate), given to the command as
    one ``selection`` (:class:`cxrscreen.ingest.Selection`)."""
    @functools.wraps(command)
    def with_selection(*args, include_lateral, any_body_part, chest_body_parts, frontal_views, **kwargs):
        from .ingest import Selection

        try:
            selection = Selection(include_lateral=include_lateral, any_body_part=any_body_part,
                                  chest_body_parts=frozenset(chest_body_parts), frontal_views=frozenset(frontal_views))
        except CxrError as exc:
            _fail(exc)
        return command(*args, selection=selection, **kwargs)

    options = [
        click.option("--include-lateral", is_flag=True, help="Also score lateral and other non-frontal views."),
        click.option("--any-body-part", is_flag=True,
                     help="Also score images whose BodyPartExamined is not chest."),
        click.option("--chest-body-part", "chest_body_parts", multiple=True, metavar="NAME",
                     help="Also score images whose BodyPartExamined is NAME: a site's own name for the chest "
                          "(e.g. TORAX). Repeatable."),
        click.option("--frontal-view", "frontal_views", multiple=True, metavar="NAME",
                     help="Also score images whose ViewPosition is NAME: a site's own name for a frontal view "
                          "(e.g. 'PA ERECT'). Repeatable."),
    ]
    for option in reversed(options):
        with_selection = option(with_selection)
    return with_selection


@click.group()
@click.version_option(__version__, prog_name="cxrscreen")
def main() -> None:
    """Screen chest radiographs (DICOM, JPEG, PNG) for likely pneumonia. Decision support, not a diagnosis."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _stopped_at_once(command: str, outcome: str) -> None:
    """End a command that a second Ctrl-C stopped at once: one line saying what it kept, exit code 130 (128 +
    SIGINT), not click's bare "Aborted!" (exit 1)."""
    click.echo(f"{command}: stopped at once by a second Ctrl-C; {outcome}", err=True)
    sys.exit(130)


def _count(n: int, one: str, many: str = "") -> str:
    """``1 study``, ``2 studies``, ``0 files``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


@contextmanager
def _stop_on_signals(say):
    """While in it, SIGTERM and Ctrl-C set the event it gives (the command finishes what is under way) and
    call ``say(signal name)``; a second Ctrl-C stops at once (KeyboardInterrupt). The handlers before it
    are put back after (the command may be called from Python). Off the main thread, where no handler can
    be set, the event is never set."""
    import signal
    import threading

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        say(signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class _Progress:
    """A command's progress through the images it scores, on stderr: a bar on a terminal, else a log line
    (``scored 300/1200 images``; ``300/1200 images: 298 scored, 2 failed`` once any failed) as each hundred is
    passed and at the end; nothing when ``quiet``. Called as ``progress(done, total, failed)``, ``done`` counting
    the failed images too; a context manager that closes the bar."""

    def __init__(self, label: str, quiet: bool = False) -> None:
        self.label, self.quiet = label, quiet
        self.bar = None
        self.logged = 0     # the images done at the last line logged

    def __call__(self, done: int, total: int, failed: int = 0) -> None:
        if self.quiet:
            return
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
                self.bar.__enter__()
            self.bar.update(done - self.bar.pos)
        elif done == total or done // 100 > self.logged // 100:
            self.logged = done
            if failed:
                log.info("%d/%d images: %d scored, %d failed", done, total, done - failed, failed)
            else:
                log.info("scored %d/%d images", done, total)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@contextmanager
def ends_on_signal(command: str, outcome):
    """For a command that has nothing to finish when stopped (``calibrate``, and training's): SIGTERM stops it
    as Ctrl-C does (a KeyboardInterrupt), and either ends it with ``COMMAND: stopped by SIGTERM; <outcome()>``
    on stderr and exit code 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM: what a shell says of a
    process the signal ended), not click's bare "Aborted!" (exit 1) or a silent kill. ``outcome()`` says what
    was written. The SIGTERM handler before it is put back after; off the main thread, none is set."""
    import signal
    import threading

    received: list[int] = []

    def on_term(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
        click.echo(f"{command}: stopped by {name}; {outcome()}", err=True)
        sys.exit(128 + int(signum))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def written_since(paths, started: float) -> list[Path]:
    """Those of ``paths`` that exist and were written at or after ``started`` (a ``time.time()``)."""
    return [Path(p) for p in paths if os.path.exists(p) and os.stat(p).st_mtime >= started]


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the reports, summary.csv/json and worklist.pdf.")
@screening_options
@click.option("--force", is_flag=True, help="Redo studies whose inputs and model are unchanged.")
@click.option("--quiet", is_flag=True, help="No progress and no per-run log lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable summary on stdout.")
@click.option("--report-processes", type=click.IntRange(min=0), default=None,
              help="Processes that write the PDF reports; 0: a thread of this one [default: one per 4 CPUs, "
                   "at most 4, for 64 studies or more; else 0].")
def batch(inputs, out, model_path, threshold, calibration, batch_size, workers, gradcam, force, selection,
          dicom, quiet, as_json, report_processes):
    """Screen every radiograph under INPUT... and write one PDF report per study into --out.
    SIGTERM or Ctrl-C stops it after the reports under way; the same command then goes on from there."""
    from .pipeline import BatchOptions, run_batch

    def on_stop(signal_name: str) -> None:
        log.warning("%s: finishing the reports under way, then writing the summary; the same command goes on "
                    "from there (Ctrl-C again stops at once)", signal_name)

    try:
        options = BatchOptions(out=out, model_path=model_path, threshold=threshold, calibration=calibration,
                               batch_size=batch_size, workers=workers, gradcam=gradcam, force=force,
                               selection=selection, dicom=dicom, report_processes=report_processes)
        with _stop_on_signals(on_stop) as stop, _Progress("screening", quiet or as_json) as progress:
            summary = run_batch(list(inputs), options, progress=progress, stop=stop)
    except CxrError as exc:
        _fail(exc)
    except StoppedAtOnce as exc:
        from .pipeline import STATE_FILE

        kept = (f"{_count(exc.kept, 'study', 'studies')} reported are kept in {out / STATE_FILE}: the same "
                "command goes on from them" if exc.saved else "the run's state could not be saved: the same command "
                "redoes the studies reported since its last save")
        written = ("it stopped while writing the summary and worklist (run the same command again to write them "
                   "whole)" if exc.summary else "no summary or worklist written")
        _stopped_at_once("cxrscreen batch", f"{written}; {kept}")
    except KeyboardInterrupt:
        _stopped_at_once("cxrscreen batch", "before screening began (the model loading, the headers read): nothing "
                         "written")
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, default=str))
    elif not quiet:
        click.echo(f"{_count(summary.studies, 'study', 'studies')} ({summary.reused} unchanged since the last run, "
                   f"{summary.unscreened_studies} with no screenable image), "
                   f"{summary.flagged} flagged, "
                   + (f"{summary.outside_population} outside the model's age range, " if summary.outside_population
                      else "")
                   + (f"{summary.unfamiliar} with an image unlike the training radiographs, " if summary.unfamiliar
                      else "")
                   + (f"{_count(summary.unscored_frames, 'frame')} of multi-frame images not scored (frame 1 of "
                      "each is), " if summary.unscored_frames else "")
                   + f"{_count(summary.skipped_files, 'file')} skipped, "
                   f"{summary.failed_files} failed; "
                   + (f"{_count(summary.failed_reports, 'report')} could not be made; " if summary.failed_reports
                      else "")
                   + f"reports in {out}/ (worklist.pdf, summary.csv"
                   + (", a .dcm beside each PDF of a DICOM study" if dicom else "") + ")")
        if summary.interrupted:
            click.echo(f"STOPPED before {_count(summary.pending, 'study', 'studies')} (pending in the summary): run "
                       "the same command again to screen them; the studies reported are reused", err=True)
        for row in summary.rows:
            if row["kind"] == "file" and row["status"] == "failed":
                click.echo(f"  FAILED {row['path']} [{row['step']}] {row['tag']}: {row['reason']}", err=True)
            elif row["kind"] == "study" and row["step"] == "report":
                click.echo(f"  FAILED study {row['study_uid']} (patient {row['patient_id'] or '-'}) [report]: "
                           f"{row['reason']}", err=True)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--target-sensitivity", default=0.95, show_default=True, type=float,
              help="The sensitivity the threshold must reach on DATA.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A .keras model with its card beside it (default: the bundled model, or CXRSCREEN_MODEL).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration file (default: MODEL.calibration.<time>.json beside the model).")
@click.option("--bootstrap", "n_boot", default=2000, show_default=True,
              help="Bootstrap resamples (of patients, stratified by class) for the 95% intervals.")
@click.option("--prevalence", type=float, help="Prevalence for PPV/NPV (default: that of DATA).")
@click.option("--conservative", is_flag=True,
              help="Choose the highest threshold whose lower 95% bound of sensitivity, not the sensitivity "
                   "measured, reaches the target (refused when the data hold too few positive cases).")
@click.option("--patient-pattern", metavar="REGEX",
              help="Find each file's patient in its path relative to DATA (or the CSV's folder) with this regular "
                   "expression, the first group that took part or else the whole match: '^[^/]+/([^/]+)/' for a "
                   "folder per patient under NORMAL/ and PNEUMONIA/. A CSV's patient column comes first; "
                   "without either, the DICOM Patient ID, else each study is its own patient.")
@click.option("--batch-size", default=16, show_default=True)
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def calibrate(data, target_sensitivity, model_path, out, n_boot, prevalence, conservative, patient_pattern,
              batch_size, selection, as_json):
    """Set the threshold for a target sensitivity on labeled DATA (NORMAL/ and PNEUMONIA/ folders, or a CSV of
    path,label[,patient])."""
    import time

    from .calibrate import run_calibration

    started = time.time()

    def outcome() -> str:
        from .infer import default_model_path

        model = Path(model_path or default_model_path())
        written = written_since([out] if out else model.parent.glob(f"{model.stem}.calibration.*.json"), started)
        return (f"it had written {written[0]}" if written
                else "no calibration written (it is written whole, once every study is scored)")

    try:
        with ends_on_signal("cxrscreen calibrate", outcome), _Progress("scoring", as_json) as progress:
            result = run_calibration(data, target=target_sensitivity, model_path=model_path, out=out, n_boot=n_boot,
                                     prevalence=prevalence, batch_size=batch_size, conservative=conservative,
                                     selection=selection, patient_pattern=patient_pattern, progress=progress)
    except CxrError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        def ci(key):
            lo, hi = result[key + "_ci95"]
            return f"{result[key]:.3f} (95% CI {lo:.3f}-{hi:.3f})"

        n = result["n"]
        excluded = f", {len(result['excluded'])} files excluded" if result["excluded"] else ""
        people = result["patients"]
        click.echo(f"{n['NORMAL']} NORMAL and {n['PNEUMONIA']} PNEUMONIA studies (of {people['NORMAL']} and "
                   f"{people['PNEUMONIA']} patients: the intervals resample patients){excluded}")
        click.echo(f"ROC AUC {ci('auc')}")
        click.echo(f"threshold {result['threshold']:.4f}: the highest at which the "
                   + ("lower 95% bound of sensitivity" if conservative else "sensitivity")
                   + f" reaches the target {result['target_sensitivity']}")
        click.echo(f"sensitivity {ci('sensitivity')}; specificity {ci('specificity')}")
        click.echo(f"at prevalence {result['prevalence']:.3f}: PPV {result['ppv']:.3f}, NPV {result['npv']:.3f}")
        click.echo(f"wrote {result['file']} and {result['plot']}")
        for item in result["excluded"]:
            click.echo(f"  excluded {item['path']}: {item['reason']}", err=True)
    if result["sensitivity_lower_bound_below_target"]:
        click.echo(f"WARNING: the lower 95% bound of sensitivity ({result['sensitivity_ci95'][0]:.3f}) is under the "
                   f"target {result['target_sensitivity']}: this data cannot support the claim that the threshold "
                   "reaches the target. Calibrate on more positive cases.", err=True)


@main.command()
@click.argument("inbox", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the reports, summary.csv/json, worklist.pdf and (by default) the ledger.")
@click.option("--archive", type=click.Path(file_okay=False, path_type=Path),
              help="Move each input here once its study's report is written (default: leave inputs in place).")
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path),
              help="Move files that fail here, each with a .reason.txt beside it.")
@click.option("--remove-empty-folders", is_flag=True,
              help="Remove folders of the inbox that have stayed empty for an hour (with --archive, a PACS "
                   "that makes a folder per study otherwise leaves thousands, which slow every rescan).")
@click.option("--settle", default=10.0, show_default=True, type=float,
              help="Seconds a file's size and mtime must stay unchanged, and a study must get no new file, "
                   "before it is screened.")
@click.option("--rescan", default=5.0, show_default=True, type=float,
              help="Seconds between full rescans of the inbox (network mounts deliver no file events).")
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path),
              help="The SQLite ledger (default: OUT/.cxrscreen-watch.sqlite). Keep it on a local disk.")
@click.option("--worklist-days", default=7.0, show_default=True, type=float,
              help="summary and worklist.pdf list the studies of the last N days and every pending one "
                   "(0: all; the ledger keeps everything).")
@screening_options
@click.option("--report-processes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes that write the PDF reports while the model scores; 0: a thread of the daemon. "
                   "On a GPU server, where reports bound a burst, 2-4 (each takes a CPU while it writes).")
@click.option("--once", is_flag=True, help="Handle what is in the inbox now, then exit (for cron). "
                                          "Exit code 1 when a file failed or an output could not be written.")
def watch(inbox, out, archive, quarantine, remove_empty_folders, settle, rescan, state, worklist_days, model_path, threshold, calibration, batch_size,
          workers, gradcam, selection, dicom, report_processes, once):
    """Screen studies as they arrive in INBOX, each exactly once; stop with SIGTERM or Ctrl-C."""
    from .watch import Watcher, WatchOptions, kv

    def on_stop(signal_name: str) -> None:     # a second Ctrl-C stops at once: the ledger is consistent at every step
        log.info(kv(event="signal", signal=signal_name, note="finishing the reports under way"))

    try:
        options = WatchOptions(inbox=inbox, out=out, archive=archive, quarantine=quarantine, settle=settle,
                               rescan=rescan, state=state, worklist_days=worklist_days, model_path=model_path, threshold=threshold,
                               calibration=calibration, batch_size=batch_size, workers=workers, gradcam=gradcam,
                               selection=selection, dicom=dicom, once=once,
                               remove_empty_folders=remove_empty_folders, report_processes=report_processes)
        with _stop_on_signals(on_stop) as stop:
            code = Watcher(options, stop=stop).run()
    except CxrError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _stopped_at_once("cxrscreen watch", "the ledger is consistent: studies under way are pending, and the next "
                         "start screens them")
    sys.exit(code)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path),
              help="The daemon's ledger, when it runs with --state (default: OUT/.cxrscreen-watch.sqlite).")
@click.option("--max-wait", default=30.0, show_default=True, type=float,
              help="Minutes a study may wait after its last file before the check fails.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def status(out, state, max_wait, as_json):
    """Check a watch daemon from its ledger, for monitoring: exit 0 healthy, 1 not (no daemon running,
    or a study waiting too long)."""
    import datetime as dt

    from .watch import health

    try:
        result = health(out, state, max_wait=max_wait * 60)
    except CxrError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        n = result["studies"]
        wait = result["oldest_pending_wait_s"]
        last = result["last_report_at"]
        daemon = f"running: {result['holder'] or 'holder unknown'}" if result["running"] else "NOT running"
        click.echo(f"daemon: {daemon}")
        click.echo(f"studies: {n['reported']} reported, {n['pending']} pending"
                   + (f" (the oldest waiting {wait / 60:.1f} min since its last file)" if wait is not None else "")
                   + f", {n['not_screened']} with no image to screen (skipped or withdrawn), {n['failed']} failed "
                     "(no image could be read)")
        click.echo("last report: " + (dt.datetime.fromtimestamp(last).strftime("%Y-%m-%d %H:%M:%S") if last
                                      else "none yet"))
        failed, recent = result["failed_files_24h"], result["failed_recently"]
        which = "" if not recent else " (newest first)" if len(recent) == failed else f" (the newest {len(recent)})"
        click.echo(f"files failed in the last 24 h: {failed}{which}")
        for file in recent:
            where = " ".join(x for x in (file["step"], file["tag"]) if x)
            click.echo(f"  {file['path']}{f' [{where}]' if where else ''}: {file['reason']}")
        click.echo("OK" if result["healthy"] else "ATTENTION: " + "; ".join(result["problems"]))
    sys.exit(0 if result["healthy"] else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
