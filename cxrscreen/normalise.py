"""From stored pixel values to the model's input: the one path training also uses.

The contract (:func:`normalise_pixels`, :func:`load_unit_image`): a float32
2-D image in [0, 1] where **higher means more attenuating** (bone bright, air
dark), whatever the file: DICOM of any photometric interpretation, bit depth
and VOI, or an exported JPEG/PNG. :func:`to_model_input` then resizes it to the
model's input size as the model card's :class:`PreprocessSpec` says and, when
the card asks for it, equalises the result (CLAHE): the model then sees local
contrast rather than the exposure, VOI window and export curve of one site.

DICOM pixel transformations follow PS3.3 in this order:

1. Stored values (Bits Stored < Bits Allocated masked, two's complement when
   Pixel Representation is 1).
2. Modality LUT (C.11.1): Modality LUT Sequence, else Rescale Slope/Intercept.
3. VOI LUT (C.11.2): VOI LUT Sequence, else the first Window Center/Width pair
   with VOI LUT Function LINEAR (default), LINEAR_EXACT or SIGMOID (C.11.2.1.2-3).
   With no VOI in the header: images of 8 bits or fewer use their full stored
   range (they are display-ready), deeper ones a robust percentile window
   (0.5th-99.5th percentile of the modality values).
4. Inversion (C.7.6.3.1.2, C.11.6): MONOCHROME1, or Presentation LUT Shape
   (2050,0020) INVERSE. In DX/CR the two express the same inversion, so it is
   applied once.
   Pixel padding (C.7.5.1.1.2): stored values equal to Pixel Padding Value, or
   between it and Pixel Padding Range Limit, are not part of the image. They
   are left out of the percentile window and shown black (0), as the standard
   recommends padding be displayed, whatever the photometric interpretation.
5. Colour (RGB, YBR_*, PALETTE COLOR) secondary captures: converted to RGB by
   pydicom (palettes applied, C.7.6.3.1.5), then to luma (ITU-R BT.601
   weights); no VOI applies to colour. Whether a colour image is a radiograph
   at all is :func:`colour_fraction`'s question, asked at selection.
6. Display Shutter (C.7.6.11): what a display blanks out of the image. The
   visible part is inside every shape the header gives (rectangular, circular,
   polygonal: their intersection); the rest is left out of the percentile
   window and shown at the Shutter Presentation Value (a P-value, 0 = black;
   the CIELab value's L* when only that is given; black when neither is), as a
   workstation shows it.
7. Orientation (C.7.6.1.1.1): an image whose Patient Orientation (0020,0020) says it is stored on its
   side or upside down (the column axis, top to bottom, does not run to the feet: ``H\\L``, ``R\\H``...)
   is turned, by quarter turns only, until it runs to the feet (:func:`upright_turns`): the model
   scored chests turned by 90 degrees with 5-11 points less sensitivity (``benchmarks/orientation.py``).
   A mirrored image (``R\\F``) is left as stored (the model scores it alike), and a missing or
   unreadable orientation means as stored.
8. Presentation state (C.10.6): when the newest presentation state in the image's study that references
   it turns or mirrors it (Image Rotation, clockwise, then Image Horizontal Flip), the image is taken as
   that presentation shows it, and its Patient Orientation as turned with it (step 7 then turns what
   is still not upright). An image stored on its side with no Patient Orientation, shown upright by a
   presentation state, is so scored upright. The presentation's window, shutters and annotations are
   not applied.

Exported JPEG/PNG images are display values already: 8-bit ones map linearly
to [0, 1]; 16-bit PNG gets the percentile window. Colour ones go to luma.

A unit image with nothing to read fails (:func:`check_contrast`): when 99% of its
visible pixels lie within :data:`BLANK_SPREAD` of the display range (a black or
white export, or a header window that maps every pixel to one end), the model's
score of it would mean nothing, and it scored such pictures high.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, InvalidImageError, ModelError
from .records import FileKind, Presentation

PERCENTILE_WINDOW = (0.5, 99.5)
# check_contrast(): a unit image whose 0.5th-99.5th percentile spread is below this (5 of 255 grey levels) is blank
BLANK_SPREAD = 0.02
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, for R, G, B
# colour_fraction(): a pixel's colour is "not explained by its brightness" when its colour difference
# strays this far (on a [0, 1] scale) from the median of its brightness band ...
COLOUR_CHROMA = 0.05
# ... and an image is a colour picture, not a radiograph, when more than this fraction of its pixels do.
# Measured by benchmarks/colour_gate.py on 24 radiographs: tinted film under 0.5%, a colour cast drifting
# +-0.03 across the image under 2.5% (+-0.05: 9-22%, a third skipped), colour arrows, text and measurement
# lines 1-5%; photographs 27-78%, colour bars 40%, a heatmap over all of the image 80-96%.
COLOUR_PICTURE_FRACTION = 0.15

_TAG_PHOTOMETRIC = "(0028,0004) PhotometricInterpretation"
_TAG_WIDTH = "(0028,1051) WindowWidth"
_TAG_VOI_FUNCTION = "(0028,1056) VOILUTFunction"
_TAG_LUT_DESCRIPTOR = "(0028,3002) LUTDescriptor"
_TAG_SLOPE = "(0028,1053) RescaleSlope"
_TAG_PRESENTATION_SHAPE = "(2050,0020) PresentationLUTShape"
_TAG_PADDING = "(0028,0120) PixelPaddingValue"
_TAG_SHUTTER = "(0018,1600) ShutterShape"


@dataclass(frozen=True)
class LUT:
    """A DICOM lookup table (Modality or VOI LUT Sequence item), PS3.3 C.11.1.1 / C.11.2.1.1.

    ``first_mapped`` is the first input value mapped; inputs below it map to the
    first entry, inputs above the last mapped value to the last entry.
    """

    first_mapped: int
    bits: int
    data: np.ndarray = field(repr=False)

    def apply(self, values: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(values).astype(np.int64) - self.first_mapped, 0, len(self.data) - 1)
        return self.data[index].astype(np.float64)

    @property
    def output_max(self) -> float:
        """The largest output value the LUT can produce, per its descriptor.

        Some writers declare 16-bit entries while using only 12 bits (pydicom
        documents the same quirk); then 4095 is the real maximum.
        """
        declared = float(2 ** self.bits - 1)
        if self.bits == 16 and self.data.size and self.data.max() < 4096:
            return 4095.0
        return declared


@dataclass(frozen=True)
class Shutter:
    """A Display Shutter (PS3.3 C.7.6.11). Coordinates are the standard's: 1-based, rows from the
    top and columns from the left, edges inclusive. Build it with :meth:`from_dataset`."""

    rectangle: tuple[float, float, float, float] | None = None   # left, right columns; upper, lower rows
    circle: tuple[float, float, float] | None = None              # centre row, centre column, radius
    polygon: tuple[tuple[float, float], ...] | None = None        # vertices (row, column)
    value: float = 0.0                                            # shown outside, in [0, 1] (0 = black)

    @classmethod
    def from_dataset(cls, ds) -> "Shutter | None":
        """The shutter an image header defines, or None when it has none. A shape named in
        Shutter Shape whose attributes are missing or unusable is an error naming the tag."""
        raw = ds.get("ShutterShape", None)
        if raw is None or raw == "":
            return None
        shapes = {str(v).strip().upper() for v in (raw if _multi(raw) else [raw])} - {""}
        unknown = shapes - {"RECTANGULAR", "CIRCULAR", "POLYGONAL"}
        if unknown:
            raise InvalidImageError(f"unsupported shutter shape {', '.join(sorted(unknown))} (an image header "
                                    "may give RECTANGULAR, CIRCULAR, POLYGONAL)", step="normalise", tag=_TAG_SHUTTER)
        if not shapes:
            return None
        rectangle = circle = polygon = None
        if "RECTANGULAR" in shapes:
            left, right, upper, lower = (
                _numbers(ds, keyword, tag, 1)[0] for keyword, tag in (
                    ("ShutterLeftVerticalEdge", "(0018,1602)"), ("ShutterRightVerticalEdge", "(0018,1604)"),
                    ("ShutterUpperHorizontalEdge", "(0018,1606)"), ("ShutterLowerHorizontalEdge", "(0018,1608)")))
            if left > right or upper > lower:
                raise InvalidImageError(f"rectangular shutter has left {left:g} > right {right:g} or upper "
                                        f"{upper:g} > lower {lower:g}", step="normalise", tag=_TAG_SHUTTER)
            rectangle = (left, right, upper, lower)
        if "CIRCULAR" in shapes:
            centre = _numbers(ds, "CenterOfCircularShutter", "(0018,1610)", 2)
            radius = _numbers(ds, "RadiusOfCircularShutter", "(0018,1612)", 1)[0]
            if len(centre) != 2 or radius < 0:
                raise InvalidImageError("circular shutter needs a centre (row, column) and a radius >= 0",
                                        step="normalise", tag="(0018,1610) CenterOfCircularShutter")
            circle = (centre[0], centre[1], radius)
        if "POLYGONAL" in shapes:
            vertices = _numbers(ds, "VerticesOfThePolygonalShutter", "(0018,1620)", 6)
            if len(vertices) % 2:
                raise InvalidImageError(f"{len(vertices)} values: vertices are (row, column) pairs",
                                        step="normalise", tag="(0018,1620) VerticesOfThePolygonalShutter")
            polygon = tuple(zip(vertices[0::2], vertices[1::2]))
        value = 0.0
        if ds.get("ShutterPresentationValue", None) not in (None, ""):
            value = _numbers(ds, "ShutterPresentationValue", "(0018,1622)", 1)[0] / 65535.0
        elif ds.get("ShutterPresentationColorCIELabValue", None) not in (None, ""):
            value = _numbers(ds, "ShutterPresentationColorCIELabValue", "(0018,1624)", 3)[0] / 65535.0
        return cls(rectangle=rectangle, circle=circle, polygon=polygon, value=float(np.clip(value, 0.0, 1.0)))

    def outside(self, rows: int, columns: int) -> np.ndarray:
        """A (rows, columns) mask of the pixels the shutter blanks out."""
        r = np.arange(1, rows + 1, dtype=np.float64)[:, None]
        c = np.arange(1, columns + 1, dtype=np.float64)[None, :]
        inside = np.ones((rows, columns), dtype=bool)
        if self.rectangle is not None:
            left, right, upper, lower = self.rectangle
            inside &= (c >= left) & (c <= right) & (r >= upper) & (r <= lower)
        if self.circle is not None:
            row, column, radius = self.circle
            inside &= (r - row) ** 2 + (c - column) ** 2 <= radius ** 2
        if self.polygon is not None:
            import cv2

            polygon = np.zeros((rows, columns), dtype=np.uint8)
            points = np.array([[column - 1, row - 1] for row, column in self.polygon], dtype=np.float64)
            cv2.fillPoly(polygon, [np.round(points).astype(np.int32)], 1)
            inside &= polygon.astype(bool)
        return ~inside


def _multi(value) -> bool:
    """Whether a pydicom element value is multi-valued (a MultiValue or list, not one string)."""
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def element_values(value) -> list:
    """A pydicom element value as a list: none for an absent or empty one, several for a multi-valued one (which
    a damaged header can make of a one-valued attribute: 4 bytes of a US read as two)."""
    return list(value) if _multi(value) else ([] if value is None or value == "" else [value])


def joined_values(value) -> str:
    """A pydicom element value as a header shows it: its values, each stripped, joined by backslashes ('' for none).
    A one-valued attribute that a damaged header made two (``PA\\LL``) is so seen whole, not by its first value."""
    return "\\".join(str(v).strip() for v in element_values(value))


def _numbers(ds, keyword: str, tag: str, at_least: int) -> list[float]:
    """The finite numbers of an attribute with at least ``at_least`` values, else an error naming it."""
    value = ds.get(keyword, None)
    values = element_values(value)
    numbers = [_number(v, f"{tag} {keyword}") for v in values]
    if len(numbers) < at_least:
        raise InvalidImageError(f"{'missing' if not numbers else f'unusable value {value!r}'} for the display "
                                f"shutter", step="normalise", tag=f"{tag} {keyword}")
    return numbers


@dataclass(frozen=True)
class PixelParams:
    """The header fields the pixel transformations need, validated on entry.

    Build it with :meth:`from_dataset`; tests build it directly.
    """

    photometric: str = "MONOCHROME2"
    bits_stored: int = 16
    signed: bool = False
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    modality_lut: LUT | None = None
    voi_lut: LUT | None = None
    window_center: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"
    presentation_shape: str = ""
    padding_value: float | None = None      # stored value (before the Modality LUT)
    padding_limit: float | None = None      # with padding_value, the other end of a padded range
    shutter: Shutter | None = None          # the Display Shutter, when the header has one

    def __post_init__(self) -> None:
        if self.voi_function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise InvalidImageError(f"unsupported value {self.voi_function!r} (expected LINEAR, "
                                    "LINEAR_EXACT or SIGMOID)", step="normalise", tag=_TAG_VOI_FUNCTION)
        if self.window_width is not None:
            minimum = 1.0 if self.voi_function == "LINEAR" else 0.0
            if not self.window_width >= minimum or (self.voi_function != "LINEAR" and self.window_width == 0):
                raise InvalidImageError(f"window width {self.window_width} is invalid for "
                                        f"{self.voi_function} (PS3.3 C.11.2.1.2)", step="normalise", tag=_TAG_WIDTH)
        if self.rescale_slope == 0 or not np.isfinite(self.rescale_slope):
            raise InvalidImageError(f"rescale slope {self.rescale_slope} is not usable",
                                    step="normalise", tag=_TAG_SLOPE)

    @property
    def is_colour(self) -> bool:
        return not self.photometric.startswith("MONOCHROME")

    @property
    def inverted(self) -> bool:
        return self.photometric == "MONOCHROME1" or self.presentation_shape == "INVERSE"

    @classmethod
    def from_dataset(cls, ds) -> "PixelParams":
        """Read and check the relevant attributes of a pydicom Dataset."""
        photometric = joined_values(ds.get("PhotometricInterpretation", None)).upper()
        if not photometric:
            raise InvalidImageError("missing; cannot tell how to display the pixels",
                                    step="normalise", tag=_TAG_PHOTOMETRIC)
        known = ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
                 "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
        if photometric not in known:
            raise InvalidImageError(f"unsupported value '{photometric}'", step="normalise", tag=_TAG_PHOTOMETRIC)
        bits_stored = int(ds.get("BitsStored", None) or ds.get("BitsAllocated", None) or 8)

        modality_lut = None
        if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
            modality_lut = _read_lut(ds.ModalityLUTSequence[0], "(0028,3000) ModalityLUTSequence")
        voi_lut = None
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            voi_lut = _read_lut(ds.VOILUTSequence[0], "(0028,3010) VOILUTSequence")

        voi_frame = "FrameVOILUTSequence"
        if voi_lut is None and "WindowCenter" not in ds:       # the top level's VOI, when it has one, decides
            item = _frame_item(ds, voi_frame, "VOILUTSequence")
            if item is not None and len(item.VOILUTSequence):
                voi_lut = _read_lut(item.VOILUTSequence[0], "(0028,3010) VOILUTSequence")
        center = _first_number(_frame_value(ds, voi_frame, "WindowCenter"), "(0028,1050) WindowCenter")
        width = _first_number(_frame_value(ds, voi_frame, "WindowWidth"), _TAG_WIDTH)
        if (center is None) != (width is None):
            center = width = None  # half a window is no window (PS3.3 C.11.2: both are type 1C)
        function = str(_frame_value(ds, voi_frame, "VOILUTFunction") or "LINEAR").strip().upper()
        shape = joined_values(ds.get("PresentationLUTShape", None)).upper()
        if shape not in ("", "IDENTITY", "INVERSE"):    # it decides whether the picture is shown inverted: a damaged
            # value (INVERSE\IDENTITY, INVERS) was taken for IDENTITY, an INVERSE image scored as its negative
            raise InvalidImageError(f"unsupported value '{shape}' (an image's is IDENTITY or INVERSE)",
                                    step="normalise", tag=_TAG_PRESENTATION_SHAPE)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        padding = _padding_number(ds.get("PixelPaddingValue", None), signed, _TAG_PADDING)
        limit = _padding_number(ds.get("PixelPaddingRangeLimit", None), signed, "(0028,0121) PixelPaddingRangeLimit")
        rescale = "PixelValueTransformationSequence"
        slope = _first_number(_frame_value(ds, rescale, "RescaleSlope"), _TAG_SLOPE)
        intercept = _first_number(_frame_value(ds, rescale, "RescaleIntercept"), "(0028,1052) RescaleIntercept")
        return cls(
            photometric=photometric,
            bits_stored=bits_stored,
            signed=signed,
            # absent: the identity; a slope of 0 is refused (__post_init__), not taken for 1 as `or 1.0` did
            rescale_slope=1.0 if slope is None else float(slope),
            rescale_intercept=0.0 if intercept is None else float(intercept),
            modality_lut=modality_lut,
            voi_lut=voi_lut,
            window_center=center,
            window_width=width,
            voi_function=function,
            presentation_shape=shape,
            padding_value=padding,
            padding_limit=limit if padding is not None else None,
            shutter=Shutter.from_dataset(ds),
        )

    def padding_mask(self, stored: np.ndarray) -> np.ndarray | None:
        """Where ``stored`` (values after :func:`stored_values`) is padding; None when nothing is."""
        if self.padding_value is None or self.is_colour:
            return None
        if self.padding_limit is None:
            mask = stored == self.padding_value
        else:
            low, high = sorted((self.padding_value, self.padding_limit))
            mask = (stored >= low) & (stored <= high)
        return mask if mask.any() else None


def _frame_item(ds, macro: str, keyword: str):
    """The item of the functional group ``macro`` that holds ``keyword`` for the first frame of an enhanced
    multi-frame image (PS3.3 C.7.6.16: the per-frame group before the shared one), or None. Such images keep
    their rescale (Pixel Value Transformation, C.7.6.16.2.9) and window (Frame VOI LUT, C.7.6.16.2.10) there
    instead of at the top level."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        try:
            items = ds.get(groups, None) or ()
            macros = (items[0].get(macro, None) or ()) if len(items) else ()
            item = macros[0] if len(macros) else None
        except (AttributeError, TypeError, KeyError, IndexError):
            continue                # a damaged sequence holds nothing usable: the top level decides
        if item is not None and keyword in item:
            return item
    return None


def _frame_value(ds, macro: str, keyword: str):
    """``keyword``'s value at the top level of ``ds``, else in the first frame's functional group ``macro``
    (:func:`_frame_item`); None when neither has it."""
    if keyword in ds:
        return ds.get(keyword, None)
    item = _frame_item(ds, macro, keyword)
    return None if item is None else item.get(keyword, None)


def _first_number(value, tag: str) -> float | None:
    """The first value of a (possibly multi-valued) DS/IS element, or None when absent."""
    if value is None or value == "":
        return None
    if _multi(value):
        if len(value) == 0:
            return None
        value = value[0]
    return _number(value, tag)


def _number(value, tag: str) -> float:
    """One DS/IS value as a finite float, else an error naming ``tag``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidImageError(f"value {value!r} is not a number", step="normalise", tag=tag) from None
    if not np.isfinite(number):
        raise InvalidImageError(f"value {value!r} is not finite", step="normalise", tag=tag)
    return number


def _padding_number(value, signed: bool, tag: str) -> float | None:
    """A padding attribute (VR US or SS); raw bytes when the reader could not resolve the VR."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        return float(int.from_bytes(bytes(value[:2]), "little", signed=signed))
    return _first_number(value, tag)


def _read_lut(item, tag: str) -> LUT:
    try:
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        raw = item.LUTData
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidImageError(f"unreadable LUT item ({exc})", step="normalise", tag=tag) from None
    n = n or 65536  # PS3.3 C.11.1.1.1: 0 entries means 2^16
    if isinstance(raw, (bytes, bytearray)):
        # 8-bit entries: the standard stores them "as 8 bits allocated", two to a 16-bit word, but many writers
        # give each its own word; which one, the length tells (as DCMTK decides; pydicom reads words only)
        packed = bits <= 8 and len(raw) < 2 * n
        data = np.frombuffer(raw if packed else raw[:len(raw) // 2 * 2], dtype="u1" if packed else "<u2")
    else:
        data = np.asarray(raw if hasattr(raw, "__len__") else [raw])
    data = data.astype(np.float64)[:n]
    if data.size == 0:
        raise InvalidImageError("LUT Data is empty", step="normalise", tag=tag)
    if bits not in range(8, 17):
        raise InvalidImageError(f"LUT entry size {bits} bits is not 8-16", step="normalise", tag=_TAG_LUT_DESCRIPTOR)
    return LUT(first_mapped=first, bits=bits, data=data)


def stored_values(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep the low ``bits_stored`` bits and sign-extend them when ``signed``.

    Idempotent: pydicom already does this for native data, but arrays from other
    decoders or built by hand may carry garbage in the unused high bits.
    """
    if arr.dtype.kind not in "iu" or bits_stored >= arr.dtype.itemsize * 8:
        return arr.astype(np.float64)
    values = arr.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        sign = 1 << (bits_stored - 1)
        values = (values ^ sign) - sign
    return values.astype(np.float64)


def apply_modality(values: np.ndarray, params: PixelParams) -> np.ndarray:
    """Modality LUT (PS3.3 C.11.1): LUT Sequence if present, else rescale slope/intercept."""
    if params.modality_lut is not None:
        return params.modality_lut.apply(values)
    return values * params.rescale_slope + params.rescale_intercept


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window a modality-value image to [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3).

    LINEAR: ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped; LINEAR_EXACT:
    ``(x - c) / w + 0.5`` clipped; SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    values = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def percentile_bounds(values: np.ndarray, low: float = PERCENTILE_WINDOW[0],
                      high: float = PERCENTILE_WINDOW[1], among: np.ndarray | None = None) -> tuple[float, float]:
    """The values at the [low, high] percentiles (the min and max when those coincide): the ends of the
    robust window used when the header gives none. ``among`` (a boolean mask) limits the pixels looked at."""
    sample = values if among is None else values[among]
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        raise InvalidImageError(f"image has no contrast: every pixel is {lo:g}", step="normalise")
    return lo, hi


def percentile_window(values: np.ndarray, low: float = PERCENTILE_WINDOW[0],
                      high: float = PERCENTILE_WINDOW[1], among: np.ndarray | None = None) -> np.ndarray:
    """A robust window when the header gives none: map the [low, high] percentiles to [0, 1].
    ``among`` (a boolean mask) limits the pixels the percentiles are taken from."""
    lo, hi = percentile_bounds(values, low, high, among)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def check_contrast(unit: np.ndarray, hidden: np.ndarray | None = None, *, after: str = "", tag: str = "") -> None:
    """Raise InvalidImageError when the unit image has nothing to read: 99% of its pixels (those not
    ``hidden`` by padding or a shutter) within :data:`BLANK_SPREAD` of the display range. ``after`` says
    what made it so (the header's window), ``tag`` names its attribute. The percentiles are taken on about
    65,000 pixels (every n-th row and column of a larger image: a few milliseconds on a full-size CR)."""
    step = max(1, int(np.sqrt(unit.size / 65536)))
    visible = unit[::step, ::step] if hidden is None else unit[::step, ::step][~hidden[::step, ::step]]
    if visible.size == 0:
        visible = unit if hidden is None else unit[~hidden]
    lo, hi = (float(v) for v in np.percentile(visible, PERCENTILE_WINDOW))
    if hi - lo < BLANK_SPREAD:
        shade = "black" if hi < 0.1 else "white" if lo > 0.9 else "one grey"
        raise InvalidImageError(f"image is blank: 99% of its pixels are {shade} ({lo:.1%}-{hi:.1%} of the display "
                                f"range){after}: nothing to screen", step="normalise", tag=tag)


def _voi_in_use(params: PixelParams) -> tuple[str, str]:
    """What check_contrast names when a header's VOI made the image: (" after ...", its tag)."""
    if params.voi_lut is not None:
        return " after the header's VOI LUT", "(0028,3010) VOILUTSequence"
    if params.window_center is not None and params.window_width is not None:
        return (f" after the header's window (center {params.window_center:g}, width {params.window_width:g})",
                "(0028,1050) WindowCenter")
    return "", ""


def default_window(values: np.ndarray, params: PixelParams, padded: np.ndarray | None = None) -> tuple[float, float]:
    """The modality values shown black and white when the header has no VOI (see the module doc): the full
    stored range of an image of 8 bits or fewer that no Modality LUT or rescale changes (it is display-ready),
    else the percentile window of the pixels that are not ``padded``."""
    if params.bits_stored <= 8 and params.modality_lut is None and params.rescale_slope == 1 \
            and params.rescale_intercept == 0 and not params.signed:
        return 0.0, float(2 ** params.bits_stored - 1)
    return percentile_bounds(values, among=None if padded is None else ~padded)


def apply_voi(values: np.ndarray, params: PixelParams, padded: np.ndarray | None = None) -> np.ndarray:
    """VOI transformation to [0, 1] (PS3.3 C.11.2), with the fallbacks described in the module doc;
    ``padded`` pixels take no part in the percentile window."""
    if params.voi_lut is not None:
        return np.clip(params.voi_lut.apply(values) / params.voi_lut.output_max, 0.0, 1.0)
    if params.window_center is not None and params.window_width is not None:
        return apply_window(values, params.window_center, params.window_width, params.voi_function)
    lo, hi = default_window(values, params, padded)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def to_luma(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """RGB (last axis) to luma in [0, 1] with ITU-R BT.601 weights."""
    rgb = np.asarray(rgb, dtype=np.float64)
    luma = rgb[..., 0] * LUMA_WEIGHTS[0] + rgb[..., 1] * LUMA_WEIGHTS[1] + rgb[..., 2] * LUMA_WEIGHTS[2]
    return np.clip(luma / max_value, 0.0, 1.0)


def colour_fraction(rgb: np.ndarray, full_scale: float) -> float:
    """The fraction of an RGB image's pixels whose colour their brightness does not explain.

    A radiograph is grey, or tinted as a whole (a film scanned in colour: a sepia
    or blue base, a colour cast), so its colour is a function of its brightness;
    colour annotations (arrows, text, measurement lines) touch a few per cent of
    it. A photograph, a colour test pattern or a heatmap overlay has colour
    everywhere that brightness does not predict.

    The image is reduced to at most 256 pixels a side; each pixel's luma Y
    (BT.601) puts it in one of 16 brightness bands, whose tint is the median of
    the colour differences (B - Y, R - Y) of its pixels; a pixel counts when its
    colour differences are further than :data:`COLOUR_CHROMA` from its band's
    tint. 0.0 for a grey image.

    Parameters
    ----------
    rgb : numpy.ndarray
        (rows, columns, 3) in R, G, B order, any numeric type.
    full_scale : float
        The value of full intensity (255 for 8 bits).
    """
    import cv2

    rgb = np.asarray(rgb, dtype=np.float32) / np.float32(full_scale)
    scale = 256 / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    luma = (rgb @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)).ravel()
    blue, red = rgb[..., 2].ravel() - luma, rgb[..., 0].ravel() - luma
    if max(np.abs(blue).max(), np.abs(red).max()) * np.sqrt(2) <= COLOUR_CHROMA / 2:
        return 0.0   # grey (as in RGB exports of grey pictures): no pixel can stray from any tint
    bands = np.clip((luma * 16).astype(np.int64), 0, 15)
    order = np.argsort(bands, kind="stable")
    edges = np.searchsorted(bands[order], np.arange(17))
    tint_blue, tint_red = np.zeros(16, np.float32), np.zeros(16, np.float32)
    for band in range(16):
        members = order[edges[band]:edges[band + 1]]
        if members.size:
            tint_blue[band], tint_red[band] = np.median(blue[members]), np.median(red[members])
    strays = np.hypot(blue - tint_blue[bands], red - tint_red[bands]) > COLOUR_CHROMA
    return float(strays.mean())


def colour_frame(ds) -> np.ndarray:
    """The first frame of a colour data set as RGB: pydicom converts YBR, palettes are applied here."""
    from .ingest import decode_first_frame

    frame = decode_first_frame(ds)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
        import re

        from pydicom.datadict import tag_for_keyword
        from pydicom.pixels import apply_color_lut

        from .ingest import tag_label

        try:
            frame = apply_color_lut(frame, _palette_in_little_endian(ds))
        except Exception as exc:        # a palette attribute missing or malformed (AttributeError, ValueError...)
            named = re.search(r"'(\w+PaletteColorLookupTable\w*)'", str(exc))
            tag = tag_for_keyword(named.group(1)) if named else None
            raise InvalidImageError(f"the colour palette cannot be applied: {type(exc).__name__}: {exc}",
                                    step="normalise", tag=tag_label(tag) if tag is not None else _TAG_PHOTOMETRIC
                                    ) from None
    return frame


def _palette_in_little_endian(ds):
    """For a big-endian file, a data set of the palette attributes of ``ds`` with the 16-bit entries (OW, bytes
    as the file holds them) swapped to the little-endian order in which pydicom 3.0's ``apply_color_lut``
    reads them whatever the file's (its segmented palettes it reads right): unswapped, a white entry 0xFF00
    read as 0x00FF, and the picture came out black. ``ds`` itself is left as it is (a copy of a pydicom data
    set shares its elements); any other file's data set is returned as it is."""
    from pydicom.dataelem import DataElement
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset

    from .ingest import transfer_syntax

    if transfer_syntax(ds) != "1.2.840.10008.1.2.2":     # Explicit VR Big Endian, the one big-endian syntax
        return ds
    palette = Dataset()
    palette.file_meta = ds.file_meta
    keywords = ["PixelPresentation"] + [f"{prefix}{colour}PaletteColorLookupTable{part}"
                                        for colour in ("Red", "Green", "Blue", "Alpha")
                                        for prefix, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))]
    for keyword in keywords:
        if keyword in ds:
            element = ds[keyword]
            palette[element.tag] = DataElement(element.tag, element.VR, element.value)
    for colour in ("Red", "Green", "Blue", "Alpha"):
        data = palette.get(f"{colour}PaletteColorLookupTableData", None)
        descriptor = palette.get(f"{colour}PaletteColorLookupTableDescriptor", None)
        if isinstance(data, (bytes, bytearray)) and descriptor is not None and len(data) % 2 == 0 \
                and len(data) >= 2 * (int(descriptor[0]) or 65536):
            tag = tag_for_keyword(f"{colour}PaletteColorLookupTableData")
            palette[tag] = DataElement(tag, "OW", np.frombuffer(data, dtype=">u2").astype("<u2").tobytes())
    return palette


def colour_full_scale(rgb: np.ndarray, params: PixelParams) -> float:
    """The value of full intensity of a :func:`colour_frame`: palette entries are 16-bit (C.7.6.3.1.5)
    unless pydicom gave 8-bit ones; other colour images have Bits Stored."""
    if rgb.dtype == np.uint8:
        return 255.0
    return 65535.0 if params.photometric == "PALETTE COLOR" else float(2 ** params.bits_stored - 1)


def normalise_pixels(arr: np.ndarray, params: PixelParams) -> np.ndarray:
    """Stored pixel values of one frame to a float32 unit image (the contract in the module doc).

    Parameters
    ----------
    arr : numpy.ndarray
        One frame as decoded: (rows, columns) for monochrome, (rows, columns, 3)
        RGB for colour (:func:`colour_frame`).
    params : PixelParams
        The header fields, see :meth:`PixelParams.from_dataset`.
    """
    shuttered = None
    if params.shutter is not None and arr.ndim >= 2:
        shuttered = params.shutter.outside(*arr.shape[:2])
        if shuttered.all():
            raise InvalidImageError("the display shutter leaves no pixel of the image visible",
                                    step="normalise", tag=_TAG_SHUTTER)
        if not shuttered.any():
            shuttered = None
    if params.is_colour:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InvalidImageError(f"colour image decoded to shape {arr.shape}, expected (rows, columns, 3)",
                                    step="normalise", tag=_TAG_PHOTOMETRIC)
        unit = to_luma(arr, colour_full_scale(arr, params))
        check_contrast(unit, shuttered)
    else:
        if arr.ndim != 2:
            raise InvalidImageError(f"monochrome frame decoded to shape {arr.shape}, expected (rows, columns)",
                                    step="normalise", tag=_TAG_PHOTOMETRIC)
        stored = stored_values(arr, params.bits_stored, params.signed)
        padded = params.padding_mask(stored)
        if padded is not None and padded.all():
            raise InvalidImageError(f"every pixel is padding (value {params.padding_value:g})",
                                    step="normalise", tag=_TAG_PADDING)
        hidden = padded if shuttered is None else shuttered if padded is None else padded | shuttered
        if hidden is not None and hidden.all():
            raise InvalidImageError("every pixel the display shutter leaves visible is padding",
                                    step="normalise", tag=_TAG_SHUTTER)
        unit = apply_voi(apply_modality(stored, params), params, hidden)
        if params.inverted:
            unit = 1.0 - unit
        after, tag = _voi_in_use(params)
        check_contrast(unit, hidden, after=after, tag=tag)      # black or white as a workstation shows it
        if padded is not None:
            unit = np.where(padded, 0.0, unit)
    if shuttered is not None:
        unit = np.where(shuttered, params.shutter.value, unit)
    return unit.astype(np.float32)


def normalise_dataset(ds, presentation: Presentation | None = None) -> np.ndarray:
    """Decode the first frame of a pydicom Dataset and normalise it (see module doc), as ``presentation`` (the
    newest presentation state that references it, if any) shows it."""
    from .errors import CxrError
    from .ingest import check_pixel_description, decode_first_frame, tag_named_in

    try:
        check_pixel_description(ds)
        params = PixelParams.from_dataset(ds)
    except CxrError:
        raise
    except Exception as exc:    # pydicom converts a value when it is first read: a corrupt VR or value raises then
        raise InvalidImageError(f"cannot read the header value: {type(exc).__name__}: {exc}", step="normalise",
                                tag=tag_named_in(str(exc))) from None
    unit = normalise_pixels(colour_frame(ds) if params.is_colour else decode_first_frame(ds), params)
    return upright(unit, patient_orientation(ds), presentation)


_OPPOSITE = {"H": "F", "F": "H", "L": "R", "R": "L", "A": "P", "P": "A"}


def patient_orientation(ds) -> str:
    """Patient Orientation (0020,0020) as written, its values joined by a backslash; '' when absent or unreadable
    (it describes the image, and a damaged one says nothing: the image is then taken as stored)."""
    try:
        value = ds.get("PatientOrientation", None)
        values = [value] if isinstance(value, str) else list(value or ())
        return "\\".join(str(v).strip().upper() for v in values)
    except Exception:
        return ""


def _directions(orientation: str) -> tuple[str, str] | None:
    """The row and column directions a Patient Orientation (see :func:`patient_orientation`) gives; None when it
    is not two values of the letters A, P, R, L, H, F."""
    values = orientation.split("\\")
    if len(values) != 2 or not all(v and set(v) <= set(_OPPOSITE) for v in values):
        return None
    return values[0], values[1]


def upright_turns(orientation: str) -> int:
    """Counter-clockwise quarter turns (``np.rot90``'s ``k``) that bring an image whose Patient Orientation is
    ``orientation`` (see :func:`patient_orientation`) upright: its column axis (top to bottom) running to
    the patient's feet. 0 when it does already, or when the orientation is not two values of the letters
    A, P, R, L, H, F or has no axis along the body (each value's first letter is its main direction)."""
    directions = _directions(orientation)
    if directions is None:
        return 0
    row, column = directions[0][0], directions[1][0]
    # after k turns the (row, column) directions are: 1 (column, opposite row), 2 (opposite row, opposite
    # column), 3 (opposite column, row); the one whose column is F
    for k, new_column in ((0, column), (1, _OPPOSITE[row]), (2, _OPPOSITE[column]), (3, row)):
        if new_column == "F":
            return k
    return 0


def _opposite(direction: str) -> str:
    return "".join(_OPPOSITE[letter] for letter in direction)


def shown_orientation(orientation: str, presentation: Presentation | None) -> str:
    """The Patient Orientation of an image as ``presentation`` shows it: ``orientation`` turned with the image
    (each quarter turn clockwise: the new rows run the opposite of the old columns, the new columns as the old
    rows), then mirrored (rows the opposite way). Unchanged when it is not two values of A, P, R, L, H, F."""
    directions = _directions(orientation)
    if presentation is None or directions is None:
        return orientation
    row, column = directions
    for _ in range(presentation.rotation // 90 % 4):
        row, column = _opposite(column), row
    if presentation.flip:
        row = _opposite(row)
    return f"{row}\\{column}"


def presentation_words(presentation: Presentation) -> str:
    """``turned 90 degrees clockwise and mirrored left to right``: what a presentation state does."""
    parts = [f"turned {presentation.rotation} degrees clockwise"] if presentation.rotation else []
    parts += ["mirrored left to right"] if presentation.flip else []
    return " and ".join(parts)


def upright(unit: np.ndarray, orientation: str, presentation: Presentation | None = None) -> np.ndarray:
    """``unit`` as ``presentation`` shows it (turned clockwise, then mirrored), then turned upright as its Patient
    Orientation, turned with it, says (see :func:`upright_turns`)."""
    if presentation is not None and presentation.transforms:
        unit = np.rot90(unit, -(presentation.rotation // 90))
        if presentation.flip:
            unit = unit[:, ::-1]
        orientation = shown_orientation(orientation, presentation)
    turns = upright_turns(orientation)
    if turns:
        unit = np.rot90(unit, turns)
    return unit if unit.flags.c_contiguous else np.ascontiguousarray(unit)


def normalise_display_image(arr: np.ndarray) -> np.ndarray:
    """An exported JPEG/PNG (already windowed for display) to the same unit-image contract.

    8-bit: linear to [0, 1]. 16-bit: percentile window. Colour (OpenCV's BGR or
    BGRA channel order): luma.
    """
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            arr = arr[..., ::-1]  # BGR -> RGB
    if arr.ndim == 3:
        unit = to_luma(arr, 255.0) if arr.dtype == np.uint8 else percentile_window(to_luma(arr, 1.0))
    else:
        unit = arr.astype(np.float32) / np.float32(255) if arr.dtype == np.uint8 else \
            percentile_window(arr.astype(np.float64))
    check_contrast(unit)
    return unit.astype(np.float32)


def load_unit_image(path: Path | str, kind: FileKind | None = None,
                    presentation: Presentation | None = None) -> np.ndarray:
    """Read any supported file and return its unit image at native resolution (a DICOM image as
    ``presentation``, the newest presentation state that references it, shows it).

    Raises :class:`cxrscreen.errors.InputError` (with path, step and tag) on failure.
    """
    from .ingest import not_screenable, read_dicom, read_display_image, sniff

    path = Path(path)
    kind = kind or sniff(path)
    if kind is None:
        raise InputError(not_screenable(path), path=path, step="discover")
    try:
        if kind is FileKind.DICOM:
            return normalise_dataset(read_dicom(path), presentation)
        return normalise_display_image(read_display_image(path))
    except InputError as exc:
        raise exc.with_path(path)


EQUALIZE_MODES = ("none", "clahe")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a unit image becomes the model's input; stored in the model card.

    ``resize`` is ``stretch`` (the training images are square exports whose
    aspect ratio was not kept, so screening must not letterbox either) with
    OpenCV's area interpolation for downsampling. ``equalize`` is ``none`` or
    ``clahe``: contrast-limited adaptive histogram equalisation of the resized
    input (8-bit, ``clahe_tiles`` x ``clahe_tiles`` tiles, clip limit
    ``clahe_clip``; OpenCV's), which shrinks what the window, the exposure and
    the export curve change between sites (by 30-45% on the bundled chest,
    not entirely). Cards written before ``equalize`` existed mean ``none``.
    """

    input_size: tuple[int, int] = (224, 224)   # (height, width)
    resize: str = "stretch"
    interpolation: str = "area"
    contract: str = "unit-gray-v1"             # normalise.py's output contract
    equalize: str = "none"
    clahe_clip: float = 2.0
    clahe_tiles: int = 8

    def to_json(self) -> dict:
        data = {"input_size": list(self.input_size), "resize": self.resize,
                "interpolation": self.interpolation, "contract": self.contract, "equalize": self.equalize}
        if self.equalize == "clahe":
            data.update(clahe_clip=self.clahe_clip, clahe_tiles=self.clahe_tiles)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "PreprocessSpec":
        try:
            spec = cls(input_size=tuple(int(v) for v in data["input_size"]),
                       resize=str(data.get("resize", "stretch")),
                       interpolation=str(data.get("interpolation", "area")),
                       contract=str(data.get("contract", "unit-gray-v1")),
                       equalize=str(data.get("equalize", "none")),
                       clahe_clip=float(data.get("clahe_clip", 2.0)),
                       clahe_tiles=int(data.get("clahe_tiles", 8)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card preprocessing is malformed: {exc}", step="load-model") from None
        if spec.contract != "unit-gray-v1" or spec.resize != "stretch" or spec.equalize not in EQUALIZE_MODES:
            raise ModelError(f"model card asks for preprocessing {spec.contract}/{spec.resize}/{spec.equalize}, "
                             "which this version of cxrscreen does not implement", step="load-model")
        if spec.interpolation not in _INTERPOLATION:
            raise ModelError(f"model card interpolation {spec.interpolation!r} is not one of "
                             f"{sorted(_INTERPOLATION)}", step="load-model")
        if len(spec.input_size) != 2 or min(spec.input_size) < 16:
            raise ModelError(f"model card input size {spec.input_size} is not usable", step="load-model")
        if spec.equalize == "clahe" and not (spec.clahe_clip > 0 and 1 <= spec.clahe_tiles <= min(spec.input_size)):
            raise ModelError(f"model card CLAHE settings (clip {spec.clahe_clip}, tiles {spec.clahe_tiles}) "
                             "are not usable", step="load-model")
        return spec


_INTERPOLATION = {"area": 3, "linear": 1, "cubic": 2}  # cv2.INTER_* values


def resize_to_input(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize a unit image to the model's input size: float32 (height, width, 1) in [0, 1]."""
    import cv2

    height, width = spec.input_size
    interpolation = _INTERPOLATION[spec.interpolation]
    if unit.shape[0] < height or unit.shape[1] < width:
        interpolation = cv2.INTER_LINEAR  # area interpolation is for shrinking
    resized = cv2.resize(np.ascontiguousarray(unit, dtype=np.float32), (width, height),
                         interpolation=interpolation)
    return np.clip(resized, 0.0, 1.0)[..., None]


def equalize_input(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The card's equalisation of a resized (height, width, 1) input; identity for ``none``."""
    if spec.equalize == "none":
        return img
    import cv2

    gray = np.rint(np.clip(img[..., 0], 0.0, 1.0) * 255.0).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles))
    return (clahe.apply(gray).astype(np.float32) / 255.0)[..., None]


def to_model_input(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A unit image to the model's input: float32 (height, width, 1) in [0, 1]."""
    return equalize_input(resize_to_input(unit, spec), spec)


def load_model_input(path: Path | str, spec: PreprocessSpec, kind: FileKind | None = None) -> np.ndarray:
    """The one function training and screening both call: file -> model input.

    Training augments between the two halves of :func:`to_model_input`
    (:func:`resize_to_input`, then :func:`equalize_input`), so the model learns
    from equalised images of augmented radiographs, as screening shows it.
    """
    return to_model_input(load_unit_image(path, kind), spec)


def pixels_digest(array: np.ndarray) -> str:
    """A digest of an image array (its shape, type and values): the same picture under another name, header,
    file or patient gives the same one. Read from the array's own memory (no copy of a 20 MB image)."""
    import hashlib

    digest = hashlib.sha256(repr((array.shape, array.dtype.str)).encode())     # faster than blake2b here (SHA-NI)
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()
