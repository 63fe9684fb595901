"""Warnings caught per thread: a file's warnings stay with the thread that reads it."""
from __future__ import annotations

import threading
import warnings

import pydicom
import pytest

from cxrscreen import ingest
from cxrscreen.errors import InputError
from cxrscreen.testing import make_dicom, save
from cxrscreen.threadwarnings import caught


def warn(text: str) -> None:
    warnings.warn(text, UserWarning, stacklevel=1)      # one place in the code: the once-only registry's key


def test_a_truncation_warning_fails_its_own_file_not_the_one_another_thread_reads(tmp_path, chest_pixels,
                                                                                     monkeypatch, recwarn):
    """Decode threads read files at once. With ``warnings.catch_warnings`` in each (not thread-safe before
    Python 3.14) the thread that entered last took the other's warning: here the good file failed as
    truncated and the truncated one was read; and the block that left last put a finished recorder back,
    so the process lost every later warning. The order below is the one that did both."""
    good, cut = (save(make_dicom(chest_pixels, seed=name), tmp_path / f"{name}.dcm") for name in ("good", "cut"))
    real_dcmread = pydicom.dcmread
    cut_inside, good_inside, cut_warned = threading.Event(), threading.Event(), threading.Event()

    def dcmread(path, **kwargs):           # runs inside each reader's block, in the order the events set
        if path == cut:
            cut_inside.set()
            good_inside.wait(10)
            warnings.warn("End of file reached before delimiter (FFFE,E0DD) found", UserWarning)
            cut_warned.set()
        else:
            cut_inside.wait(10)
            good_inside.set()
            cut_warned.wait(10)
        return real_dcmread(path, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    results: dict = {}

    def read(path):
        try:
            ingest.read_dicom(path)
            results[path] = "read"
        except InputError as exc:
            results[path] = exc.cause

    threads = [threading.Thread(target=read, args=(path,)) for path in (cut, good)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results[good] == "read"
    assert results[cut].startswith("file is truncated: End of file reached")
    warn("a warning after the reads")       # reaches the process's handler (pytest's recorder here)
    assert [str(w.message) for w in recwarn] == ["a warning after the reads"]


def test_caught_collects_every_warning_of_its_thread_and_only_those(recwarn):
    warnings.simplefilter("default")        # once per place, as outside a test runner
    warn("said before")                     # shown: the once-only registry would hide it from now on
    outside = threading.Event()
    inside = threading.Event()

    def other_thread():
        inside.wait(10)
        warn("from another thread")
        outside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with caught() as seen:
        warn("said before")
        warn("said before")
        with caught() as inner:
            warn("inner")
        inside.set()
        outside.wait(10)
        warn("after the inner block")
    thread.join(10)
    assert [str(w.message) for w in seen] == ["said before", "said before", "after the inner block"]
    assert [str(w.message) for w in inner] == ["inner"]
    assert seen[0].category is UserWarning and seen[0].filename == __file__
    assert [str(w.message) for w in recwarn] == ["said before", "from another thread"]


def test_caught_still_catches_after_other_code_changed_the_filters(recwarn):
    """A test runner or a library may add filters or wrap code in catch_warnings (which puts the old state
    back on leaving, without cxrscreen's filter): the next caught() puts its filter first again."""
    with caught():
        pass
    warnings.simplefilter("error")          # would turn a read's warning into an exception
    with caught() as seen:
        warn("a value was too long")
    assert [str(w.message) for w in seen] == ["a value was too long"]
    with pytest.raises(UserWarning):        # outside caught(), the filter acts as it should
        warn("outside")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with caught() as ignored_outside:
            warn("kept")
    with caught() as after:
        warn("kept too")
    assert [str(w.message) for w in ignored_outside] == ["kept"]
    assert [str(w.message) for w in after] == ["kept too"]
