"""The watch daemon's durable state: a SQLite ledger in WAL mode.

Tables:

* ``files``: one row per file content taken from the inbox: where it arrived
  (``inbox_path``), where it is now (``location``: the inbox, the archive or the
  quarantine), size, mtime and SHA-256, its study, its status (``pending``,
  ``scored``, ``skipped``, ``failed``) with the step, tag and reason, and the
  report version that included it. ``move_to`` is set while a move is under way.
* ``studies``: one row per study: ``pending`` (has files not yet reported),
  ``done`` or ``failed`` (no image could be scored), the latest report version,
  its file, score and flag, and when its last file arrived. A ``done`` study with a
  version but no score had that report withdrawn: every image of it was withdrawn
  since (a rejection note), and it is flagged no more.
* ``reports``: every report version written (old versions stay on disk).

Every change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) with
``synchronous=FULL``, so a ``kill -9`` or a power cut loses at most the change
under way. Text is UTF-8, except where a file's name is not (an SMB or NFS share
with Latin-1 names): such a value (a path, or a reason naming the file) is stored
as a BLOB of its bytes and read back as the same Python string (PEP 383
surrogates), so that file is taken, moved and reported like any other; in the
``sqlite3`` shell those values show as blobs. Report files (the PDF, and with
``--dicom`` its ``.dcm``) are written *before* the transaction that records them,
under a name fixed by (study, version): after a crash in between, the restart
rewrites the same file rather than creating a second one. Moves are recorded
before (``move_to``) and after (``location``) they happen, so an interrupted
move is finished on restart.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import OutputError, UsageError

SCHEMA_VERSION = 6
# StudyRow.stands, for queries of the studies table: a report that stands
STANDS_SQL = "(version > 0 AND score IS NOT NULL)"

# How a state file of an older schema is brought up to date, step by step, when it is opened.
_MIGRATIONS = {
    # 1 -> 2: a skipped or failed file keeps its study's identifiers (shown for a study with no scored file);
    # a study keeps the caution of its latest report (patient outside the model's population)
    1: ("ALTER TABLE files ADD COLUMN patient_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE files ADD COLUMN accession TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE files ADD COLUMN study_date TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE studies ADD COLUMN warning TEXT NOT NULL DEFAULT ''"),
    # 2 -> 3: a study keeps the appearance distance of its latest report and its caution (cxrscreen.appearance)
    2: ("ALTER TABLE studies ADD COLUMN appearance REAL",
        "ALTER TABLE studies ADD COLUMN appearance_caution TEXT NOT NULL DEFAULT ''"),
    # 3 -> 4: a study keeps how many frames of its multi-frame images its latest report did not score
    3: ("ALTER TABLE studies ADD COLUMN unscored_frames INTEGER NOT NULL DEFAULT 0",),
    # 4 -> 5: files and studies keep the patient's name (the worklist shows it beside the ID); rows made
    # before stay without one until their study is reported again
    4: ("ALTER TABLE files ADD COLUMN patient_name TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE studies ADD COLUMN patient_name TEXT NOT NULL DEFAULT ''"),
    # 5 -> 6: a reported study whose every image was withdrawn since keeps no score or flag (cxrscreen 0.3.4 kept
    # its report's, so the worklist still flagged it); no column changes
    5: ("UPDATE studies SET score = NULL, flag = '' WHERE status = 'done' AND version > 0 AND NOT EXISTS "
        "(SELECT 1 FROM files WHERE files.study_uid = studies.study_uid AND files.status = 'scored')",),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    inbox_path TEXT NOT NULL,
    location TEXT,
    move_to TEXT,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('pending', 'scored', 'skipped', 'failed')),
    step TEXT NOT NULL DEFAULT '',
    tag TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    taken_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    patient_id TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS files_location ON files (location);
CREATE INDEX IF NOT EXISTS files_study ON files (study_uid);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    version INTEGER NOT NULL DEFAULT 0,
    report_base TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '',
    score REAL,
    flag TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    last_arrival REAL NOT NULL,
    updated REAL NOT NULL,
    warning TEXT NOT NULL DEFAULT '',
    appearance REAL,
    appearance_caution TEXT NOT NULL DEFAULT '',
    unscored_frames INTEGER NOT NULL DEFAULT 0,
    patient_name TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_status ON studies (status, last_arrival);
CREATE TABLE IF NOT EXISTS reports (
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    report TEXT NOT NULL,
    score REAL NOT NULL,
    flag TEXT NOT NULL,
    threshold REAL NOT NULL,
    model_sha256 TEXT NOT NULL,
    images INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (study_uid, version)
);
"""


def _pending_study(db, study_uid: str, now: float) -> None:
    """The study of a file pending now is pending (again, if it was reported), its last file arrived now."""
    db.execute("INSERT INTO studies (study_uid, status, last_arrival, updated) VALUES (?, 'pending', ?, ?) "
               "ON CONFLICT(study_uid) DO UPDATE SET status = 'pending', last_arrival = excluded.last_arrival, "
               "updated = excluded.updated", (study_uid, now, now))


@dataclass(frozen=True)
class FileRow:
    id: int
    inbox_path: str
    location: str | None
    move_to: str | None
    size: int
    mtime_ns: int
    sha256: str
    study_uid: str
    status: str
    step: str
    tag: str
    reason: str
    taken_at: float
    version: int
    patient_id: str
    accession: str
    study_date: str
    patient_name: str


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    status: str
    version: int
    report_base: str
    report: str
    score: float | None
    flag: str
    patient_id: str
    accession: str
    study_date: str
    reason: str
    last_arrival: float
    updated: float
    warning: str
    appearance: float | None
    appearance_caution: str
    unscored_frames: int
    patient_name: str

    @property
    def stands(self) -> bool:
        """Whether the study has a report that stands: reported (a version, with its score), not withdrawn since
        (:data:`STANDS_SQL` in SQL)."""
        return self.version > 0 and self.score is not None

    @property
    def withdrawn(self) -> bool:
        """Whether the study was reported, and every image of it withdrawn since: its report no longer stands."""
        return self.status == "done" and self.version > 0 and not self.stands


def _to_sqlite(value):
    """A string sqlite3 cannot encode (a file name's undecodable bytes, kept as surrogates) as its bytes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
    return value


def _from_sqlite(value):
    """Back from :func:`_to_sqlite`: the ledger has no BLOB column, so every bytes value was such a string."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class _Connection(sqlite3.Connection):
    """A connection whose parameters and rows go through :func:`_to_sqlite` and :func:`_from_sqlite`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.row_factory = lambda cursor, row: tuple(_from_sqlite(v) for v in row)
        # a TEXT value made from such a BLOB (reason || '...') decodes the same way instead of raising
        self.text_factory = lambda data: data.decode("utf-8", "surrogateescape")

    def execute(self, sql: str, parameters=()):
        if isinstance(parameters, dict):
            return super().execute(sql, {k: _to_sqlite(v) for k, v in parameters.items()})
        return super().execute(sql, tuple(_to_sqlite(v) for v in parameters))


_DISK_ERRORS = {"SQLITE_FULL": "disk is full", "SQLITE_IOERR": "disk I/O error",
                "SQLITE_READONLY": "readonly database", "SQLITE_CANTOPEN": "unable to open database file"}


def _disk_error(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for its disk's sake (full, I/O, read-only, cannot open), not the file's."""
    name = getattr(exc, "sqlite_errorname", None)   # Python 3.11+, extended codes too (SQLITE_IOERR_WRITE)
    if name:
        return name.startswith(tuple(_DISK_ERRORS))
    return any(text in str(exc) for text in _DISK_ERRORS.values())     # Python 3.10: the message


def _lock_path(path: Path | str) -> str:
    return f"{path}.lock"


def in_use(path: Path | str) -> bool:
    """Whether a daemon holds the ledger at ``path`` (its lock is tested, never taken for long)."""
    try:
        with open(_lock_path(path), "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        pass
    return False


class Ledger:
    """One daemon's state. Opening it takes an exclusive lock: two daemons never share a ledger."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(_lock_path(self.path), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UsageError(f"another cxrscreen watch is using the state file {self.path}") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, factory=_Connection)
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UsageError(f"the state file {self.path} cannot use SQLite WAL mode (journal mode {mode}); "
                                 "put --state on a local filesystem")
            self.db.execute("PRAGMA synchronous=FULL")
            self._create_or_migrate()
        except sqlite3.DatabaseError as exc:
            self.close()
            if _disk_error(exc):        # its disk: full, read-only, an I/O error (exit 1, not a usage error)
                raise OutputError(f"cannot use the state file: {exc}", path=self.path, step="start") from None
            raise UsageError(f"cannot use the state file {self.path}: {exc}") from None    # not a database...
        except BaseException:
            self.close()
            raise

    def _create_or_migrate(self) -> None:
        """Create the schema, or bring an older one up to date, in one transaction: another process that
        opens the state file (a monitoring script, ``sqlite3`` on the command line) sees either no tables
        or all of them at the current schema, and a crash part-way leaves nothing half made."""
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            version = self.get_meta("schema_version")
            if version is not None and int(version) > SCHEMA_VERSION:
                raise UsageError(f"the state file {self.path} has schema {version}, newer than this cxrscreen's "
                                 f"{SCHEMA_VERSION}: upgrade cxrscreen")
            for step in range(int(version) if version is not None else SCHEMA_VERSION, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
            for statement in _SCHEMA.split(";"):        # executescript() would commit first
                if statement.strip():
                    db.execute(statement)
            self.set_meta("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # also when COMMIT itself failed (disk full, I/O error): SQLite may or may not have rolled back
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                        "excluded.value", (key, str(value)))

    # ------------------------------------------------------------------ files

    def _files(self, where: str, args: tuple = ()) -> list[FileRow]:
        cursor = self.db.execute(f"SELECT {', '.join(FileRow.__dataclass_fields__)} FROM files WHERE {where} "
                                 "ORDER BY id", args)
        return [FileRow(*row) for row in cursor.fetchall()]

    def known_locations(self) -> dict[str, tuple[int, int]]:
        """{path: (size, mtime_ns)} of every file the ledger has taken that is still where it arrived, in the
        inbox: what tells a rescan that a file there is taken already. Not those moved to the archive or the
        quarantine, which a rescan never sees: a ledger of years holds hundreds of thousands of them (200,000
        kept 49 MiB for the daemon's life and took 0.5 s to read at each start)."""
        return {loc: (size, mtime) for loc, size, mtime in
                self.db.execute("SELECT location, size, mtime_ns FROM files WHERE location = inbox_path")}

    def file_at(self, location: str) -> FileRow | None:
        rows = self._files("location = ?", (location,))
        return rows[-1] if rows else None

    def file_with_hash(self, sha256: str) -> FileRow | None:
        """An earlier copy of the same bytes that was taken (scored, pending or skipped), if any."""
        rows = self._files("sha256 = ? AND status != 'failed'", (sha256,))
        return rows[0] if rows else None

    def take_file(self, *, path: str, size: int, mtime_ns: int, sha256: str, study_uid: str, status: str,
                  step: str = "", tag: str = "", reason: str = "", patient_id: str = "", accession: str = "",
                  study_date: str = "", patient_name: str = "", now: float | None = None) -> int:
        """Record a settled file. A pending image makes its study pending (again, if it was reported)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            previous = self.file_at(path)
            if previous is not None:
                if previous.status == "pending":      # rewritten before it was screened: same row, new content
                    db.execute("DELETE FROM files WHERE id = ?", (previous.id,))
                else:                                  # overwritten after it was handled: the old bytes are gone
                    db.execute("UPDATE files SET location = NULL, reason = reason || ? WHERE id = ?",
                               (" [overwritten in the inbox by newer content]", previous.id))
            cursor = db.execute(
                "INSERT INTO files (inbox_path, location, size, mtime_ns, sha256, study_uid, status, step, tag, "
                "reason, taken_at, patient_id, accession, study_date, patient_name) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (path, path, size, mtime_ns, sha256, study_uid, status, step, tag, reason, now, patient_id,
                 accession, study_date, patient_name))
            if status == "pending" and study_uid:
                _pending_study(db, study_uid, now)
            return cursor.lastrowid

    def skipped_by(self, tags) -> list[FileRow]:
        """Files skipped by the selection rules of ``tags`` (the view, the body part) that are still somewhere."""
        tags = sorted(tags)
        return self._files(f"status = 'skipped' AND step = 'select' AND location IS NOT NULL AND move_to IS NULL "
                           f"AND tag IN ({', '.join('?' * len(tags))})", tuple(tags))

    def retake(self, file_id: int, study_uid: str, now: float | None = None) -> None:
        """A skipped file that a wider selection now screens: pending again, its study with it (as a file that
        arrives now), reported again with it."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute("UPDATE files SET status = 'pending', step = '', tag = '', reason = '', study_uid = ? "
                       "WHERE id = ?", (study_uid, file_id))
            _pending_study(db, study_uid, now)

    def reopen(self, study_uid: str, now: float | None = None) -> bool:
        """A reported study is pending again (as if a file of it arrived now), to be reported again with a file
        that changes it but is not an image (a presentation state, a rejection note); False when it is not a
        reported study."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return db.execute("UPDATE studies SET status = 'pending', last_arrival = ?, updated = ? "
                              "WHERE study_uid = ? AND status = 'done'", (now, now, study_uid)).rowcount > 0

    def report_time(self, study_uid: str, version: int) -> float | None:
        """When report ``version`` of the study was recorded; None when it has none of that version."""
        row = self.db.execute("SELECT created FROM reports WHERE study_uid = ? AND version = ?",
                               (study_uid, version)).fetchone()
        return row[0] if row else None

    def study_files(self, study_uid: str) -> list[FileRow]:
        return self._files("study_uid = ? AND location IS NOT NULL", (study_uid,))

    def files_to_move(self) -> list[FileRow]:
        """Files whose move was started but not recorded as finished (a crash in between)."""
        return self._files("move_to IS NOT NULL")

    def begin_move(self, file_id: int, dest: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE files SET move_to = ? WHERE id = ?", (dest, file_id))

    def end_move(self, file_id: int, dest: str | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE files SET location = ?, move_to = NULL WHERE id = ?", (dest, file_id))

    def handled_in_place(self) -> list[FileRow]:
        """Files already handled (scored, skipped, failed) that are still where they arrived."""
        return self._files("location = inbox_path AND move_to IS NULL AND status != 'pending'")

    def failed_and_skipped(self, since: float = 0.0) -> list[FileRow]:
        """Failed and skipped files taken at or after ``since`` (epoch seconds)."""
        return self._files("status IN ('failed', 'skipped') AND taken_at >= ?", (since,))

    # ------------------------------------------------------------------ studies

    def _studies(self, where: str, args: tuple = ()) -> list[StudyRow]:
        cursor = self.db.execute(f"SELECT {', '.join(StudyRow.__dataclass_fields__)} FROM studies WHERE {where} "
                                 "ORDER BY last_arrival, study_uid", args)
        return [StudyRow(*row) for row in cursor.fetchall()]

    def study(self, study_uid: str) -> StudyRow | None:
        rows = self._studies("study_uid = ?", (study_uid,))
        return rows[0] if rows else None

    def studies(self, status: str | None = None) -> list[StudyRow]:
        return self._studies("status = ?", (status,)) if status else self._studies("1")

    def withdrawn_studies(self) -> list[StudyRow]:
        """The studies whose report no longer stands (:attr:`StudyRow.withdrawn`), found by the database: few,
        among every study a ledger of years holds."""
        return self._studies(f"status = 'done' AND version > 0 AND NOT {STANDS_SQL}")

    def recent_studies(self, since: float) -> list[StudyRow]:
        """Studies updated at or after ``since`` (epoch seconds), and every pending one."""
        return self._studies("updated >= ? OR status = 'pending'", (since,))

    def ready_studies(self, arrived_before: float) -> list[StudyRow]:
        """Pending studies whose last file arrived before ``arrived_before`` (oldest first)."""
        return self._studies("status = 'pending' AND last_arrival <= ?", (arrived_before,))

    def record_study(self, study_uid: str, *, version: int, report_base: str, report: str, score: float | None,
                     flag: str, threshold: float, model_sha256: str, identity: dict, outcomes: dict[int, tuple],
                     reason: str = "", warning: str = "", appearance: float | None = None,
                     appearance_caution: str = "", unscored_frames: int = 0, now: float | None = None) -> None:
        """Record a screened study in one transaction: its report version (or its failure) and its files.

        ``outcomes`` maps file ids to ``(status, step, tag, reason)``. ``report`` empty means no image
        was scored and no version is recorded: the study is ``failed`` when a file of it failed, else (every
        image withdrawn by a rejection note) ``done``, keeping the version it had, if any, but not that
        version's score and flag: its report no longer stands.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone() is None:
                raise KeyError(f"study {study_uid} is not in the ledger")
            # files that arrived while this study was being screened keep it pending
            newer = db.execute("SELECT COUNT(*) FROM files WHERE study_uid = ? AND status = 'pending' AND "
                               f"id NOT IN ({','.join('?' * len(outcomes)) or 'NULL'})",
                               (study_uid, *outcomes)).fetchone()[0]
            for file_id, (status, step, tag, why) in outcomes.items():
                db.execute("UPDATE files SET status = ?, step = ?, tag = ?, reason = ?, version = ? WHERE id = ?",
                           (status, step, tag, why, version if report else 0, file_id))
            failed = any(o[0] == "failed" for o in outcomes.values())
            status = "pending" if newer else ("done" if report or not failed else "failed")
            if report:
                db.execute("INSERT OR REPLACE INTO reports (study_uid, version, report, score, flag, threshold, "
                           "model_sha256, images, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (study_uid, version, report, score, flag, threshold, model_sha256,
                            sum(o[0] == "scored" for o in outcomes.values()), now))
                db.execute("UPDATE studies SET status = ?, version = ?, report_base = ?, report = ?, score = ?, "
                           "flag = ?, patient_id = ?, accession = ?, study_date = ?, reason = ?, updated = ?, "
                           "warning = ?, appearance = ?, appearance_caution = ?, unscored_frames = ?, patient_name = ? "
                           "WHERE study_uid = ?",
                           (status, version, report_base, report, score, flag, identity.get("patient_id", ""),
                            identity.get("accession", ""), identity.get("study_date", ""), reason, now,
                            warning, appearance, appearance_caution, unscored_frames, identity.get("patient_name", ""),
                            study_uid))
            elif status == "done":      # nothing left to screen: an earlier report no longer stands
                db.execute("UPDATE studies SET status = ?, score = NULL, flag = '', reason = ?, updated = ? "
                           "WHERE study_uid = ?", (status, reason, now, study_uid))
            else:
                db.execute("UPDATE studies SET status = ?, reason = ?, updated = ? WHERE study_uid = ?",
                           (status, reason, now, study_uid))

    def counts(self) -> dict:
        studies = dict(self.db.execute("SELECT status, COUNT(*) FROM studies GROUP BY status").fetchall())
        files = dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        return {"studies": studies, "files": files}


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
