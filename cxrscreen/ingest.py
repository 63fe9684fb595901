"""Find input files, recognise them by content, read headers and select what to score.

Stages (each a function):

* :func:`discover` walks folders (:func:`walk`) and yields every regular file, sorted; hidden and
  temporary ones (dot-files, ``*.part``, ``*~``, ``*.tmp``) and hidden folders as skipped, unread;
  and a failure for each folder it cannot list.
* :func:`sniff` recognises DICOM (Part-10 ``DICM`` preamble, or a raw data set
  without one that parses), JPEG and PNG by their bytes, never their name.
* :func:`read_record` reads the header (no pixels) into a :class:`Radiograph`
  and applies the selection rules (:data:`SELECTION_RULES`): only frontal chest
  projection radiographs are scored. A colour image that passes them is
  decoded once more to ask :func:`colour_picture` whether it is a radiograph
  at all (a photograph, a colour test pattern, a heatmap overlay is not).
* :func:`scan` combines them: every file ends as a Radiograph or a FileOutcome.
* :func:`group_studies` groups by StudyInstanceUID.

Nothing is ever written next to the inputs, and inputs are opened read-only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import re
import stat as stat_module
import warnings
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from .errors import CxrError, InputError, InvalidImageError, UnsupportedTransferSyntax, UsageError
from .normalise import (COLOUR_PICTURE_FRACTION, PixelParams, colour_fraction, colour_frame, colour_full_scale,
                        element_values, joined_values, patient_orientation, presentation_words)
from .records import FileKind, FileOutcome, Presentation, Radiograph, Rejection, Status, Study, patient_key
from .threadwarnings import caught, listed

log = logging.getLogger(__name__)

# files that only a cxrscreen output folder holds: batch's lock and state, watch's default ledger
OUTPUT_MARKERS = (".cxrscreen.lock", ".cxrscreen-state.json", ".cxrscreen-watch.sqlite")
IGNORED_SUFFIXES = (".part", ".partial", ".tmp", ".temp", "~", ".swp", ".crdownload")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
MAX_DIMENSION = 16384        # pixels per side; CR/DX detectors are under 5000
MIN_DIMENSION = 64
MAX_PIXELS = 100_000_000     # per frame: beyond this a file is a decompression bomb, not a radiograph
# Folders listed and headers read at a time once they wait more than they compute (:class:`Waits`: a network
# share); on a local disk whose files are cached, 8 threads made the scan twice as slow on 2 cores
SCAN_THREADS = 8

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "OT", "DR"})
CHEST_BODY_PARTS = frozenset({"", "CHEST", "THORAX", "LUNG", "LUNGS", "TORSO", "PORT CHEST"})
FRONTAL_VIEWS = frozenset({"", "PA", "AP"})
# DX, mammography and intra-oral "For Processing" storage: raw detector data, not meant to be displayed
FOR_PROCESSING_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2.1",
                                        "1.2.840.10008.5.1.4.1.1.1.3.1"})
# Presentation states (GSPS, colour, pseudo-colour, blending...: PS3.4 B.5): a file of one is listed as skipped
# with this tag, and the rotation and flip it gives its images are applied (see read_presentation)
PRESENTATION_STATE_CLASSES = "1.2.840.10008.5.1.4.1.1.11."
PRESENTATION_STATE_TAG = "(0008,0016) SOPClassUID"
# Rejection notes (IHE IOCM): a Key Object Selection whose document title is one of CID 7031's reasons for
# removal from operational use; the images it names are not screened (see read_rejection)
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
REJECTION_TITLES = {"113001": "Rejected for Quality Reasons", "113037": "Rejected for Patient Safety Reasons",
                    "113038": "Incorrect Modality Worklist Entry", "113039": "Data Retention Policy Expired"}
REJECTION_TAG = "(0040,A043) ConceptNameCodeSequence"
REJECTED_TAG = "(0008,0018) SOPInstanceUID"
# Secondary captures that are not pictures of a patient's radiograph (PS3.3 C.8.6.1 ConversionType);
# DF (digitized film), DV, DI, SI and WSD may be one and are screened.
NOT_RADIOGRAPH_CONVERSIONS = {"SD": "scanned document", "SYN": "synthetic image", "DRW": "drawing"}
_GREY_IMAGE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})   # Pillow's
_LATERAL_WORDS = re.compile(r"\b(LAT|LATERAL|LL|RL)\b")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- discovery

def temporary_suffix(name: str) -> str:
    """The suffix of :data:`IGNORED_SUFFIXES` that marks ``name`` as a transfer's temporary file, or ''."""
    return next((suffix for suffix in IGNORED_SUFFIXES if name.lower().endswith(suffix)), "")


def is_ignored(name: str) -> bool:
    """Hidden or temporary files, which a transfer in progress leaves behind."""
    return name.startswith(".") or bool(temporary_suffix(name))


def ignored_reason(name: str, folder: bool = False) -> str:
    """Why :func:`walk` leaves a hidden or temporary file, or a hidden folder, unread (see :func:`is_ignored`)."""
    if folder:
        return "a hidden folder (its name starts with '.'): not scanned"
    if name.startswith("._"):
        return ("a Mac's AppleDouble file (._*: the file information a Mac writes beside each file it copies to "
                "a share or USB disk; not an image): not read")
    if name == ".DS_Store":
        return "a Mac's folder view settings (.DS_Store; not an image): not read"
    if name.startswith("."):
        return "a hidden file (its name starts with '.'): not read"
    return f"a temporary name (*{temporary_suffix(name)}): a transfer still under way, or one that failed; not read"


def is_output_folder(names: Iterable[str]) -> bool:
    """Whether a folder whose files are ``names`` is where a cxrscreen writes (its lock, batch state or watch
    ledger is there). From the listing the walk has, not by asking for each marker: on a network share
    each question is a round trip, three per folder."""
    return not set(OUTPUT_MARKERS).isdisjoint(names)


def walk(root: Path | str, errors: list[OSError], seen: set[tuple[int, int]] | None = None,
         left_out: list[tuple[str, str]] | None = None, avoid: Mapping[tuple[int, int], str] | None = None,
         avoided: list[tuple[str, str]] | None = None,
         threads: int = SCAN_THREADS) -> Iterator[tuple[str, list[str], list[str]]]:
    """:func:`os.walk` of ``root`` as discovery needs it: top-down, each folder's sub-folders and files sorted.
    The caller may prune the sub-folders of the folder it is given, as with os.walk. Folders are listed one at
    a time until :data:`WALK_PROBE` listings in a row wait more than they compute (:class:`Waits`: a network
    share); then the next ones are listed ahead of their turn, ``threads`` at a time (1: never).

    * Links to folders are followed (an export may link a study's folder in from elsewhere), and each
      folder is walked once, known by its device and inode in ``seen`` (pass one set to share it between
      roots): a link back to a folder above it (a cycle) or to one walked already is not walked again,
      with a log line.
    * Hidden folders and files and temporary files (:func:`is_ignored`) are left out, each appended to
      ``left_out`` (when given) as ``(path, why)`` (:func:`ignored_reason`); cxrscreen's own output folders
      (:func:`is_output_folder`) are not entered, with a log line.
    * A folder whose device and inode are in ``avoid`` (watch's own folders: its archive and quarantine, which
      a link in the inbox may reach, would have their files taken again and moved into themselves) is not
      entered; each path reaching it is appended to ``avoided`` (when given) as ``(path, its name in avoid)``.
    * A folder that cannot be listed (no permission, an I/O error, removed while walked) is not skipped in
      silence: its :class:`OSError`, whose ``filename`` is the folder, is appended to ``errors`` as it is met,
      for the caller to report.
    """
    from concurrent.futures import ThreadPoolExecutor

    seen = set() if seen is None else seen
    waits = Waits(WALK_PROBE)
    pool = None
    listings: dict = {}          # folder -> its listing, asked for before its turn once listings wait

    def ask(folder: str) -> None:
        nonlocal pool
        if folder not in listings:
            pool = pool or ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cxr-walk")
            listings[folder] = pool.submit(_listing, folder)

    def listing(folder: str):
        if folder in listings:
            return listings.pop(folder).result()
        with waits.timed():
            return _listing(folder)

    try:
        stack = [os.fspath(root)]
        while stack:
            if waits.slow and threads > 1:       # the next folders to walk, listed ahead in threads
                for following in reversed(stack[-2 * threads:]):
                    ask(following)
            folder = stack.pop()
            listed = listing(folder)
            if isinstance(listed, OSError):
                errors.append(listed)
                continue
            st, dirs, files = listed
            if avoid and (st.st_dev, st.st_ino) in avoid:       # each link to it said, not only the first
                if avoided is not None:
                    avoided.append((folder, avoid[st.st_dev, st.st_ino]))
                continue
            if (st.st_dev, st.st_ino) in seen:
                log.info("not scanning %s: that folder is walked already (through a link, or named twice)", folder)
                continue
            seen.add((st.st_dev, st.st_ino))
            if is_output_folder(files):
                log.info("not scanning %s: a cxrscreen output folder (reports, not inputs)", folder)
                continue
            if left_out is not None:
                left_out.extend((os.path.join(folder, d), ignored_reason(d, folder=True)) for d in sorted(dirs)
                                if d.startswith("."))
                left_out.extend((os.path.join(folder, f), ignored_reason(f)) for f in sorted(files)
                                if is_ignored(f))
            dirs = sorted(d for d in dirs if not d.startswith("."))
            yield folder, dirs, sorted(name for name in files if not is_ignored(name))
            stack.extend(os.path.join(folder, name) for name in reversed(dirs))   # as the caller left them
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# The walk lists folders in threads once listings wait more than they compute: on a network share each folder
# costs round trips (its attributes, opening and reading its listing), and a PACS export has a folder per
# study; on a local disk threads would only add their handing over (benchmarks/share_scan.py).
WALK_PROBE = 8           # listings timed at a time, to decide


class Waits:
    """Whether calls timed in one thread wait (for a disk or a network) more than they compute: after every
    ``probe`` calls :meth:`timed`, ``slow`` says whether those waited longer, in wall time not spent on the
    CPU, than they computed. How the scan and the walk decide to use threads: on a network share their calls
    wait for round trips, which threads overlap; on a local disk whose files are cached the calls compute, in
    Python, and threads would only contend for the interpreter."""

    def __init__(self, probe: int) -> None:
        self.probe, self.slow = probe, False
        self._calls, self._waited, self._computed = 0, 0.0, 0.0

    @contextmanager
    def timed(self) -> Iterator[None]:
        import time

        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            cpu = time.thread_time() - cpu
            self._computed += cpu
            self._waited += time.perf_counter() - wall - cpu
            self._calls += 1
            if self._calls == self.probe:
                self.slow = self._waited > self._computed
                self._calls, self._waited, self._computed = 0, 0.0, 0.0


def _listing(folder: str) -> tuple[os.stat_result, list[str], list[str]] | OSError:
    """What :func:`os.walk` (following links) learns of ``folder``, with its stat: ``(stat, sub-folder names,
    other names)``, in the order listed; or the OSError that stopped it, naming the folder."""
    try:
        st = os.stat(folder)
        dirs, files = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:         # as os.walk: an entry whose type cannot be known is not a folder
                    is_dir = False
                (dirs if is_dir else files).append(entry.name)
        return st, dirs, files
    except OSError as exc:
        return exc


def unlistable(error: OSError, root: Path) -> FileOutcome:
    """The FAILED outcome of a folder :func:`walk` could not list (``root``, the folder walked, when the
    error names none): its files were not screened."""
    where = Path(os.fsdecode(error.filename)) if error.filename is not None else root
    return FileOutcome(where, Status.FAILED, f"cannot list the folder: {error.strerror or error}; "
                       "its files were not screened", step="discover")


def discover(inputs: Iterable[Path | str], *, threads: int = SCAN_THREADS) -> Iterator[Path | FileOutcome]:
    """Yield every candidate file under ``inputs`` (files or folders), recursively and sorted.

    Folders are walked by :func:`walk`: links to folders followed, each folder once (no cycles, and a
    folder given twice is listed once); hidden and temporary files and hidden folders are not read (see
    :func:`is_ignored`) but come as SKIPPED :class:`FileOutcome` saying why, so that none disappears
    from the run; cxrscreen's own output folders (:func:`is_output_folder`), with a log
    line: a ``--out`` inside the input would otherwise have its reports listed as skipped inputs, and its
    ``.dcm`` reports, which carry the study's UID, would join the study they report and change it, so that
    every re-run redid it. A folder that cannot be listed comes as a FAILED :class:`FileOutcome`
    (:func:`unlistable`), in its place in the walk. ``threads``: as many folders listed at a time, once
    listings wait (see :func:`walk`).
    """
    seen: set[tuple[int, int]] = set()
    for item in inputs:
        root = Path(item)
        if root.is_file() or not root.is_dir():
            yield root
            continue
        errors: list[OSError] = []
        left_out: list[tuple[str, str]] = []
        for folder, _dirs, files in walk(root, errors, seen, left_out, threads=threads):
            while errors:
                yield unlistable(errors.pop(0), root)
            for path, why in left_out:
                yield FileOutcome(Path(path), Status.SKIPPED, why, step="discover")
            left_out.clear()
            for name in files:
                yield Path(folder) / name
        for error in errors:
            yield unlistable(error, root)


HEAD_SIZE = 512     # the bytes that say what a file is (sniff, not_screenable)


def _read_head(path: Path) -> bytes:
    with _opened(path) as (_, head):
        return head


@contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, bytes]]:
    """``path`` opened for reading, and its first :data:`HEAD_SIZE` bytes; opening or reading it failing as an
    InputError. One open serves the recognition and the header read: on a share each open is a round trip."""
    try:
        handle = open(path, "rb")
        try:
            head = handle.read(HEAD_SIZE)
        except BaseException:
            handle.close()
            raise
    except PermissionError as exc:
        raise InputError(f"permission denied ({exc.strerror})", path=path, step="read") from None
    except IsADirectoryError:
        raise InputError("is a directory", path=path, step="read") from None
    except OSError as exc:
        raise InputError(f"cannot open: {exc.strerror or exc}", path=path, step="read") from None
    with handle:
        yield handle, head


def _looks_like_raw_dataset(head: bytes) -> bool:
    """A data set written without the Part-10 header starts with a group 0x0008 (or 0x0002) tag."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


NOT_SCREENABLE = "not a DICOM, JPEG or PNG file"
_ARCHIVE = "unpack it to screen the files it holds"
_OTHER_IMAGE = "cxrscreen reads DICOM, JPEG and PNG: export the image as one of them"
# What a file that is none of those is, when its first bytes say: a study sent as an archive, or exported in an
# image format cxrscreen does not read, is then named in its reason rather than passed over as "not an image".
_SIGNATURES = (
    ((b"PK\x03\x04", b"PK\x05\x06"), f"a ZIP archive: {_ARCHIVE}"),
    ((b"\x1f\x8b",), f"a gzip-compressed file: {_ARCHIVE}"),
    ((b"7z\xbc\xaf\x27\x1c",), f"a 7-Zip archive: {_ARCHIVE}"),
    ((b"Rar!\x1a\x07",), f"a RAR archive: {_ARCHIVE}"),
    ((b"BZh",), f"a bzip2-compressed file: {_ARCHIVE}"),
    ((b"\xfd7zXZ\x00",), f"an xz-compressed file: {_ARCHIVE}"),
    ((b"(\xb5/\xfd",), f"a zstd-compressed file: {_ARCHIVE}"),
    ((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), f"a TIFF image: {_OTHER_IMAGE}"),
    ((b"GIF87a", b"GIF89a"), f"a GIF image: {_OTHER_IMAGE}"),
    ((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ"), f"a JPEG 2000 image: {_OTHER_IMAGE}"),
    ((b"%PDF-",), "a PDF document, not an image"),
)


def not_screenable(path: Path, head: bytes | None = None) -> str:
    """Why a file that :func:`sniff` did not recognise is not screened: what it is when its first bytes say
    (an archive, a TIFF...), else :data:`NOT_SCREENABLE`."""
    head = _read_head(path) if head is None else head
    for magics, reason in _SIGNATURES:
        if head.startswith(magics):
            return reason
    if len(head) >= 262 and head[257:262] == b"ustar":
        return f"a tar archive: {_ARCHIVE}"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return f"a WebP image: {_OTHER_IMAGE}"
    if head[4:8] == b"ftyp":         # ISO base media: a phone's HEIC photograph, AVIF, or a video
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return f"a HEIC/HEIF image (a phone's photograph): {_OTHER_IMAGE}"
        if brand in (b"avif", b"avis"):
            return f"an AVIF image: {_OTHER_IMAGE}"
        return "an MP4 or QuickTime video (or other ISO media file), not an image"
    if len(head) >= 18 and head[:2] == b"BM" and head[6:10] == b"\0\0\0\0" and \
            int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):     # BITMAPINFOHEADER sizes
        return f"a BMP image: {_OTHER_IMAGE}"
    return NOT_SCREENABLE


def sniff(path: Path, head: bytes | None = None) -> FileKind | None:
    """Recognise a file by its content; None when it is none of DICOM, JPEG, PNG."""
    head = _read_head(path) if head is None else head
    if len(head) >= 132 and head[128:132] == b"DICM":
        return FileKind.DICOM
    if head.startswith(_JPEG_MAGIC):
        return FileKind.JPEG
    if head.startswith(_PNG_MAGIC):
        return FileKind.PNG
    if _looks_like_raw_dataset(head):
        try:
            ds = _dcmread(path, stop_before_pixels=True, force=True)
        except InputError:
            return None
        if "SOPClassUID" in ds or "StudyInstanceUID" in ds or "Modality" in ds:
            return FileKind.DICOM
    return None


# --------------------------------------------------------------------------- reading

def _dcmread(path: Path, *, stop_before_pixels: bool, force: bool = False, defer_size: int | None = None,
             pass_warnings_on: bool = False, handle: BinaryIO | None = None):
    """pydicom.dcmread with the file's errors as InputError (a truncated file included). The other warnings of
    the parse are passed on to the caller when ``pass_warnings_on`` (:func:`_header_warnings` logs them once
    per file, when its header is read), else dropped (the file is read again to decode its pixels).
    ``handle``: ``path`` already open, read from its start (deferred values are read later by name)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with caught() as seen:
            if handle is not None:
                handle.seek(0)
            ds = pydicom.dcmread(path if handle is None else handle, stop_before_pixels=stop_before_pixels,
                                 force=force, defer_size=defer_size)
    except PermissionError as exc:
        raise InputError(f"permission denied ({exc.strerror})", path=path, step="read") from None
    except InvalidDicomError as exc:
        raise InputError(f"not a valid DICOM file: {exc}", path=path, step="read") from None
    except EOFError as exc:
        raise InputError(f"file is truncated: {exc or 'unexpected end of file'}", path=path, step="read") from None
    except Exception as exc:  # pydicom raises many types on malformed data
        raise InputError(f"cannot parse the data set: {type(exc).__name__}: {exc}",
                         path=path, step="read") from None
    for warning in seen:
        text = str(warning.message)
        if "End of file" in text or "truncated" in text.lower():
            raise InputError(f"file is truncated: {text}", path=path, step="read")
    for warning in seen if pass_warnings_on else ():      # a VR guessed, a value of the wrong length...
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if len(ds) == 0:
        raise InputError("no DICOM data elements could be parsed", path=path, step="read")
    _infer_transfer_syntax(ds)
    return ds


def _infer_transfer_syntax(ds) -> None:
    """A raw data set (no Part-10 header) gets the syntax it was parsed with, in memory only."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def read_dicom(path: Path | str):
    """Read a whole DICOM file (pixels included), with the file's errors as InputError."""
    return _dcmread(Path(path), stop_before_pixels=False, force=True)


class _DisplayHeader(NamedTuple):
    width: int
    height: int
    mode: str           # Pillow's
    orientation: int    # EXIF Orientation (0112), 1 (as stored) when absent or not one of 1-8


def _exif_orientation(img) -> int:
    """The EXIF Orientation of an opened JPEG or PNG, from the Exif block read with its header (never
    :meth:`PIL.Image.Image.getexif`, which decodes a PNG to look for one after the image data)."""
    from PIL import Image

    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
        value = int(exif.get(0x0112, 1))
    except Exception:       # an Exif block that does not parse: shown as stored, as viewers do
        return 1
    return value if 1 <= value <= 8 else 1


# EXIF Orientation (CIPA DC-008, tag 0112) -> the numpy view that shows the stored array upright (1: as
# stored): 2 mirrored, 3 upside down, 4 flipped, 5 transposed, 6 to be turned 90 degrees clockwise, 7 transversed,
# 8 to be turned 90 degrees anticlockwise.
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _display_header(path: Path, handle: BinaryIO | None = None) -> _DisplayHeader:
    """Size, Pillow mode and EXIF orientation of a JPEG or PNG, its size checked before anything is decoded;
    from ``handle``, ``path`` already open, where given."""
    from PIL import Image

    try:
        with caught() as seen:
            if handle is not None:
                handle.seek(0)
            with Image.open(path if handle is None else handle) as img:     # the header only: nothing decoded
                (width, height), mode, orientation = img.size, img.mode, _exif_orientation(img)
        bomb = next((w.message for w in seen if issubclass(w.category, Image.DecompressionBombWarning)), None)
        if bomb is not None:
            raise bomb
    except PermissionError as exc:
        raise InputError(f"permission denied ({exc.strerror})", path=path, step="read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"absurd image size: {exc}", path=path, step="validate") from None
    except Exception as exc:
        damage = _png_file_damage(path)
        raise InputError(f"the PNG data is damaged: {damage}" if damage else f"cannot read the image header: {exc}",
                         path=path, step="read") from None
    _check_dimensions(height, width, path, tag="")
    return _DisplayHeader(width, height, mode, orientation)


def read_display_image(path: Path | str, reduced: bool = False) -> np.ndarray:
    """Decode a JPEG or PNG (8 or 16 bits, grey or BGR), checking its size first, upright as a viewer shows
    it: turned or mirrored as its EXIF Orientation says (a phone's photograph of a film, held upright, is
    stored sideways with Orientation 6).

    ``reduced``: 8-bit BGR at a quarter of the size when the image is 1024 pixels a side or more (a
    JPEG decodes that fast, from its DCT coefficients), for a look at its colours.
    """
    path = Path(path)
    return _decode_display(path, _display_header(path), reduced)


def _decode_display(path: Path, header: _DisplayHeader, reduced: bool) -> np.ndarray:
    """:func:`read_display_image` once :func:`_display_header` has been read."""
    import cv2

    flag = cv2.IMREAD_UNCHANGED     # which, unlike OpenCV's other modes, ignores the EXIF orientation
    if reduced:
        flag = (cv2.IMREAD_REDUCED_COLOR_4 if max(header.width, header.height) >= 1024 else cv2.IMREAD_COLOR) \
            | cv2.IMREAD_IGNORE_ORIENTATION
    data = np.fromfile(path, dtype=np.uint8)
    arr = None
    if not reduced and data[:2].tobytes() == b"\xff\xd8":       # a JPEG: checked as it is decoded
        arr = _jpeg_as_opencv_decodes(data, path)
    if data[:8].tobytes() == _PNG_MAGIC and (damage := png_damage(data.tobytes())) is not None:
        raise InputError(f"the PNG data is damaged: {damage}", path=path, step="decode")
    if arr is None:
        arr = cv2.imdecode(data, flag)
    if arr is None:
        raise InputError("the image data cannot be decoded (corrupt or truncated)", path=path, step="decode")
    if header.orientation != 1:
        arr = np.ascontiguousarray(_UPRIGHT[header.orientation](arr))
    return arr


def _png_file_damage(path: Path) -> str | None:
    """:func:`png_damage` of a file whose header did not read, when it is a PNG and can be read."""
    try:
        with open(path, "rb") as handle:
            return png_damage(_PNG_MAGIC + handle.read()) if handle.read(8) == _PNG_MAGIC else None
    except OSError:
        return None


def png_damage(data: bytes) -> str | None:
    """What is wrong with a PNG file's chunks (``data``, from its signature on), or None: one that ends before
    its IEND chunk, or a chunk whose CRC does not match its data, as after bytes changed in a transfer or on a
    disk. libpng refuses both (but writes why to stderr naming no file, and OpenCV says only that it cannot
    decode), and so did Pillow reading the header where the chunk comes before the image data ("cannot
    identify image file"); a text or other ancillary chunk after it libpng only warned of, and the file was
    screened: its own checksums say it was changed, and it is refused as the rest."""
    at = len(_PNG_MAGIC)
    while True:
        if at + 12 > len(data):
            return f"the file ends at byte {len(data):,} before its IEND chunk (truncated)"
        length = int.from_bytes(data[at:at + 4], "big")
        kind = data[at + 4:at + 8]
        name = kind.decode("latin-1")
        if length > 0x7FFFFFFF or at + 12 + length > len(data):
            return f"its {name!r} chunk at byte {at:,} runs past the end of the file at byte {len(data):,} (truncated)"
        stored = int.from_bytes(data[at + 8 + length:at + 12 + length], "big")
        if zlib.crc32(data[at + 4:at + 8 + length]) != stored:
            return (f"its {name!r} chunk at byte {at:,} fails its CRC check (its bytes were changed, in a transfer "
                    "or on a disk)")
        if kind == b"IEND":
            return None
        at += 12 + length


# libjpeg's recoverable errors that leave a picture damaged: it decodes on past them (the blocks after a bad
# Huffman code garbled, the part after a premature end grey) and says so only in a warning, which OpenCV writes
# to stderr naming no file, and Pillow and pylibjpeg drop. The others leave the picture whole (a bad ICC
# profile, an unknown JFIF revision or Adobe transform code, odd scan parameters).
_JPEG_DAMAGE = re.compile(r"Corrupt JPEG data: (?!bad ICC marker)|Premature end of JPEG file|"
                          r"Inconsistent progression sequence")


def jpeg_damage(codestream, colorspace: str = "GRAY", **scaling) -> tuple[np.ndarray | None, str | None]:
    """A JPEG codestream (bytes or uint8 array) decoded by libjpeg-turbo (simplejpeg) in ``colorspace``
    (``scaling``: its ``min_factor``, ``min_height``, ``min_width``), strictly: ``(pixels, None)``; ``(None,
    libjpeg's message)`` when it decodes only with a recoverable error that damages the picture
    (:data:`_JPEG_DAMAGE`: corrupt entropy-coded data, a premature end); ``(None, None)`` when simplejpeg does
    not decode this kind (CMYK, 12 bits, lossless), cannot decode it at all, or decodes it only with a warning
    that leaves the picture whole: another decoder decodes it, and says why where it cannot either."""
    import simplejpeg

    if scaling and (_frame_header(codestream) or (None,))[0] not in _SCALABLE_FRAMES:
        scaling = {}        # simplejpeg sizes its buffer scaled, libjpeg decodes a lossless frame whole: a crash
    try:
        return simplejpeg.decode_jpeg(codestream, colorspace=colorspace, strict=True, **scaling), None
    except ValueError as exc:
        said = str(exc).strip()
    if _padded_before_the_end(codestream, said):
        return simplejpeg.decode_jpeg(codestream, colorspace=colorspace, strict=False, **scaling), None
    return None, (said if _JPEG_DAMAGE.match(said) else None)


# Start-of-frame markers of DCT frames (baseline, extended, progressive; Huffman or arithmetic coded), which
# libjpeg decodes scaled; the lossless ones (C3, C7, CB, CF) and hierarchical ones it decodes at full size.
_SCALABLE_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})


def _frame_header(codestream) -> tuple[int, int, int, int] | None:
    """A JPEG or JPEG-LS codestream's first start-of-frame segment as ``(marker, precision, lines, samples per
    line)``, the marker its second byte (0xC0-0xCF but DHT C4, JPG C8 and DAC CC; JPEG-LS's SOF55, F7), read
    from the marker segments after SOI; None when there is none before the scan or the segments cannot be
    followed."""
    data = bytes(codestream)
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:              # fill byte before a marker
            at += 1
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if at + 9 > len(data):
                return None
            return (marker, data[at + 4], int.from_bytes(data[at + 5:at + 7], "big"),
                    int.from_bytes(data[at + 7:at + 9], "big"))
        if marker in (0xD9, 0xDA):      # the end, or a scan, before any frame
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:    # markers without a length
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


_EXTRANEOUS_BEFORE_END = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9$")


def _padded_before_the_end(codestream, said: str) -> bool:
    """Whether libjpeg's only complaint, ``N extraneous bytes before marker 0xd9``, is of N zero bytes just
    before the end-of-image marker: padding (to an even length, say) that some encoders put there, after
    the whole picture. Data damaged inside leaves the decoder short of or past the end of its scan, and the
    bytes it then skips are coded data, not zeros."""
    found = _EXTRANEOUS_BEFORE_END.match(said)
    if found is None:
        return False
    data = bytes(codestream)
    end, count = data.rfind(b"\xff\xd9"), int(found.group(1))
    return 0 < count < end and not any(data[end - count:end]) and data[end - count - 1] != 0xFF  # not a stuffed FF


def _corrupt_jpeg(whose: str, damage: str) -> str:
    """What a failure for JPEG data damaged inside says (``whose``: "the", "frame 1's")."""
    return (f"{whose} JPEG data is corrupt (libjpeg: {damage}): decoders go on past it without a word, the picture "
            "garbled or grey from there, and it would be screened as image")


def _jpeg_as_opencv_decodes(data: np.ndarray, path: Path) -> np.ndarray | None:
    """A JPEG file's pixels as ``cv2.IMREAD_UNCHANGED`` gives them (grey, or BGR; both decode with
    libjpeg-turbo's accurate DCT and smooth upsampling, pixel for pixel the same), decoded strictly: an
    InputError naming libjpeg's message when the data is damaged (:func:`jpeg_damage`); None for what OpenCV
    decodes instead (CMYK, 12 bits, a header simplejpeg does not read)."""
    import simplejpeg

    try:
        colourspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return None
    target = {"Gray": "GRAY", "YCbCr": "BGR", "RGB": "BGR"}.get(colourspace)
    if target is None:
        return None
    arr, damage = jpeg_damage(data, target)
    if damage is not None:
        raise InputError(_corrupt_jpeg("the", damage), path=path, step="decode")
    return arr[..., 0] if arr is not None and target == "GRAY" else arr


def _check_dimensions(rows: int, columns: int, path: Path, tag: str = "(0028,0010) Rows",
                      minimum: int = MIN_DIMENSION) -> None:
    if not (minimum <= rows <= MAX_DIMENSION and minimum <= columns <= MAX_DIMENSION) \
            or rows * columns > MAX_PIXELS:
        raise InvalidImageError(
            f"absurd image dimensions {rows} x {columns} (accepted: {minimum}-{MAX_DIMENSION} "
            f"pixels a side, at most {MAX_PIXELS:,} pixels)", path=path, step="validate", tag=tag)


# The Image Pixel module's numbers (PS3.3 C.7.6.3) and the frame count: one whole number each. A damaged header can
# make two of one (4 bytes of a US read as two values), which the code after met as a list ("int() argument must
# be ... not 'list'", "'<' not supported between ..."), naming no attribute.
PIXEL_DESCRIPTION = (("Rows", "(0028,0010)"), ("Columns", "(0028,0011)"), ("SamplesPerPixel", "(0028,0002)"),
                     ("BitsAllocated", "(0028,0100)"), ("BitsStored", "(0028,0101)"), ("HighBit", "(0028,0102)"),
                     ("PixelRepresentation", "(0028,0103)"), ("PlanarConfiguration", "(0028,0006)"),
                     ("NumberOfFrames", "(0028,0008)"))


def check_pixel_description(ds, path: Path | None = None, keywords: Iterable[str] | None = None) -> None:
    """Fail a data set one of whose :data:`PIXEL_DESCRIPTION` attributes (or of those of them named in
    ``keywords``) holds more than one value, or one that is not a whole number, naming it (absent ones are left to
    the checks that need them). The header read checks Rows and Columns only, which it reads: a file it skips
    (not a radiograph) is not failed for the others; decoding checks them all."""
    for keyword, tag in PIXEL_DESCRIPTION:
        if keywords is not None and keyword not in keywords:
            continue
        values = element_values(ds.get(keyword, None))
        if len(values) > 1:
            said = f"holds {len(values)} values ({joined_values(values)}), where the standard allows one"
        elif values and _whole_number(values[0]) is None:
            said = f"value '{joined_values(values)}' is not a whole number"
        else:
            continue
        raise InvalidImageError(f"{said}: the header is damaged", path=path, step="validate", tag=f"{tag} {keyword}")


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


# Declared sets whose text is in fact UTF-8 when it all decodes as UTF-8 (see undeclared_utf8)
_UTF8_MISTAKEN_FOR = frozenset({"", "ISO_IR 6", "ISO_IR 100"})


def undeclared_utf8(ds) -> str | None:
    """What (0008,0005) Specific Character Set declares ("" for nothing) when the data set's text is in fact
    UTF-8, else None.

    Without that attribute the text must be ASCII (PS3.5 6.1.2.1); pydicom then reads other bytes
    as Latin-1, so a name a modality or an export tool wrote in UTF-8 and did not declare reads
    ``MÃ¼ller``. The same name is read so where the file declares ``ISO_IR 100`` (Latin-1), the set
    a modality configured for Western Europe declares whatever its software then writes. When the
    character set is absent, ``ISO_IR 6`` or ``ISO_IR 100``, and every top-level text value with
    bytes over 127 is valid UTF-8, the text is UTF-8: Latin-1 text almost never is, since its accented
    letters are single bytes that UTF-8 does not allow alone, and a letter followed by one of the
    symbols 0xA0-0xBF, the only way it could be, spells nothing (``Ã¼``). Any other declared set is
    obeyed: in Cyrillic, Greek or Latin-2 (uppercase ``ÓŁ`` is valid UTF-8) real text can pass for UTF-8.
    """
    from pydicom.datadict import dictionary_VR

    declared = ds.get_item(0x00080005)
    value = getattr(declared, "value", None)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    values = value.split("\\") if isinstance(value, str) else list(value or [])
    terms = {str(v).strip() for v in values} - {""}
    if len(terms) > 1 or not terms <= _UTF8_MISTAKEN_FOR:
        return None
    found = False
    for tag in ds.keys():
        # keep_deferred: a value longer than the read's defer_size (the pixel data) stays unread; before, the
        # header scan read every file's pixel data here, megabytes per file, from a network share too
        element = ds.get_item(tag, keep_deferred=True)
        raw = getattr(element, "value", None)
        if not isinstance(raw, bytes) or not any(b > 127 for b in raw):
            continue
        vr = element.VR
        if vr is None:                       # implicit VR: the dictionary's
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr not in _TEXT_VRS:
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        found = True
    return next(iter(terms), "") if found else None


def _character_set(ds) -> str:
    """(0008,0005) Specific Character Set as written, its values joined by a backslash."""
    value = ds.get("SpecificCharacterSet", None)
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else "\\".join(str(v).strip() for v in value)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, None)
    if keyword in ("PatientName", "ReferringPhysicianName"):     # PN: every component group, as written
        return "" if value is None else str(value).strip()
    values = element_values(value)
    return str(values[0]).strip() if values else ""


def _all_text(ds, keyword: str) -> str:
    """A one-valued attribute that selection decides by or a report shows, every value shown: a damaged header
    that makes two values of it (``PA\\LL``) gives both, which no rule takes for a chest or a frontal view, and
    the skip names them, where the first alone was taken before; a Patient Age of two (``045Y\\003Y``) is no
    age the population caution reads (the dates decide) and the report shows it as written, as it does a sex or
    a laterality of two."""
    return joined_values(ds.get(keyword, None))


def dataset_patient_key(ds) -> str:
    """The patient of a read data set, as :attr:`cxrscreen.records.Radiograph.patient_key` names them."""
    return patient_key(_text(ds, "IssuerOfPatientID"), _text(ds, "PatientID"))


def _file_uid(path: Path) -> str:
    """A stable pseudo-StudyInstanceUID for a JPEG/PNG (each such file is its own study)."""
    digest = hashlib.sha1(os.fsencode(path.resolve())).hexdigest()     # the name as bytes: any name, UTF-8 or not
    return f"file-{digest[:20]}"


def _name(value: str) -> str:
    """A header value as selection compares it to a site's names: capitals, runs of spaces as one, no spaces
    at the ends."""
    return " ".join(str(value).upper().split())


@dataclass(frozen=True)
class Selection:
    """Which images :func:`select` lets through beyond the default (a frontal chest radiograph).

    ``include_lateral`` and ``any_body_part`` lift the view and body part rules; ``chest_body_parts`` and
    ``frontal_views`` widen them by a site's own names for the chest and for a frontal view (a modality
    that writes BodyPartExamined ``TORAX``, or ViewPosition ``PA ERECT``), compared in capitals. Names a
    site gives are kept as they are compared (:func:`_name`); an empty one is refused.
    """

    include_lateral: bool = False
    any_body_part: bool = False
    chest_body_parts: frozenset[str] = frozenset()
    frontal_views: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("chest_body_parts", "frontal_views"):
            values = getattr(self, name)
            if isinstance(values, str):
                values = (values,)
            names = frozenset(_name(v) for v in values)
            if "" in names:
                raise UsageError(f"{SELECTION_OPTIONS[name]} needs a name (an empty value is already screened)")
            object.__setattr__(self, name, names)

    def as_json(self) -> dict:
        return {"include_lateral": self.include_lateral, "any_body_part": self.any_body_part,
                "chest_body_parts": sorted(self.chest_body_parts), "frontal_views": sorted(self.frontal_views)}


EVERY_IMAGE = Selection(include_lateral=True, any_body_part=True)
# The command-line option that sets each field of a Selection, as messages name it
SELECTION_OPTIONS = {"include_lateral": "--include-lateral", "any_body_part": "--any-body-part",
                     "chest_body_parts": "--chest-body-part", "frontal_views": "--frontal-view"}


def selection_options_text(selection: dict) -> str:
    """:meth:`Selection.as_json` (a run's, or the one a calibration file records) as the options that give it;
    'none' for the default."""
    words = []
    for field, option in SELECTION_OPTIONS.items():
        value = selection.get(field)
        if isinstance(value, list):
            words += [f"{option} {name!r}" for name in value]
        elif value:
            words.append(option)
    return " ".join(words) or "none"


@dataclass(frozen=True)
class SelectionRule:
    """A rule that skips an image: a field of the Radiograph, a test on its value, a reason.

    ``override`` names the :class:`Selection` flag that lifts the rule (``include_lateral``,
    ``any_body_part``) and ``widen`` the Selection's names it also lets through; empty when there is none.
    """

    field: str
    tag: str
    rejects: Callable[[str], bool]
    reason: str
    override: str = ""
    widen: str = ""

    def skips(self, value: str, selection: Selection) -> bool:
        if self.override and getattr(selection, self.override):
            return False
        if self.widen and _name(value) in getattr(selection, self.widen):
            return False
        return self.rejects(value)


SELECTION_RULES: tuple[SelectionRule, ...] = (
    SelectionRule("modality", "(0008,0060) Modality",
                  lambda v: v.upper() not in RADIOGRAPH_MODALITIES,
                  "modality '{value}' is not a projection radiograph (scored: CR, DX, RG, OT)"),
    SelectionRule("presentation_intent", "(0008,0068) PresentationIntentType",
                  lambda v: v == "FOR PROCESSING",
                  "raw detector image (FOR PROCESSING), not processed for display; the FOR PRESENTATION "
                  "image of the same exposure is the one to screen"),
    SelectionRule("conversion_type", "(0008,0064) ConversionType",
                  lambda v: v in NOT_RADIOGRAPH_CONVERSIONS,
                  "secondary capture of a {label} (ConversionType {value}), not a radiograph"),
    SelectionRule("body_part", "(0018,0015) BodyPartExamined",
                  lambda v: v.upper() not in CHEST_BODY_PARTS,
                  "body part '{value}' is not chest (--chest-body-part adds a site's own name for the chest)",
                  override="any_body_part", widen="chest_body_parts"),
    SelectionRule("view_position", "(0018,5101) ViewPosition",
                  lambda v: v.upper() not in FRONTAL_VIEWS,
                  "view '{value}' is not frontal (PA/AP; --frontal-view adds a site's own name for one)",
                  override="include_lateral", widen="frontal_views"),
)


def select(record: Radiograph, selection: Selection = Selection()) -> FileOutcome | None:
    """Apply :data:`SELECTION_RULES` as ``selection`` widens them; a SKIPPED outcome for the first rule that
    rejects, else None."""
    for rule in SELECTION_RULES:
        value = getattr(record, rule.field)
        if rule.skips(value, selection):
            reason = rule.reason.format(value=value, label=NOT_RADIOGRAPH_CONVERSIONS.get(value, ""))
            return FileOutcome(record.path, Status.SKIPPED, reason, step="select", tag=rule.tag,
                               **record.identifiers())
    return None


def colour_picture(record: Radiograph, ds=None, handle: BinaryIO | None = None) -> FileOutcome | None:
    """A SKIPPED outcome when a colour image is a colour picture rather than a radiograph, else None.

    :func:`cxrscreen.normalise.colour_fraction` measures how much of the first frame has colour that its
    brightness does not explain; over :data:`~cxrscreen.normalise.COLOUR_PICTURE_FRACTION` the image is a
    photograph, a colour test pattern or a heatmap overlay, not a radiograph (even a tinted
    film scan, or one with colour annotations, stays far below). Grey images are not decoded here. ``ds``
    is the data set of a DICOM record (its pixels are read now); JPEG/PNG are decoded from ``record.path``
    (their header read from ``handle``, the file already open, where given). An image that cannot be decoded
    passes: the decode step fails it, naming the cause.
    """
    import cv2

    try:
        if ds is None:
            header = _display_header(record.path, handle)
            if header.mode in _GREY_IMAGE_MODES:
                return None
            bgr = _decode_display(record.path, header, reduced=True)
            if bgr.ndim != 3:
                return None
            fraction, tag = colour_fraction(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), 255.0), ""
        else:
            if record.photometric.upper().startswith("MONOCHROME") or not record.photometric:
                return None
            params = PixelParams.from_dataset(ds)
            rgb = colour_frame(ds)
            if rgb.ndim != 3 or rgb.shape[-1] != 3:
                return None
            fraction, tag = colour_fraction(rgb, colour_full_scale(rgb, params)), "(0028,0004) PhotometricInterpretation"
    except Exception:   # not dropped: the decode step meets the same error and fails the file, naming it
        return None
    if fraction <= COLOUR_PICTURE_FRACTION:
        return None
    return FileOutcome(record.path, Status.SKIPPED,
                       f"a colour picture, not a radiograph: {fraction:.0%} of its pixels have colour that their "
                       f"brightness does not explain (over {COLOUR_PICTURE_FRACTION:.0%}; a radiograph, even a "
                       "tinted film scan or one with colour annotations, has a few per cent at most)",
                       step="select", tag=tag, **record.identifiers())


# View Code Sequence (0054,0220), CID 4010 "DX View": the frontal views, by SNOMED CT and legacy SNOMED-RT code
_FRONTAL_VIEW_CODES = {"272479007": "PA", "R-10214": "PA", "399348003": "AP", "R-10206": "AP"}
# Anatomic Region Sequence (0008,2218), CID 4031: the chest, by SNOMED CT and legacy SNOMED-RT code (PS3.16
# Annex L maps BodyPartExamined CHEST to 51185008 and LUNG to 39607008), and the names a local code may give it
_CHEST_REGION_CODES = {"51185008": "CHEST", "T-D3000": "CHEST", "39607008": "LUNG", "T-28000": "LUNG",
                       "67734004": "THORAX"}
_CHEST_REGION_MEANINGS = frozenset({"chest", "thorax", "thoracicstructure", "thoracicsegmentoftrunk", "lung", "lungs"})


def _first_code(ds, keyword: str) -> tuple[str, str] | None:
    """(CodeValue, CodeMeaning) of the first item of the code sequence ``keyword``; None when it is absent or
    empty, or cannot be read (a damaged sequence says nothing usable: the other attributes decide)."""
    try:
        items = ds.get(keyword, None) or ()
        item = items[0] if len(items) else None
        return None if item is None else (_text(item, "CodeValue"), _text(item, "CodeMeaning"))
    except Exception:
        return None


def _coded_view(ds) -> str:
    """The view the View Code Sequence gives (a DX image may code it and leave ViewPosition empty): PA or AP
    for a frontal code or meaning, else the code's meaning in capitals (LATERAL, LEFT LATERAL, LEFT
    OBLIQUE...), which selection skips as not frontal; '' when there is none or it cannot be read."""
    code = _first_code(ds, "ViewCodeSequence")
    if code is None:
        return ""
    value, meaning = code
    if value in _FRONTAL_VIEW_CODES:
        return _FRONTAL_VIEW_CODES[value]
    letters = re.sub(r"[^a-z]", "", meaning.lower())
    if letters.startswith("posteroanterior") or letters == "pa":
        return "PA"
    if letters.startswith("anteroposterior") or letters == "ap":
        return "AP"
    return meaning.upper()


def _body_part(ds) -> str:
    """BodyPartExamined in capitals; when it is empty, the Anatomic Region Sequence's region: in a DX image that
    sequence is required and BodyPartExamined optional, and a knee coded only there was screened as a chest.
    A chest code or meaning gives a name of :data:`CHEST_BODY_PARTS`; another region its meaning in capitals
    (its code value when it has none), which selection skips as not chest; '' when neither says anything."""
    part = _all_text(ds, "BodyPartExamined").upper()
    code = None if part else _first_code(ds, "AnatomicRegionSequence")
    if code is None:
        return part
    value, meaning = code
    if value in _CHEST_REGION_CODES:
        return _CHEST_REGION_CODES[value]
    if re.sub(r"[^a-z]", "", meaning.lower()) in _CHEST_REGION_MEANINGS:
        return "CHEST"
    return (meaning or value).upper()


def _view_position(ds) -> str:
    """ViewPosition; else the View Code Sequence's view; else 'LATERAL' when the protocol or series text says so."""
    view = _all_text(ds, "ViewPosition").upper() or _coded_view(ds)
    if view:
        return view
    words = " ".join(_text(ds, k) for k in ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription"))
    if _LATERAL_WORDS.search(words.upper()):
        return "LATERAL"
    return ""


def _dicom_record(path: Path, ds, stat: os.stat_result) -> Radiograph:
    if ds.get("DirectoryRecordSequence") is not None or str(ds.get("SOPClassUID", "")) == "1.2.840.10008.1.3.10":
        raise _Skip("DICOMDIR (media storage directory index), not an image", "(0004,1220) DirectoryRecordSequence")
    study_uid = _text(ds, "StudyInstanceUID") or f"nostudy-{_file_uid(path)}"
    ts = transfer_syntax(ds)
    check_pixel_description(ds, path, ("Rows", "Columns"))
    return Radiograph(
        path=path, kind=FileKind.DICOM, study_uid=study_uid,
        sop_uid=_text(ds, "SOPInstanceUID"), series_uid=_text(ds, "SeriesInstanceUID"),
        sop_class=_text(ds, "SOPClassUID"), character_set=_character_set(ds),
        patient_id=_text(ds, "PatientID"), issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"), patient_sex=_all_text(ds, "PatientSex"),
        patient_age=_all_text(ds, "PatientAge"),
        accession=_text(ds, "AccessionNumber"), study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"), study_id=_text(ds, "StudyID"),
        referring_physician=_text(ds, "ReferringPhysicianName"), study_description=_text(ds, "StudyDescription"),
        modality=_all_text(ds, "Modality").upper(),
        body_part=_body_part(ds), view_position=_view_position(ds),
        laterality=_all_text(ds, "ImageLaterality") or _all_text(ds, "Laterality"),
        patient_orientation=patient_orientation(ds),
        presentation_intent=_text(ds, "PresentationIntentType").upper()
        or ("FOR PROCESSING" if _text(ds, "SOPClassUID") in FOR_PROCESSING_SOP_CLASSES else ""),
        conversion_type=_text(ds, "ConversionType").upper(),
        rows=int(ds.get("Rows", 0) or 0), columns=int(ds.get("Columns", 0) or 0), frames=_frames(ds),
        photometric=_text(ds, "PhotometricInterpretation"), transfer_syntax=ts,
        size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns,
    )


def transfer_syntax(ds) -> str:
    """The data set's Transfer Syntax UID as text, '' when it has no file meta information or none there."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _frames(ds) -> int:
    """NumberOfFrames (IS), 1 when absent or unreadable: decoding names a real problem later."""
    try:
        return max(1, int(str(ds.get("NumberOfFrames", 1) or 1).strip()))
    except ValueError:
        return 1


class _Skip(Exception):
    def __init__(self, reason: str, tag: str = "") -> None:
        super().__init__(reason)
        self.reason, self.tag = reason, tag


def _special_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a folder is, in words; "" for those two."""
    for test, kind in ((stat_module.S_ISFIFO, "a FIFO (named pipe)"), (stat_module.S_ISSOCK, "a socket"),
                       (stat_module.S_ISCHR, "a character device"), (stat_module.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return ""


def _dangling(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "a target"
    return f"a symbolic link to {target}, which does not exist"


def not_regular(path: Path | str) -> str:
    """Why ``path`` must not be opened as an input file: a FIFO, socket or device (opening blocks or
    streams forever), or a symbolic link whose target is missing; "" for a regular file, a folder, or a
    path that is gone (its reader says so)."""
    try:
        return _special_kind(os.stat(path).st_mode)
    except OSError:
        return _dangling(Path(path)) if os.path.islink(path) else ""


def read_record(path: Path | str, selection: Selection = Selection()) -> Radiograph | FileOutcome:
    """Read one file's header and decide, by ``selection``: a Radiograph to score, or a SKIPPED/FAILED outcome."""
    path = Path(path)
    try:
        try:
            stat = path.stat()
        except OSError as exc:
            if path.is_symlink():
                raise InputError(_dangling(path), path=path, step="read") from None
            raise InputError(f"cannot stat: {exc.strerror or exc}", path=path, step="read") from None
        special = _special_kind(stat.st_mode)
        if special:     # never opened: reading a FIFO, socket or device blocks or streams forever
            return FileOutcome(path, Status.SKIPPED, f"{special}, not a regular file: not opened", step="discover")
        if stat.st_size == 0:
            raise InputError("empty file (0 bytes): the transfer failed or is still in progress",
                             path=path, step="read")
        with _opened(path) as (handle, head):
            kind = sniff(path, head)
            if kind is None:
                what = not_screenable(path, head)
                if path.suffix.lower() in DICOM_SUFFIXES:
                    preview = head[:16]
                    raise InputError(f"named {path.suffix} but is not DICOM: " + (
                        what if what != NOT_SCREENABLE else
                        f"no 'DICM' preamble and no parseable data set (starts with {preview!r})"),
                        path=path, step="discover")
                return FileOutcome(path, Status.SKIPPED, what, step="discover")
            if kind is FileKind.DICOM:
                with _header_warnings(path):
                    return _dicom_outcome(path, stat, selection, handle)
            record = Radiograph(path=path, kind=kind, study_uid=_file_uid(path),
                                size_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
            return colour_picture(record, handle=handle) or record
    except CxrError as exc:
        exc.with_path(path)
        return FileOutcome.from_error(exc)
    except Exception as exc:    # pydicom converts a value when it is first read: a malformed one raises then
        return FileOutcome.from_error(InputError(f"cannot read the header: {type(exc).__name__}: {exc}", path=path,
                                                 step="read", tag=tag_named_in(str(exc))))


def _dicom_outcome(path: Path, stat: os.stat_result, selection: Selection,
                   handle: BinaryIO | None = None) -> Radiograph | FileOutcome:
    # Large values (the pixel data) are deferred: the header is read, the pixels are not.
    ds = _dcmread(path, stop_before_pixels=False, force=True, defer_size=4096, pass_warnings_on=True, handle=handle)
    declared = undeclared_utf8(ds)
    if declared is not None:
        from pydicom.charset import convert_encodings

        # in memory only (the file is never written); raw values decode with the read's character set
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.set_original_encoding(*ds.original_encoding, convert_encodings("ISO_IR 192"))
        log.warning("%s: text in UTF-8 but (0008,0005) SpecificCharacterSet %s; read as UTF-8", path,
                    f"says {declared}" if declared else "does not say so")
    try:
        record = _dicom_record(path, ds, stat)
    except _Skip as skip:
        return FileOutcome(path, Status.SKIPPED, skip.reason, step="select", tag=skip.tag)
    if record.sop_class.startswith(PRESENTATION_STATE_CLASSES):
        return presentation_outcome(path, ds, record)
    if record.sop_class == KEY_OBJECT_SELECTION and (rejection := read_rejection(path, ds)) is not None:
        n = len(rejection.images)
        return FileOutcome(path, Status.SKIPPED, f"rejection note ({rejection.title}), not an image: the {n} "
                           f"instance{'s' if n != 1 else ''} it names {'are' if n != 1 else 'is'} not screened",
                           step="select", tag=REJECTION_TAG, rejection=rejection, **record.identifiers())
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return FileOutcome(path, Status.SKIPPED, f"no pixel data ({_sop_class_name(ds)}, modality "
                           f"{record.modality or 'unknown'})", step="select",
                           tag="(7FE0,0010) PixelData", **record.identifiers())
    skipped = select(record, selection)
    if skipped is not None:
        return skipped
    try:
        _check_dimensions(record.rows, record.columns, path)
    except CxrError as exc:
        return FileOutcome.from_error(exc, **record.identifiers())
    if record.photometric == "MONOCHROME1" and str(ds.get("PresentationLUTShape", "")).strip().upper() == "IDENTITY":
        # the standard keeps IDENTITY for MONOCHROME2 (PS3.3 C.8.11.7); viewers part ways (DCMTK shows a negative)
        log.warning("%s: (2050,0020) PresentationLUTShape IDENTITY contradicts (0028,0004) PhotometricInterpretation "
                    "MONOCHROME1; shown as MONOCHROME1 (bone bright), as the pixel data are stored", path)
    return colour_picture(record, ds) or record


def _sop_class_name(ds) -> str:
    """The data set's SOP class by its name (``Grayscale Softcopy Presentation State Storage``), else its UID,
    else 'unknown'."""
    return getattr(ds.get("SOPClassUID", None), "name", "") or str(ds.get("SOPClassUID", "")) or "unknown"


def _stamp(date: str, time: str) -> str:
    """A DA and a TM as one sortable text, ``YYYYMMDDHHMMSS.ffffff`` (the old ``HH:MM:SS`` form read too); ''
    without a date."""
    date = re.sub(r"\D", "", date)[:8]
    if len(date) != 8:
        return ""
    whole, _, fraction = time.replace(":", "").strip().partition(".")
    whole = re.sub(r"\D", "", whole)[:6]
    return f"{date}{whole.ljust(6, '0')}.{re.sub(r'[^0-9]', '', fraction)[:6].ljust(6, '0')}" if whole else date


def read_presentation(path: Path, ds) -> tuple[Presentation | None, str]:
    """A presentation state's rotation and flip and the images they apply to (their first frame:
    ReferencedFrameNumber, when given, must name frame 1); ``(None, why)`` when its values are not the
    standard's (Image Rotation 0, 90, 180 or 270; Image Horizontal Flip Y or N): it is then not applied."""
    images = set()
    for series in ds.get("ReferencedSeriesSequence", None) or ():
        for item in series.get("ReferencedImageSequence", None) or ():
            uid = _text(item, "ReferencedSOPInstanceUID")
            frames = element_values(item.get("ReferencedFrameNumber", None))
            if frames:
                numbers = {_whole_number(n) for n in frames}
                if None in numbers:
                    return None, (f"its (0008,1160) ReferencedFrameNumber {joined_values(frames)} is not whole "
                                  "frame numbers")
                if 1 not in numbers:
                    continue
            if uid:
                images.add(uid)
    rotations = element_values(ds.get("ImageRotation", None))
    flips = element_values(ds.get("ImageHorizontalFlip", None))
    rotation = _whole_number(rotations[0]) if len(rotations) == 1 else None
    if rotations and rotation not in (0, 90, 180, 270):
        return None, f"its (0070,0042) ImageRotation {joined_values(rotations)} is not 0, 90, 180 or 270"
    flip = str(flips[0]).strip().upper() if len(flips) == 1 else None
    if flips and flip not in ("Y", "N"):
        return None, f"its (0070,0041) ImageHorizontalFlip '{joined_values(flips)}' is not Y or N"
    created = (_stamp(_text(ds, "PresentationCreationDate"), _text(ds, "PresentationCreationTime"))
               or _stamp(_text(ds, "InstanceCreationDate"), _text(ds, "InstanceCreationTime")))
    return Presentation(sop_uid=_text(ds, "SOPInstanceUID"), name=path.name, created=created,
                        rotation=rotation or 0, flip=flip == "Y", images=frozenset(images)), ""


def _whole_number(value) -> int | None:
    """An IS or US value as an int; None when it is not a whole number (``1.5``, ``abc``, raw bytes)."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def presentation_outcome(path: Path, ds, record: Radiograph) -> FileOutcome:
    """A presentation state file: skipped (not an image), carrying what it does to its images."""
    presentation, wrong = read_presentation(path, ds)
    n = len(presentation.images) if presentation else 0
    if presentation is None:
        what = f"{wrong}, so it is not applied: its images are scored as stored"
        log.warning("%s: presentation state not applied: %s", path, wrong)
    elif presentation.transforms:
        they = "they are" if n != 1 else "it is"
        what = (f"it shows {n} image{'s' if n != 1 else ''} {presentation_words(presentation)}, and {they} so "
                f"scored unless a newer presentation state of {'theirs' if n != 1 else 'its'} says otherwise")
    else:
        what = "it neither turns nor mirrors the images it references"
    return FileOutcome(path, Status.SKIPPED, f"presentation state ({_sop_class_name(ds)}), not an image: {what}"
                       + (" (its window and annotations are not applied)" if presentation else ""),
                       step="select", tag=PRESENTATION_STATE_TAG,
                       presentation=presentation, **record.identifiers())


def read_rejection(path: Path, ds) -> Rejection | None:
    """A Key Object Selection that is a rejection note (its Concept Name, the document title, is a DCM code of
    :data:`REJECTION_TITLES`) with the instances its Current Requested Procedure Evidence names; None for any
    other key object selection (Of Interest, For Teaching...), which withdraws nothing."""
    title = (ds.get("ConceptNameCodeSequence", None) or [None])[0]
    if title is None or _text(title, "CodingSchemeDesignator").upper() != "DCM" or \
            _text(title, "CodeValue") not in REJECTION_TITLES:
        return None
    images = {_text(instance, "ReferencedSOPInstanceUID")
              for evidence in ds.get("CurrentRequestedProcedureEvidenceSequence", None) or ()
              for series in evidence.get("ReferencedSeriesSequence", None) or ()
              for instance in series.get("ReferencedSOPSequence", None) or ()}
    return Rejection(sop_uid=_text(ds, "SOPInstanceUID"), name=path.name, title=REJECTION_TITLES[_text(
        title, "CodeValue")], images=frozenset(images - {""}))


def withdrawn_reason(note: Rejection) -> str:
    """The reason a file row gives for an image that ``note`` withdrew (tag :data:`REJECTED_TAG`)."""
    return f"rejected by the rejection note {note.name} ({note.title}): withdrawn on the PACS, not screened"


def withdrawn_title(reason: str) -> str:
    """The title (reason for rejection) of the note that withdrew an image, read back from the reason of its
    file row (:func:`withdrawn_reason`); "" for any other reason."""
    return next((title for title in REJECTION_TITLES.values()
                 if reason.startswith("rejected by the rejection note ") and f" ({title}): withdrawn" in reason), "")


def changes_its_study(step: str, tag: str) -> bool:
    """Whether a skipped file, by the step and tag it was skipped with, is a presentation state or a rejection
    note: a file that is not an image but changes how its study's images are screened."""
    return step == "select" and tag in (PRESENTATION_STATE_TAG, REJECTION_TAG)


@contextmanager
def _header_warnings(path: Path):
    """Log the warnings pydicom gives while a file's header is read and interpreted (a VR guessed, a value
    that breaks the standard's rules as it is converted...) once, in one line that names the file. pydicom
    also logs each one itself, without the file's name (dropped: :func:`_not_pydicoms_copy_of_a_warning`):
    a modality that writes one over-long value gave two anonymous lines per file, a corrupt file a screenful."""
    with caught() as seen:
        try:
            yield
        finally:
            if seen:
                log.warning("%s: header read with %s", path, listed(seen))


def _not_pydicoms_copy_of_a_warning(record: logging.LogRecord) -> bool:
    """pydicom's ``warn_and_log`` both warns and logs: the log line is the copy (see :func:`_header_warnings`)."""
    return record.funcName != "warn_and_log"


logging.getLogger("pydicom").addFilter(_not_pydicoms_copy_of_a_warning)


def tag_label(tag: int) -> str:
    """How a failure names a tag: ``(0008,0050) AccessionNumber`` (the keyword left out when pydicom has none)."""
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + keyword if keyword else ''}"


def tag_named_in(message: str) -> str:
    """:func:`tag_label` of the tag a pydicom message says it failed on, else ''."""
    found = re.search(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)", message)
    return tag_label(int("".join(found.groups()), 16)) if found else ""


def read_ahead(function: Callable, items: Iterable, *, threads: int, ahead: int, name: str) -> Iterator[tuple]:
    """``(item, function(item))`` for each of ``items``, in their order, computed by ``threads`` threads up
    to ``ahead`` items in advance, while the caller works on the ones before. ``function`` should return
    its failures: an exception it raises is raised here, at its item's turn. A consumer that stops early
    waits only for the items under way. The header scan's and the decoders' loop."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    try:
        pending: deque = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append((item, pool.submit(function, item)))
            if len(pending) >= ahead:
                break
        while pending:
            item, future = pending.popleft()
            for following in iterator:
                pending.append((following, pool.submit(function, following)))
                break
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


SCAN_PROBE = 16          # header reads timed at a time, to decide whether to read in threads (:class:`Waits`)


def scan(inputs: Iterable[Path | str], selection: Selection = Selection(), *,
         threads: int = SCAN_THREADS) -> Iterator[Radiograph | FileOutcome]:
    """Discover and read the header of every input file, yielded in the order found; each ends, by
    ``selection``, as a Radiograph or FileOutcome. Files are read one at a time, timed, until
    :data:`SCAN_PROBE` reads in a row spend more time waiting (for the disk or the network) than computing;
    the rest are read ``threads`` at a time. The folders are walked likewise (:func:`walk`); ``threads=1``:
    everything one at a time, in this thread."""
    def read(path: Path | FileOutcome) -> Radiograph | FileOutcome:
        if isinstance(path, FileOutcome):
            return path
        if not path.exists() and not path.is_symlink():
            return FileOutcome(path, Status.FAILED, "no such file or folder", step="discover")
        return read_record(path, selection)

    for _, outcome in once_they_wait(read, discover(inputs, threads=threads), Waits(SCAN_PROBE), threads=threads,
                                     name="cxr-scan"):
        yield outcome


def once_they_wait(function: Callable, items: Iterable, waits: "Waits", *, threads: int, name: str) -> Iterator[tuple]:
    """``(item, function(item))`` for each of ``items``, in their order: one at a time in this thread, each
    call timed by ``waits``, until ``waits`` finds the calls waiting more than they compute; the rest by
    :func:`read_ahead`, ``threads`` at a time (1: never). ``waits`` may be kept from one call to the next,
    so that a daemon learns once that its files are on a share."""
    items = iter(items)
    for item in items:
        if waits.slow and threads > 1:
            items = itertools.chain([item], items)
            break
        with waits.timed():
            result = function(item)
        yield item, result
    else:
        return
    log.debug("%s: calls wait more than they compute: %d at a time", name, threads)
    yield from read_ahead(function, items, threads=threads, ahead=4 * threads, name=name)


def group_studies(items: Iterable[Radiograph | FileOutcome]) -> tuple[list[Study], list[FileOutcome]]:
    """Group scanned items into studies (by StudyInstanceUID, in order of first appearance).

    Returns the studies (those with at least one image to score, plus the skipped
    files that belong to them) and the outcomes that belong to no scored study.
    Duplicate SOP Instance UIDs (the same image twice) are kept once, the copy
    listed as skipped. An image that a presentation state of its study turns or
    mirrors (the newest of those that reference it: :func:`newest_presentations`)
    carries it, to be scored as it shows the image. An image that a rejection note
    of its study names is listed as skipped, saying so.
    """
    images: "OrderedDict[str, list[Radiograph]]" = OrderedDict()
    skipped: dict[str, list[FileOutcome]] = {}
    loose: list[FileOutcome] = []
    seen_sops: dict[str, Path] = {}
    for item in items:
        if isinstance(item, Radiograph):
            if item.sop_uid and item.sop_uid in seen_sops:
                loose_item = FileOutcome(item.path, Status.SKIPPED,
                                         f"duplicate of {seen_sops[item.sop_uid]} (same SOPInstanceUID)",
                                         step="select", tag="(0008,0018) SOPInstanceUID", **item.identifiers())
                skipped.setdefault(item.study_uid, []).append(loose_item)
                continue
            if item.sop_uid:
                seen_sops[item.sop_uid] = item.path
            images.setdefault(item.study_uid, []).append(item)
        elif item.study_uid:
            skipped.setdefault(item.study_uid, []).append(item)
        else:
            loose.append(item)
    studies = []
    for uid, imgs in images.items():
        others = list(skipped.pop(uid, ()))
        rejected = {sop: o.rejection for o in others if o.rejection is not None for sop in o.rejection.images}
        others += [FileOutcome(img.path, Status.SKIPPED, withdrawn_reason(rejected[img.sop_uid]), step="select",
                               tag=REJECTED_TAG, **img.identifiers()) for img in imgs if img.sop_uid in rejected]
        imgs = [img for img in imgs if img.sop_uid not in rejected]
        if not imgs:
            loose.extend(others)
            continue
        shown = newest_presentations(others)
        studies.append(Study(uid, tuple(dataclasses.replace(img, presentation=shown[img.sop_uid])
                                        if img.sop_uid in shown else img for img in imgs), tuple(others)))
    for outcomes in skipped.values():
        loose.extend(outcomes)
    return studies, loose


def newest_presentations(outcomes: Iterable[FileOutcome]) -> dict[str, Presentation]:
    """For each image (SOP Instance UID) that the presentation states among ``outcomes`` reference, the newest
    of them (by creation date and time), kept only when it turns or mirrors the image: a newer one that
    does neither shows the image as stored, whatever an older one said."""
    newest: dict[str, Presentation] = {}
    for outcome in outcomes:
        if (shown := outcome.presentation) is not None:
            for uid in shown.images:
                if uid not in newest or shown.newer_than(newest[uid]):
                    newest[uid] = shown
    return {uid: shown for uid, shown in newest.items() if shown.transforms}


# --------------------------------------------------------------------------- decoding

def _not_a_decoder_traceback(record: logging.LogRecord) -> bool:
    """pydicom logs each decoder plugin that fails on a frame with its traceback (``LOGGER.exception`` in
    ``_decode_frame``), then raises one error naming every plugin's message, which becomes the file's failure
    reason (:func:`decode_first_frame`). The tracebacks, which name no file, are left out: in a daemon's
    journal a corrupt file read as a crash."""
    return not (record.exc_info and record.funcName == "_decode_frame")


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_not_a_decoder_traceback)   # its LOGGER


def decode_first_frame(ds) -> np.ndarray:
    """Decode the pixel data of the first frame, naming the transfer syntax when it fails."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        ts_text = "unknown transfer syntax"
    elif hasattr(ts, "name"):
        ts_text = f"{ts.name} ({ts})"
    else:                       # a damaged header can make it several values (a stray backslash), or bytes
        ts_text = f"unreadable transfer syntax {str(ts)[:80]!r}"
    if "PixelData" not in ds:
        raise InputError("no pixel data", step="decode", tag="(7FE0,0010) PixelData")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    # Guard memory before decoding; the lower bound is a selection rule (read_record), not a decoder limit.
    _check_dimensions(rows, columns, Path(getattr(ds, "filename", "") or "."), minimum=1)
    if ts == ENCAPSULATED_UNCOMPRESSED:
        arr = _encapsulated_uncompressed_frame(ds, ts_text)
    else:
        if isinstance(ts, str) and ts in JPEG_CODESTREAMS | J2K_CODESTREAMS:
            _check_codestream(ds, ts, ts_text, rows, columns)
        arr = _decoded_by_pydicom(ds, ts_text)
    if arr.shape[:2] != (rows, columns):
        raise InvalidImageError(f"decoded shape {arr.shape} does not match Rows x Columns {rows} x {columns}",
                                step="decode", tag="(0028,0010) Rows")
    return arr


# JPEG (baseline, extended, lossless) and JPEG-LS: a codestream ends with its end-of-image marker, FFD9
# (ISO/IEC 10918-1 B.2.1, 14495-1 C.1.1), which scan data cannot hold (an FF in it is followed by 00 or a
# restart marker's D0-D7 in JPEG, by a byte under 80 in JPEG-LS). JPEG 2000 and RLE decoders fail a codestream
# cut short themselves (checked at 40 cuts of seven JPEG 2000 and HTJ2K files); these do not.
JPEG_CODESTREAMS = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                              "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
# JPEG baseline and extended (DCT): their 8-bit frames are also decoded strictly, at an eighth of their size
JPEG_DCT = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
# JPEG 2000 (Part 1 and Part 2 multi-component) and HTJ2K: their size (SIZ) is checked before decoding
J2K_CODESTREAMS = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                             "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                             "1.2.840.10008.1.2.4.203"})


def _check_codestream(ds, ts: str, ts_text: str, rows: int, columns: int) -> None:
    """Fail a JPEG or JPEG-LS first frame whose codestream stops before its end-of-image marker. The file is
    whole (a file cut short fails when it is read) but the frame is not: a gateway or an encoder cut it, or a
    fragment is missing. libjpeg and CharLS decode such a frame without a word, the rows after the cut grey or
    garbage (a JPEG baseline frame cut at half its bytes came out half grey), and it would be screened.
    The marker is looked for in the frame's last 10 bytes, as pydicom looks for it between frames, so that
    the padding some encoders put after it passes. Fragments that cannot be read are left to the decoder.

    A JPEG baseline or extended frame whose data is damaged inside (bytes changed in transfer or on a disk:
    libjpeg decodes on past them without a word, garbling the picture) fails likewise, when libjpeg-turbo
    decodes it (8 bits) only with a recoverable error that damages the picture (:func:`jpeg_damage`, at an
    eighth of the size: every coefficient is read, a fraction of the decoding's time; a lossless frame under
    that label at full size). A JPEG or JPEG-LS frame whose start-of-frame size is not ``rows`` x ``columns``
    (the header's, as :func:`decode_first_frame` read them; 0 lines included) fails before any decoder
    allocates that size; so does a JPEG 2000 or HTJ2K frame whose image size (its SIZ segment) is not: openjpeg
    allocated the codestream's size whole before the shape check could refuse it (5 GB and 13 s for 30000 x
    30000, failing with numpy's "could not broadcast" message), and 65,535 a side is 17 GB; and an image offset
    changed in SIZ made openjpeg decode a garbled picture of the right size without a word."""
    from pydicom.encaps import generate_frames

    try:
        with caught():              # pydicom warns of fragments it cannot place in frames: the decoder names it
            frame = next(generate_frames(ds.PixelData, number_of_frames=_frames(ds)))
    except Exception:
        return
    if ts in J2K_CODESTREAMS:
        grid = _j2k_grid(frame)
        if grid is not None and (grid[0] - grid[2], grid[1] - grid[3]) != (rows, columns):
            height, width, top, left = grid
            offset = f": {height} x {width} less an image offset of {top} x {left}" if top or left else ""
            raise InvalidImageError(f"pixel data cannot be decoded ({ts_text}): frame 1's JPEG 2000 codestream is "
                                    f"{height - top} x {width - left} (its SIZ segment{offset}), not Rows x Columns "
                                    f"{rows} x {columns}", step="decode", tag="(0028,0010) Rows")
        return
    header = _frame_header(frame)
    if header is not None and (header[2], header[3]) != (rows, columns):    # 0 lines too (a DNL marker's to give):
        # decoders allocated for up to 65,535 lines a side, and the OOM killer ended the batch
        raise InvalidImageError(f"pixel data cannot be decoded ({ts_text}): frame 1's JPEG codestream is "
                                f"{header[2]} x {header[3]} (its start-of-frame header), not Rows x Columns "
                                f"{rows} x {columns}", step="decode", tag="(0028,0010) Rows")
    if b"\xff\xd9" not in frame[-10:]:
        raise InputError(f"pixel data cannot be decoded ({ts_text}): frame 1 ends without the codestream's "
                         "end-of-image marker (FFD9): it was cut short, and decoders give the part cut off as grey, "
                         "which would be screened as image", step="decode", tag="(7FE0,0010) PixelData")
    if ts in JPEG_DCT:
        damage = jpeg_damage(frame, "GRAY", min_factor=8, min_height=1, min_width=1)[1]
        if damage is not None:
            said = _corrupt_jpeg("frame 1's", damage)
            raise InputError(f"pixel data cannot be decoded ({ts_text}): {said}", step="decode",
                             tag="(7FE0,0010) PixelData")


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _j2k_grid(codestream) -> tuple[int, int, int, int] | None:
    """A JPEG 2000 or HTJ2K codestream's reference grid and image offset from its SIZ segment (ISO/IEC 15444-1
    A.5.1) as ``(Ysiz, Xsiz, YOsiz, XOsiz)``: the image is ``Ysiz - YOsiz`` rows by ``Xsiz - XOsiz`` columns.
    SIZ must follow the start of the codestream (FF4F FF51); a codestream in a JP2 file (which DICOM does not
    allow, but some encoders write) is found in its contiguous-codestream box. None when there is no SIZ where
    it must be."""
    data = bytes(codestream)
    at = 0
    if data.startswith(_JP2_SIGNATURE):
        at = 12
        while at + 8 <= len(data):
            length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
            head = 8
            if length == 1 and at + 16 <= len(data):        # its length in 8 bytes after the type
                length, head = int.from_bytes(data[at + 8:at + 16], "big"), 16
            if kind == b"jp2c":
                at += head
                break
            if length < head:                               # 0: the last box, to the end of the file
                return None
            at += length
        else:
            return None
    if data[at:at + 4] != b"\xff\x4f\xff\x51" or at + 24 > len(data):
        return None
    width, height, left, top = (int.from_bytes(data[at + i:at + i + 4], "big") for i in (8, 12, 16, 20))
    return height, width, top, left


# Encapsulated Uncompressed Explicit VR Little Endian (PS3.5 A.4.11, 2023): native little-endian frames, each in
# its own fragment, so that a server can hand out one frame; pydicom 3.0 has no decoder for it.
ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"


def _encapsulated_uncompressed_frame(ds, ts_text: str) -> np.ndarray:
    """The first frame of an Encapsulated Uncompressed Explicit VR Little Endian data set, as pydicom gives a
    native one: (rows, columns), or (rows, columns, samples) in RGB for colour."""
    from pydicom.encaps import generate_frames
    from pydicom.pixels import convert_color_space

    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or samples not in (1, 3):
        raise UnsupportedTransferSyntax(f"{ts_text} with {bits} bits allocated and {samples} samples per pixel "
                                        "is not read (8, 16 or 32 bits; 1 or 3 samples)", step="decode",
                                        tag="(0028,0100) BitsAllocated")
    dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation', 0) or 0) == 1 else 'u'}{bits // 8}")
    needed = rows * columns * samples * dtype.itemsize
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=_frames(ds)))
    except Exception as exc:     # not encapsulated as the syntax says (no item tags, a bad offset table)
        raise InputError(f"pixel data cannot be decoded ({ts_text}): its fragments cannot be read: "
                         f"{type(exc).__name__}: {exc}", step="decode", tag="(7FE0,0010) PixelData") from None
    if len(frame) < needed:
        raise InputError(f"pixel data cannot be decoded ({ts_text}): frame 1 holds {len(frame)} bytes, "
                         f"{rows} x {columns} x {samples} samples of {bits} bits need {needed}", step="decode",
                         tag="(7FE0,0010) PixelData")
    arr = np.frombuffer(frame[:needed], dtype=dtype)
    if samples == 1:
        return arr.reshape(rows, columns)
    if int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        arr = arr.reshape(samples, rows, columns).transpose(1, 2, 0)
    else:
        arr = arr.reshape(rows, columns, samples)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL":
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    return np.ascontiguousarray(arr)


_RLE_PADDING = re.compile(r"The decoded RLE segment contains non-conformant padding - (\d+) vs\. (\d+) bytes")


def _refuse_overlong_rle(seen: list[warnings.WarningMessage], ts_text: str) -> None:
    """Fail an RLE frame one of whose segments decoded to more than a byte past Rows x Columns, where pydicom's own
    decoder decoded it: pylibjpeg-rle, which cxrscreen's plugin needs (:mod:`cxrscreen.rle`, which refuses such
    a segment itself), is not installed. pydicom's decoder cuts such a segment to size and only warns
    ("non-conformant padding", for encoders that pad a segment by a byte), and a segment read from the wrong
    place (an offset in the RLE header changed) or with a run's length changed decodes so, the picture
    garbled."""
    for warning in seen:
        found = _RLE_PADDING.search(str(warning.message))
        if found and int(found.group(1)) - int(found.group(2)) > 1:
            got, expected = int(found.group(1)), int(found.group(2))
            raise InputError(f"pixel data cannot be decoded ({ts_text}): an RLE segment decodes to {got:,} bytes, "
                             f"not the {expected:,} of Rows x Columns (pydicom would cut it to size): its header or "
                             "its runs were changed, and the picture would be garbled", step="decode",
                             tag="(7FE0,0010) PixelData")


# What libjpeg (pylibjpeg-libjpeg) says of JPEG coded data that does not fit the frame's Huffman tables
_OUT_OF_SYNC = "AC coefficient decoding out of sync"


def _decoded_by_libjpeg(ds, ts_text: str) -> np.ndarray | None:
    """A JPEG baseline or extended first frame as pylibjpeg's libjpeg alone decodes it (the decoder pydicom tries
    first); None where it cannot (not installed, or failing for a reason another decoder may not have), for
    pydicom's decoders in turn. Where libjpeg finds the coded data out of step with the Huffman tables the
    frame fails: libjpeg-turbo, which pydicom tries next (in Pillow) and which the strict check before uses,
    decodes such data on without a word. In ``benchmarks/fuzz_codestreams.py`` a Huffman table changed so gave
    pictures with 94-99% of their pixels wrong, and Pillow's decoding of them was screened."""
    from pydicom.pixels import pixel_array

    try:
        with caught():
            return pixel_array(ds, index=0, decoding_plugin="pylibjpeg")
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        said = str(exc)
    if _OUT_OF_SYNC in said:
        said = _corrupt_jpeg("frame 1's", _OUT_OF_SYNC)
        raise InputError(f"pixel data cannot be decoded ({ts_text}): {said}", step="decode",
                         tag="(7FE0,0010) PixelData")
    return None


RLE_LOSSLESS = "1.2.840.10008.1.2.5"


# pydicom's error when each decoder of a syntax failed, each decoder's error on a line of its own after it
_ALL_FAILED = "Unable to decode as exceptions were raised by all available plugins:"


def _decoders_said(exc: BaseException) -> str:
    """pydicom's error naming each decoder's failure on a line of its own, in one line (for the summary and
    the log): ``"...: pylibjpeg: ...; pydicom: ..."``."""
    return re.sub(r"\s*\n\s*", "; ", str(exc).strip()).replace(":; ", ": ")


def _decoded_by_pydicom(ds, ts_text: str) -> np.ndarray:
    """The first frame as pydicom's decoders give it, each failure an error naming the syntax."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts in JPEG_DCT:
        arr = _decoded_by_libjpeg(ds, ts_text)
        if arr is not None:
            return arr
    # RLE by cxrscreen's plugin (pylibjpeg-rle a segment at a time: its frame decoder panics on a segment running
    # past a 16-bit frame), which names what is wrong; where pylibjpeg-rle is not installed, by pydicom's own
    # decoder, checked by _refuse_overlong_rle
    from . import rle

    plugin = rle.plugin() if ts == RLE_LOSSLESS else None
    try:
        with caught() as seen:                # a decoder's warnings are dropped, but for one (below)
            if plugin is not None or _frames(ds) > 1:
                from pydicom.pixels import pixel_array

                arr = pixel_array(ds, index=0, decoding_plugin=plugin or "")
            else:
                arr = ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(f"no installed decoder handles {ts_text}: {exc}",
                                        step="decode", tag="(0002,0010) TransferSyntaxUID") from None
    except RuntimeError as exc:
        msg = _decoders_said(exc)
        if "missing dependencies" in msg:
            raise UnsupportedTransferSyntax(f"no installed decoder handles {ts_text}: {msg}",
                                            step="decode", tag="(0002,0010) TransferSyntaxUID") from None
        # The decoders for the syntax are installed and each one failed: the data is corrupt or does not
        # conform (pydicom's "exceptions were raised by all available plugins"), which installing nothing mends.
        if plugin is not None:                # the one decoder tried: its words alone
            msg = msg.replace(_ALL_FAILED, "").strip().removeprefix(f"{plugin}: ")
        msg = msg.replace(_ALL_FAILED, "every installed decoder failed:")
        raise InputError(f"pixel data cannot be decoded ({ts_text}): {msg}", step="decode",
                         tag="(7FE0,0010) PixelData") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:    # also a decoder written in Rust that panics on corrupt data (pylibjpeg-rle's
        # frame decoder did: pyo3's PanicException is a BaseException, which `except Exception` let through)
        raise InputError(f"pixel data cannot be decoded ({ts_text}): {type(exc).__name__}: {exc}",
                         step="decode", tag="(7FE0,0010) PixelData") from None
    _refuse_overlong_rle(seen, ts_text)
    return arr
