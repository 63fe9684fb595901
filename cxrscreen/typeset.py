"""Text of any script in the PDFs: fonts, right-to-left order, CJK and DICOM person names.

DICOM text is whatever the site's character set allows (PS3.5 6.1: Latin 1-5, Cyrillic, Greek,
Hebrew, Arabic, Thai, Japanese, Korean, Chinese, UTF-8). The PDF standard fonts (Helvetica) show
Windows-1252 only: a Polish, Greek, Russian or Japanese patient name came out as black boxes.
A text they can show stays in them (nothing embedded); any other is set in DejaVu Sans (shipped
with matplotlib, embedded as a subset: Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew,
Arabic), its Chinese, Japanese and Korean runs in the PDF standard Asian fonts (not embedded:
every common viewer has or substitutes them; Adobe Reader may offer its free font pack), Hebrew
and Arabic in visual order (Unicode bidi algorithm, Arabic letters in their joined forms; a text
that wraps is broken into lines in reading order first, then each line is reordered). A
text with a character none of these fonts has (Thai, Devanagari, ...) is not printed letter by
letter with gaps, which could read as another name: it is replaced by a note naming the script
(summary.csv keeps patient IDs and file names as they are; the name is in the DICOM header).

Inputs: ``str`` from the DICOM header or file names. Outputs: reportlab Paragraph markup
(:func:`markup`), a paragraph of one text that wraps right-to-left text in reading order
(:func:`paragraph`), and names for display (:func:`person_name`).
"""

from __future__ import annotations

import functools
import logging
import os
import unicodedata
from xml.sax.saxutils import escape

from reportlab.platypus import Flowable

log = logging.getLogger(__name__)

FONT, BOLD, ITALIC, BOLD_ITALIC = "CxrSans", "CxrSans-Bold", "CxrSans-Oblique", "CxrSans-BoldOblique"
_FILES = {FONT: "DejaVuSans.ttf", BOLD: "DejaVuSans-Bold.ttf", ITALIC: "DejaVuSans-Oblique.ttf",
          BOLD_ITALIC: "DejaVuSans-BoldOblique.ttf"}
# the PDF standard Asian fonts (Adobe-GB1, -Japan1, -Korea1): known to every PDF reader, never embedded
CHINESE, JAPANESE, KOREAN = "STSong-Light", "HeiseiKakuGo-W5", "HYGothic-Medium"
# the most characters of one text a PDF shows: DICOM's longest identifying values (a PN's three groups of
# 64, an LO of 64) fit, and a worklist cell of this many still fits a page
MAX_CHARS = 300

_HAN = ((0x2E80, 0x2FDF), (0x3000, 0x303F), (0x3400, 0x4DBF), (0x4E00, 0x9FA5), (0xF900, 0xFAFF),
        (0xFE30, 0xFE4F), (0xFF00, 0xFFEF))   # what the fonts' UCS-2 maps cover: ideographs to U+9FA5 and ext. A
_KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF65, 0xFF9F))
_HANGUL = ((0x3130, 0x318F), (0xAC00, 0xD7A3))


def _within(ch: str, ranges) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in ranges)


def _cjk(ch: str) -> bool:
    return _within(ch, _HAN) or _within(ch, _KANA) or _within(ch, _HANGUL)


@functools.lru_cache(maxsize=1)
def register_fonts() -> tuple[str, frozenset]:
    """Register the fonts once; return the Unicode font's name and the code points it can draw.

    When matplotlib's DejaVu files cannot be found (a broken install), the PDFs fall back to
    Helvetica, with a warning in the log, and text outside Latin-1 is replaced by the note.
    """
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfbase.ttfonts import TTFont

    for name in (CHINESE, JAPANESE, KOREAN):
        pdfmetrics.registerFont(UnicodeCIDFont(name))
        pdfmetrics.registerFontFamily(name, normal=name, bold=name, italic=name, boldItalic=name)
    try:
        import matplotlib

        folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
        fonts = {name: TTFont(name, os.path.join(folder, file)) for name, file in _FILES.items()}
    except Exception as exc:  # noqa: BLE001 - any failure here means: no Unicode font, say so and go on
        log.warning("DejaVu Sans not found (%s): PDFs are set in Helvetica, text outside Latin-1 is "
                    "replaced by a note", exc)
        latin1 = frozenset(range(0x20, 0x7F)) | frozenset(range(0xA0, 0x100))
        return "Helvetica", latin1
    for font in fonts.values():
        pdfmetrics.registerFont(font)
    pdfmetrics.registerFontFamily(FONT, normal=FONT, bold=BOLD, italic=ITALIC, boldItalic=BOLD_ITALIC)
    # the four faces cover the same characters; a text is drawable when the regular and bold faces have it
    drawable = frozenset(fonts[FONT].face.charToGlyph) & frozenset(fonts[BOLD].face.charToGlyph)
    return FONT, drawable


@functools.lru_cache(maxsize=1)
def _arabic_reshaper():
    """arabic_reshaper with only the ligatures the font can draw (DejaVu Sans has lam-alef, not the
    word ligatures such as U+FDF2 for Allah, which would make a name with Abdullah unprintable)."""
    import arabic_reshaper
    from arabic_reshaper.ligatures import LIGATURES

    drawable = register_fonts()[1]
    return arabic_reshaper.ArabicReshaper(configuration={
        name: all(ord(ch) in drawable for form in forms for ch in form) for name, (_, forms) in LIGATURES})


def _joined(text: str) -> str:
    """Arabic letters in their joined (presentation) forms; other text as it is. Still in reading order."""
    if any(0x0600 <= ord(ch) <= 0x06FF or 0x0750 <= ord(ch) <= 0x077F for ch in text):
        return _arabic_reshaper().reshape(text)
    return text


def _visual_order(text: str, base: str | None = None) -> str:
    """One line of Hebrew and Arabic in the order a left-to-right line shows it (Unicode bidi
    algorithm; ``base`` the paragraph's direction, "L" or "R", else the line's own)."""
    from bidi import get_display

    return get_display(text, base_dir=base)


def _right_to_left(text: str) -> bool:
    return any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text)


def _base_direction(text: str) -> str:
    """The paragraph direction of ``text`` (Unicode bidi rules P2-P3): its first strong character's."""
    for ch in text:
        kind = unicodedata.bidirectional(ch)
        if kind in ("L", "R", "AL"):
            return "L" if kind == "L" else "R"
    return "L"


def _script(ch: str) -> str:
    words = unicodedata.name(ch, "").split()        # THAI CHARACTER KO KAI -> Thai
    if len(words) < 3:
        return ""
    return words[0] if len(words[0]) <= 3 else words[0].title()


def undecodable_as_hex(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (which Python keeps as lone
    surrogates, PEP 383) written ``\\xNN``: printable, and encodable in UTF-8, where they raised."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:                   # a surrogate no file name gives: \\udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def markup(text: str, *, bold: bool = False, italic: bool = False) -> str:
    """Paragraph markup that prints ``text`` as written, in any script the fonts have.

    A text the standard PDF fonts can show (Windows-1252: English, French, German, Spanish...) is
    left in the paragraph's font; any other is set in DejaVu Sans, in its bold and italic faces
    when ``bold`` and ``italic`` say that the text stands in bold or italic (reportlab's
    ``<font name>`` resets both, so they are set again inside it). Control characters are
    dropped; CJK runs get an Asian font (Japanese when the text has kana, Korean when it has
    hangul, else Chinese, whose font has the unified ideographs to U+9FA5 and extension A);
    Hebrew and Arabic are put in visual order. A text with a character no font has is replaced,
    whole, by ``[not printable here: <script> text]``.
    """
    return _markup(_clean(text), bold=bold, italic=italic, visual=False)


def _clean(text) -> str:
    text = str(text or "")
    if not (text.isascii() and text.isprintable()):     # else nothing to drop, compose or show as hex
        # composed (NFC): a decomposed u + diaeresis is the standard fonts' ü, and no shaping is needed to place it
        text = unicodedata.normalize("NFC", "".join(ch for ch in text if unicodedata.category(ch) != "Cc"))
        text = undecodable_as_hex(text)
    if len(text) > MAX_CHARS:
        # a malformed header's 20,000-character name made a table row taller than a page, and reportlab
        # stopped the whole batch with a LayoutError; the summary keeps the whole value
        text = f"{text[:MAX_CHARS]}... [{len(text):,} characters, shortened here]"
    return text


def _markup(text: str, *, bold: bool, italic: bool, visual: bool) -> str:
    """:func:`markup` of a clean text; ``visual``: its right-to-left runs are already in visual order."""
    try:
        text.encode("cp1252")
        return escape(text)          # the standard fonts have it: nothing to embed
    except UnicodeEncodeError:
        pass
    base, drawable = register_fonts()
    if not visual and _right_to_left(text):
        text = _visual_order(_joined(text))
    missing = [ch for ch in text if ord(ch) not in drawable and not _cjk(ch)]
    if missing:
        script = _script(missing[0])
        return escape(f"[not printable here: {script + ' ' if script else ''}text]")
    asian = (JAPANESE if any(_within(ch, _KANA) for ch in text)
             else KOREAN if any(_within(ch, _HANGUL) for ch in text) else CHINESE)
    start, end = ("<b>" if bold else "") + ("<i>" if italic else ""), ("</i>" if italic else "") + ("</b>" if bold else "")
    out, run, run_cjk = [], [], False
    for ch in text + "\0":
        is_cjk = ch != "\0" and ord(ch) not in drawable and _cjk(ch)
        if ch == "\0" or (run and is_cjk != run_cjk):
            out.append(f'<font name="{asian if run_cjk else base}">{start}{escape("".join(run))}{end}</font>')
            run = []
        run_cjk = is_cjk
        run.append(ch)
    return "".join(out)


def paragraph(text, style, *, bold: bool = False, italic: bool = False, base: str | None = None):
    """A reportlab flowable of ``text`` alone, in any script (see :func:`markup`), in ``style``.

    A text with Hebrew or Arabic in it is broken into lines in reading order for the width it is
    given, and each line is then put in visual order (the bidi algorithm works line by line, UAX #9
    L1-L2): a name too long for its cell reads first line first, where putting the whole text in
    visual order and letting the paragraph wrap it would put its end on the first line. A
    right-to-left text (its first strong letter Hebrew or Arabic) is aligned right. ``base="L"``
    makes a sentence of the tool's own words (an English reason naming a Hebrew file) a
    left-to-right paragraph whatever it starts with.
    """
    from reportlab.platypus import Paragraph

    clean = _clean(text)
    if _right_to_left(clean) and register_fonts()[0] == FONT:
        return _ReadingOrder(_joined(clean), style, bold=bold, italic=italic, base=base)
    return Paragraph(_markup(clean, bold=bold, italic=italic, visual=False), style)


def one_line(text, style, width: float) -> str | None:
    """``text`` as drawn (:func:`paragraph`'s cleaning) where it is one line of the standard fonts' characters
    in ``style``, no wider than ``width`` points and without white space at its ends; else None."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    clean = _clean(text)
    try:
        clean.encode("cp1252")
    except UnicodeEncodeError:
        return None
    fits = clean.strip() == clean and stringWidth(clean, style.fontName, style.fontSize) <= width
    return clean if fits else None


def cell(text, style, width: float):
    """A table cell of ``text`` in ``style`` (see :func:`paragraph`): the text itself where it is
    :func:`one_line`, which a table draws far faster than a paragraph (a worklist of 2,000 studies, 5 cells a
    row, took 2.7 s, rewritten every 30 s by a busy ``watch``); else :func:`paragraph`, which wraps it and
    draws any script."""
    line = one_line(text, style, width)
    return line if line is not None else paragraph(text, style)


def _measure(text: str, font: str, size: float) -> float:
    from reportlab.pdfbase.pdfmetrics import stringWidth

    drawable = register_fonts()[1]
    wide = sum(1 for ch in text if ord(ch) not in drawable and _cjk(ch))      # an ideograph is one em
    return stringWidth("".join(ch for ch in text if ord(ch) in drawable), font, size) + wide * size


def reading_order_lines(text: str, width: float, font: str, size: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` points in ``font`` at ``size``,
    in reading (logical) order; a word wider than a line is broken between its letters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if _measure(candidate, font, size) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while len(line) > 1 and _measure(line, font, size) > width:      # too long for any line: cut it
            cut = 1
            while cut < len(line) - 1 and _measure(line[:cut + 1], font, size) <= width:
                cut += 1
            lines.append(line[:cut])
            line = line[cut:]
    return lines + [line] if line or not lines else lines


class _ReadingOrder(Flowable):
    """A paragraph of one text with right-to-left runs, line-broken in reading order (see :func:`paragraph`)."""

    def __init__(self, text: str, style, *, bold: bool, italic: bool, base: str | None):
        from reportlab.lib.enums import TA_RIGHT

        super().__init__()
        self.text, self.bold, self.italic = text, bold, italic
        self.base = base or _base_direction(text)
        self.style = style.clone(style.name + "-rtl", alignment=TA_RIGHT) if self.base == "R" else style
        self.lines: list[str] = []          # the visual lines of the last wrap
        self._para = None

    def _layout(self, width: float):
        from reportlab.platypus import Paragraph

        face = {(False, False): FONT, (True, False): BOLD, (False, True): ITALIC, (True, True): BOLD_ITALIC}
        font = face[(self.bold, self.italic)]
        usable = width - self.style.leftIndent - self.style.rightIndent
        logical = reading_order_lines(self.text, usable, font, self.style.fontSize)
        self.lines = [_visual_order(line, self.base) for line in logical]
        body = "<br/>".join(_markup(line, bold=self.bold, italic=self.italic, visual=True) for line in self.lines)
        self._para = Paragraph(body, self.style)

    def wrap(self, availWidth, availHeight):
        self._layout(availWidth)
        self.width, self.height = self._para.wrap(availWidth, availHeight)
        return self.width, self.height

    def split(self, availWidth, availHeight):
        self._layout(availWidth)
        return self._para.split(availWidth, availHeight)

    def draw(self):
        self._para.drawOn(self.canv, 0, 0)

    def getSpaceBefore(self):
        return self.style.spaceBefore

    def getSpaceAfter(self):
        return self.style.spaceAfter


def person_name(value: str) -> str:
    """A DICOM PN value (PS3.5 6.2: ``family^given^middle^prefix^suffix``, up to three groups
    separated by ``=``: alphabetic, ideographic, phonetic) as people write it:
    ``Yamada^Tarou=山田^太郎=やまだ^たろう`` -> ``Yamada, Tarou (山田 太郎; やまだ たろう)``.
    A value without ``^`` or ``=`` is returned as is."""
    value = (value or "").strip()
    if "^" not in value and "=" not in value:
        return value
    shown = []
    for group in value.split("=")[:3]:
        family, given, middle, prefix, suffix = ([p.strip() for p in group.split("^")] + [""] * 5)[:5]
        rest = " ".join(p for p in (given, middle) if p)
        comma = ", " if group.isascii() or not any(_cjk(ch) for ch in group) else " "
        core = comma.join(p for p in (family, rest) if p)
        shown.append(" ".join(p for p in (prefix, core, suffix) if p))
    first, *others = [s for s in shown if s] or [""]
    return first + (f" ({'; '.join(others)})" if others else "")
