"""One exception tree for cxrscreen.

Every error carries the file it concerns, the step of the data flow where it
happened and, where one is to blame, the DICOM tag and its value, so that a
PACS administrator can act on the message without reading a stack trace.
"""

from __future__ import annotations

from pathlib import Path


class CxrError(Exception):
    """Base class of all errors raised by cxrscreen.

    Parameters
    ----------
    cause : str
        What went wrong, in words.
    path : Path or str, optional
        The input file concerned.
    step : str, optional
        The stage of the data flow: ``discover``, ``read``, ``validate``,
        ``decode``, ``normalise``, ``predict``, ``explain``, ``report``...
    tag : str, optional
        The DICOM tag and keyword to blame, e.g. ``(0028,0004) PhotometricInterpretation``.
    """

    def __init__(self, cause: str, *, path: Path | str | None = None,
                 step: str | None = None, tag: str | None = None) -> None:
        self.cause = cause
        self.path = Path(path) if path is not None else None
        self.step = step
        self.tag = tag
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(str(self.path))
        if self.step:
            parts.append(f"[{self.step}]")
        if self.tag:
            parts.append(self.tag)
        head = " ".join(parts)
        return f"{head}: {self.cause}" if head else self.cause

    def with_path(self, path: Path | str) -> "CxrError":
        """Return the same error attached to ``path`` (used when a pure function raised it)."""
        if self.path is None:
            self.path = Path(path)
            self.args = (self.message,)
        return self


class InputError(CxrError):
    """A file cannot be read, recognised or decoded."""


class UnsupportedTransferSyntax(InputError):
    """The pixel data uses a transfer syntax no installed decoder handles."""


class InvalidImageError(InputError):
    """The header or the pixel values break the rules of the standard or common sense."""


class ModelError(CxrError):
    """A model file or its card is missing, unreadable or inconsistent."""


class OutputError(CxrError):
    """The output folder cannot be written (disk full, quota, permissions, a read-only mount): the run
    stops, since every later report would fail the same way."""


class UsageError(CxrError):
    """The caller asked for something impossible (maps to exit code 2)."""


class Interrupted(CxrError):
    """A run was asked to stop (SIGTERM, Ctrl-C) before it had anything to keep: nothing was written."""


class StoppedAtOnce(KeyboardInterrupt):
    """A batch stopped at once (a second Ctrl-C) while it screened: no summary or worklist was written (``summary``:
    stopped while it wrote them, which may be half there), but the state of the studies reported so far was saved
    (``kept`` of them; ``saved`` False when it could not be), so that the same command goes on from them."""

    def __init__(self, kept: int, saved: bool = True, summary: bool = False) -> None:
        super().__init__(kept, saved, summary)
        self.kept, self.saved, self.summary = kept, saved, summary
