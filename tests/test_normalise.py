"""Windowing against hand-computed values (PS3.3 C.11), through the public functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from conftest import colour_versions
from cxrscreen.errors import InvalidImageError, ModelError
from cxrscreen.normalise import (
    COLOUR_PICTURE_FRACTION,
    LUT,
    PixelParams,
    PreprocessSpec,
    Shutter,
    apply_window,
    colour_fraction,
    load_model_input,
    load_unit_image,
    normalise_pixels,
    resize_to_input,
    shown_orientation,
    to_model_input,
    upright_turns,
)
from cxrscreen.report import turn_note

ROOT = Path(__file__).resolve().parents[1]


def row(*values, dtype=np.uint16):
    return np.array([values], dtype=dtype)


# Each case: stored values, parameters, expected unit values (worked out by hand in the comment).
CASES = {
    # modality: [0,100,200,300]*2-100 = [-100,100,300,500]; LINEAR c=200 w=401: (x-199.5)/400+0.5
    "rescale+window": (row(0, 100, 200, 300),
                       PixelParams(bits_stored=12, rescale_slope=2, rescale_intercept=-100,
                                   window_center=200, window_width=401),
                       [0.0, 0.25125, 0.75125, 1.0]),
    # LINEAR_EXACT c=100 w=50: (x-100)/50+0.5
    "linear-exact": (row(50, 75, 90, 100, 125, 150),
                     PixelParams(window_center=100, window_width=50, voi_function="LINEAR_EXACT"),
                     [0.0, 0.0, 0.3, 0.5, 1.0, 1.0]),
    # SIGMOID c=100 w=50: 1/(1+exp(-4(x-100)/50))
    "sigmoid": (row(50, 100, 150),
                PixelParams(window_center=100, window_width=50, voi_function="SIGMOID"),
                [1 / (1 + np.exp(4.0)), 0.5, 1 / (1 + np.exp(-4.0))]),
    # VOI LUT: first mapped 10, 8-bit entries [0,50,100,255]; below 10 -> entry 0, above 13 -> last
    "voi-lut-sequence": (row(5, 10, 11, 12, 13, 20),
                         PixelParams(bits_stored=8, voi_lut=LUT(10, 8, np.array([0, 50, 100, 255.0])),
                                     window_center=1000, window_width=10),
                         [0.0, 0.0, 50 / 255, 100 / 255, 1.0, 1.0]),
    # Modality LUT sequence [100, 200, 300, 400] from 0, then window c=250.5 w=301: (x-250)/300+0.5
    "modality-lut-sequence": (row(0, 1, 2, 3),
                              PixelParams(modality_lut=LUT(0, 16, np.array([100, 200, 300, 400.0])),
                                          window_center=250.5, window_width=301),
                              [0.0, 1 / 3, 2 / 3, 1.0]),
    # MONOCHROME1 c=50.5 w=101: x/100, then inverted
    "monochrome1": (row(0, 25, 100), PixelParams(photometric="MONOCHROME1", window_center=50.5,
                                                 window_width=101),
                    [1.0, 0.75, 0.0]),
    # Presentation LUT Shape INVERSE on MONOCHROME2 inverts the same way
    "presentation-inverse": (row(0, 25, 100), PixelParams(window_center=50.5, window_width=101,
                                                          presentation_shape="INVERSE"),
                             [1.0, 0.75, 0.0]),
    # MONOCHROME1 + INVERSE (the DX convention) is one inversion, not two
    "monochrome1+inverse": (row(0, 25, 100), PixelParams(photometric="MONOCHROME1", window_center=50.5,
                                                         window_width=101, presentation_shape="INVERSE"),
                            [1.0, 0.75, 0.0]),
    # signed 16-bit: c=0.5 w=2001 -> x/2000+0.5
    "signed-16": (row(-1000, 0, 1000, dtype=np.int16),
                  PixelParams(bits_stored=16, signed=True, window_center=0.5, window_width=2001),
                  [0.0, 0.5, 1.0]),
    # Bits Stored 12 of 16 with garbage in the high bits: 0xF064 -> 100, 0x1FFF -> 4095; c=2048.5 w=4097 -> x/4096
    "bits-stored-12-of-16": (row(0xF064, 0x1FFF, 0x0800),
                             PixelParams(bits_stored=12, window_center=2048.5, window_width=4097),
                             [100 / 4096, 4095 / 4096, 0.5]),
    # signed 12 of 16: 0x0FFF is -1, 0x0800 is -2048, 0x07FF is 2047; c=0.5 w=4097 -> x/4096+0.5
    "signed-12-of-16": (row(0x0FFF, 0x0800, 0x07FF),
                        PixelParams(bits_stored=12, signed=True, window_center=0.5, window_width=4097),
                        [0.5 - 1 / 4096, 0.0, 0.5 + 2047 / 4096]),
    # no VOI, 8-bit: full stored range
    "no-voi-8-bit": (row(0, 51, 255, dtype=np.uint8), PixelParams(bits_stored=8), [0.0, 0.2, 1.0]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_windowing_matches_hand_computed(name):
    stored, params, expected = CASES[name]
    out = normalise_pixels(stored, params)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_no_voi_percentile_fallback():
    # values 0..1000: the 0.5th and 99.5th percentiles are 5 and 995
    values = np.arange(1001, dtype=np.uint16).reshape(7, 143)
    out = normalise_pixels(values, PixelParams(bits_stored=16))
    flat = out.ravel()
    np.testing.assert_allclose(flat[[0, 5, 500, 995, 1000]], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_window_width_one_is_a_threshold():
    np.testing.assert_array_equal(apply_window(np.array([9.0, 10.0, 11.0]), 10, 1), [0, 1, 1])


def test_rgb_secondary_capture_goes_to_luma():
    rgb = np.zeros((1, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (255, 255, 255)
    out = normalise_pixels(rgb, PixelParams(photometric="RGB", bits_stored=8))
    np.testing.assert_allclose(out[0], [0.299, 0.587, 1.0], atol=1e-6)


@pytest.mark.parametrize("name, picture", [("grey", False), ("sepia", False), ("cast", False), ("annotated", False),
                                           ("heatmap overlay", True), ("rainbow", True)])
def test_colour_fraction_tells_colour_pictures_from_radiographs(name, picture):
    image = colour_versions()[name]
    fraction = colour_fraction(image, 255.0)
    assert (fraction > COLOUR_PICTURE_FRACTION) is picture
    if name == "grey":
        assert fraction == 0.0
    if name == "annotated":
        assert fraction > 0.005       # the arrow, the text and the line are seen, and are not enough
    # the same picture in 16 bits, measured against its own full scale, and at 4x the size
    assert colour_fraction(image.astype(np.uint16) * 257, 65535.0) == pytest.approx(fraction, abs=1e-3)
    large = np.repeat(np.repeat(image, 4, axis=0), 4, axis=1)
    assert colour_fraction(large, 255.0) == pytest.approx(fraction, abs=0.02)


@pytest.mark.parametrize("kwargs, tag", [
    ({"window_center": 10, "window_width": 0.5}, "(0028,1051)"),
    ({"window_center": 10, "window_width": 0, "voi_function": "SIGMOID"}, "(0028,1051)"),
    ({"voi_function": "GAMMA"}, "(0028,1056)"),
    ({"rescale_slope": 0}, "(0028,1053)"),
])
def test_invalid_parameters_name_the_tag(kwargs, tag):
    with pytest.raises(InvalidImageError) as info:
        PixelParams(**kwargs)
    assert tag in str(info.value)


def test_params_from_dataset_take_first_of_multi_valued_window():
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 12
    ds.PixelRepresentation = 0
    ds.WindowCenter = [200, 1000]
    ds.WindowWidth = [401, 10]
    ds.RescaleSlope = "2"
    ds.RescaleIntercept = "-100"
    params = PixelParams.from_dataset(ds)
    assert (params.window_center, params.window_width) == (200, 401)
    np.testing.assert_allclose(normalise_pixels(row(0, 100, 200, 300), params)[0],
                               [0.0, 0.25125, 0.75125, 1.0], atol=1e-6)


def test_params_from_dataset_read_voi_lut_sequence():
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsStored = 8
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.LUTData = [0, 50, 100, 255]
    ds.VOILUTSequence = [item]
    ds.VOILUTFunction = "SIGMOID"  # ignored: the LUT sequence wins
    params = PixelParams.from_dataset(ds)
    np.testing.assert_allclose(normalise_pixels(row(10, 11, 13), params)[0], [1.0, 1 - 50 / 255, 0.0], atol=1e-6)


def _enhanced(shared: dict, per_frame: dict | None = None) -> Dataset:
    """A header of an enhanced multi-frame image: its rescale and window only in the functional groups."""
    def group(macros: dict) -> Dataset:
        item = Dataset()
        for macro, values in macros.items():
            inner = Dataset()
            for keyword, value in values.items():
                setattr(inner, keyword, value)
            setattr(item, macro, [inner])
        return item

    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 12
    ds.PixelRepresentation = 0
    ds.SharedFunctionalGroupsSequence = [group(shared)]
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = [group(per_frame), group({})]
    return ds


def test_an_enhanced_image_is_rescaled_and_windowed_as_its_functional_groups_say():
    # PS3.3 C.7.6.16.2.9 (Pixel Value Transformation) and C.7.6.16.2.10 (Frame VOI LUT): an enhanced image has
    # no top-level rescale or window; shown with a percentile window, it would have another contrast.
    ds = _enhanced({"PixelValueTransformationSequence": {"RescaleSlope": "1", "RescaleIntercept": "-1024"},
                    "FrameVOILUTSequence": {"WindowCenter": "40", "WindowWidth": "401",
                                            "VOILUTFunction": "LINEAR_EXACT"}})
    params = PixelParams.from_dataset(ds)
    assert (params.rescale_intercept, params.window_center, params.window_width) == (-1024, 40, 401)
    assert params.voi_function == "LINEAR_EXACT"
    np.testing.assert_allclose(normalise_pixels(row(0, 1064, 1300), params)[0], [0.0, 0.5, 1.0], atol=1e-6)

    # the first frame's own group comes before the shared one; the top level before both
    ds = _enhanced({"FrameVOILUTSequence": {"WindowCenter": "40", "WindowWidth": "401"}},
                   per_frame={"FrameVOILUTSequence": {"WindowCenter": "1000", "WindowWidth": "2000"}})
    assert PixelParams.from_dataset(ds).window_center == 1000
    ds.WindowCenter, ds.WindowWidth = "7", "3"
    assert PixelParams.from_dataset(ds).window_center == 7

    # a VOI LUT in the first frame's group (C.7.6.16.2.10 allows one beside or instead of the window)
    lut = Dataset()
    lut.LUTDescriptor = [4, 10, 8]
    lut.LUTData = [0, 50, 100, 255]
    ds = _enhanced({"FrameVOILUTSequence": {"VOILUTSequence": [lut]}})
    np.testing.assert_allclose(normalise_pixels(row(10, 11, 13), PixelParams.from_dataset(ds))[0],
                               [0.0, 50 / 255, 1.0], atol=1e-6)


def test_an_enhanced_image_with_empty_functional_groups_has_no_window():
    ds = _enhanced({"FrameVOILUTSequence": {}})
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = []
    ds.PerFrameFunctionalGroupsSequence = []
    params = PixelParams.from_dataset(ds)
    assert (params.rescale_slope, params.rescale_intercept, params.window_center) == (1.0, 0.0, None)


@pytest.mark.parametrize("packed", [False, True])
def test_a_voi_lut_of_8_bit_entries_is_read_one_per_word_or_packed_as_its_length_says(packed):
    # PS3.3 C.11.2.1.1 stores 8-bit entries "as 8 bits allocated" (two to a word); many writers give each its
    # own 16-bit word instead (pydicom reads only that, DCMTK tells the two apart by the length, as here).
    # Read as packed, one-per-word entries became every other entry and zeros.
    entries = np.array([0, 40, 80, 120, 160, 200, 255])
    item = Dataset()
    item.LUTDescriptor = [len(entries), 10, 8]
    raw = entries.astype("u1").tobytes() + b"\0" if packed else entries.astype("<u2").tobytes()
    item.add_new(0x00283006, "OW", raw)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 8
    ds.VOILUTSequence = [item]
    params = PixelParams.from_dataset(ds)
    np.testing.assert_allclose(normalise_pixels(row(10, 12, 15, 16, 200), params)[0],
                               [0.0, 80 / 255, 200 / 255, 1.0, 1.0], atol=1e-6)


def test_missing_photometric_is_an_error_naming_the_tag():
    with pytest.raises(InvalidImageError, match=r"\(0028,0004\)"):
        PixelParams.from_dataset(Dataset())


@pytest.mark.parametrize("kw", [
    {},  # MONOCHROME2 12-bit with rescale + window through a written file
    {"photometric": "MONOCHROME1"},
])
def test_dicom_file_round_trip_through_load_unit_image(write_dicom, chest_pixels, kw):
    path = write_dicom(chest_pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096, **kw)
    unit = load_unit_image(path)
    assert unit.shape == chest_pixels.shape and unit.dtype == np.float32
    expected = np.clip((chest_pixels - 2047.5) / 4095 + 0.5, 0, 1)
    if kw:
        expected = 1 - expected
    np.testing.assert_allclose(unit, expected, atol=1e-6)


def _padded_plate(pad: int, rng_seed: int = 0) -> np.ndarray:
    """A 12-bit image whose left 40% is padding ``pad``, the rest anatomy in 1000..3000."""
    values = np.random.default_rng(rng_seed).integers(1000, 3001, size=(100, 100)).astype(np.uint16)
    values[:, :40] = pad
    return values


def test_padding_takes_no_part_in_the_percentile_window_and_is_shown_black():
    values = _padded_plate(0)
    anatomy = values[:, 40:].astype(np.float64)
    lo, hi = np.percentile(anatomy, [0.5, 99.5])
    out = normalise_pixels(values, PixelParams(bits_stored=12, padding_value=0))
    np.testing.assert_allclose(out[:, 40:], np.clip((anatomy - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert (out[:, :40] == 0).all()
    # without the padding attribute the padded 40% drags the window's low end to 0
    plain = normalise_pixels(values, PixelParams(bits_stored=12))
    assert plain[:, 40:].min() > 0.2


def test_padding_of_a_monochrome1_plate_and_a_padding_range_are_black_too():
    values = _padded_plate(4095)
    values[:, 40:45] = 4090            # inside the padded range 4090..4095
    out = normalise_pixels(values, PixelParams(photometric="MONOCHROME1", bits_stored=12,
                                               padding_value=4095, padding_limit=4090))
    assert (out[:, :45] == 0).all()
    anatomy = values[:, 45:].astype(np.float64)
    lo, hi = np.percentile(anatomy, [0.5, 99.5])
    np.testing.assert_allclose(out[:, 45:], 1 - np.clip((anatomy - lo) / (hi - lo), 0, 1), atol=1e-6)
    with pytest.raises(InvalidImageError, match=r"every pixel is padding"):
        normalise_pixels(np.full((8, 8), 4095, np.uint16), PixelParams(bits_stored=12, padding_value=4095))


def test_shutter_shapes_by_hand():
    """1-based rows/columns, edges inclusive (PS3.3 C.7.6.11); several shapes: the visible part is
    inside all of them."""
    rect = Shutter(rectangle=(3, 8, 2, 5)).outside(10, 12)
    expected = np.ones((10, 12), bool)
    expected[1:5, 2:8] = False                      # rows 2..5, columns 3..8
    np.testing.assert_array_equal(rect, expected)
    circle = Shutter(circle=(5, 6, 2)).outside(10, 12)
    assert (~circle).sum() == 13 and not circle[4, 5] and not circle[2, 5] and circle[2, 4]   # 13 lattice points
    triangle = Shutter(polygon=((1, 1), (1, 10), (10, 1))).outside(10, 12)
    assert not triangle[0, 0] and not triangle[0, 9] and not triangle[9, 0] and triangle[9, 9] and triangle[:, 10:].all()
    both = Shutter(rectangle=(3, 8, 2, 5), circle=(5, 6, 2)).outside(10, 12)
    np.testing.assert_array_equal(both, rect | circle)


def _collimated_plate() -> tuple[np.ndarray, Shutter]:
    """A 12-bit image: anatomy 1000..3000 inside rows 11..90 / columns 21..80, unexposed (4095:
    bright) around it, as a collimated plate is, with a rectangular shutter on the collimation."""
    values = np.full((100, 100), 4095, np.uint16)
    values[10:90, 20:80] = np.random.default_rng(1).integers(1000, 3001, size=(80, 60))
    return values, Shutter(rectangle=(21, 80, 11, 90))


def test_shutter_hides_the_collimation_from_the_window_and_the_model():
    values, shutter = _collimated_plate()
    anatomy = values[10:90, 20:80].astype(np.float64)
    lo, hi = np.percentile(anatomy, [0.5, 99.5])
    out = normalise_pixels(values, PixelParams(bits_stored=12, shutter=shutter))
    np.testing.assert_allclose(out[10:90, 20:80], np.clip((anatomy - lo) / (hi - lo), 0, 1), atol=1e-6)
    inside = np.zeros_like(out, bool)
    inside[10:90, 20:80] = True
    assert (out[~inside] == 0).all()                # black: no presentation value given
    # without the shutter the bright collimation takes the top of the window and stays white
    plain = normalise_pixels(values, PixelParams(bits_stored=12))
    assert (plain[~inside] == 1).all() and plain[inside].max() < 0.8
    grey = normalise_pixels(values, PixelParams(photometric="MONOCHROME1", bits_stored=12,
                                                shutter=Shutter(rectangle=(21, 80, 11, 90), value=0.5)))
    assert (grey[~inside] == 0.5).all()             # the presentation value is a display value: not inverted
    np.testing.assert_allclose(grey[inside], 1 - out[inside], atol=1e-6)
    with pytest.raises(InvalidImageError, match=r"\(0018,1600\).*no pixel of the image visible"):
        normalise_pixels(values, PixelParams(bits_stored=12, shutter=Shutter(rectangle=(200, 300, 1, 5))))


def test_shutter_is_read_from_a_written_file(write_dicom):
    values, _ = _collimated_plate()
    path = write_dicom(values, bits_stored=12, ShutterShape=["RECTANGULAR", "CIRCULAR"], ShutterLeftVerticalEdge=21,
                       ShutterRightVerticalEdge=80, ShutterUpperHorizontalEdge=11, ShutterLowerHorizontalEdge=90,
                       CenterOfCircularShutter=[50, 50], RadiusOfCircularShutter=45, ShutterPresentationValue=65535)
    unit = load_unit_image(path)
    visible = ~Shutter(rectangle=(21, 80, 11, 90), circle=(50, 50, 45)).outside(100, 100)
    assert (unit[~visible] == 1).all() and unit[visible].min() == 0 and unit[visible].max() == 1
    assert visible[50, 21] and not visible[11, 21]  # the circle cuts the rectangle's corners


@pytest.mark.parametrize("attributes, tag", [
    ({"ShutterShape": "BITMAP"}, "(0018,1600)"),
    ({"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 1, "ShutterUpperHorizontalEdge": 1,
      "ShutterLowerHorizontalEdge": 5}, "(0018,1604) ShutterRightVerticalEdge"),
    ({"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 9, "ShutterRightVerticalEdge": 2,
      "ShutterUpperHorizontalEdge": 1, "ShutterLowerHorizontalEdge": 5}, "(0018,1600)"),
    ({"ShutterShape": "CIRCULAR", "CenterOfCircularShutter": [5, 5]}, "(0018,1612) RadiusOfCircularShutter"),
    ({"ShutterShape": "POLYGONAL", "VerticesOfThePolygonalShutter": [1, 1, 1, 9]},
     "(0018,1620) VerticesOfThePolygonalShutter"),
])
def test_an_unusable_shutter_is_an_error_naming_the_tag(attributes, tag):
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    with pytest.raises(InvalidImageError) as info:
        PixelParams.from_dataset(ds)
    assert tag in str(info.value)


@pytest.mark.parametrize("where", ["top level", "functional group"])
def test_a_rescale_slope_of_zero_is_an_error_naming_the_tag(where):
    """Rescale Slope 0 makes every pixel the intercept. It was read as 1 (``slope or 1.0``) with the intercept
    kept, a picture neither the standard nor DCMTK (which drops the whole rescale, with a warning) shows, and
    scored; the check meant to refuse it never saw the 0."""
    if where == "top level":
        ds = Dataset()
        ds.PhotometricInterpretation, ds.RescaleSlope, ds.RescaleIntercept = "MONOCHROME2", "0", "-1024"
    else:
        ds = _enhanced({"PixelValueTransformationSequence": {"RescaleSlope": "0", "RescaleIntercept": "-1024"}})
    with pytest.raises(InvalidImageError) as info:
        PixelParams.from_dataset(ds)
    assert info.value.tag == "(0028,1053) RescaleSlope" and info.value.cause == "rescale slope 0.0 is not usable"
    ds = Dataset()
    ds.PhotometricInterpretation, ds.RescaleIntercept = "MONOCHROME2", "-1024"     # no slope: 1, as before
    params = PixelParams.from_dataset(ds)
    assert (params.rescale_slope, params.rescale_intercept) == (1.0, -1024.0)


@pytest.mark.parametrize("value, said", [("INVERS", "'INVERS'"), (["INVERSE", "IDENTITY"], "'INVERSE\\IDENTITY'"),
                                         ("LIN OD", "'LIN OD'")])
def test_a_presentation_lut_shape_that_is_neither_identity_nor_inverse_is_an_error_naming_the_tag(value, said):
    """Presentation LUT Shape decides whether an image is shown inverted. A value that is neither of the two an
    image may give (a damaged byte, two values, a presentation state's LIN OD) was taken for IDENTITY: an INVERSE
    image so damaged was scored as its negative."""
    ds = Dataset()
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME2", value
    with pytest.raises(InvalidImageError) as info:
        PixelParams.from_dataset(ds)
    assert info.value.tag == "(2050,0020) PresentationLUTShape"
    assert info.value.cause == f"unsupported value {said} (an image's is IDENTITY or INVERSE)"
    ds.PresentationLUTShape = "INVERSE "                                    # as before: padding passes
    assert PixelParams.from_dataset(ds).presentation_shape == "INVERSE"


def test_a_photometric_interpretation_of_two_values_is_quoted_as_written():
    ds = Dataset()
    ds.PhotometricInterpretation = ["MONOCHROME2", "RGB"]       # was quoted as Python's list in quotes
    with pytest.raises(InvalidImageError) as info:
        PixelParams.from_dataset(ds)
    assert info.value.cause == "unsupported value 'MONOCHROME2\\RGB'"


def test_signed_padding_value_is_read_from_a_written_file(write_dicom):
    values = _padded_plate(0).astype(np.int16)
    values[:, :40] = -2000
    path = write_dicom(values, signed=True, bits_stored=16, PixelPaddingValue=-2000)
    unit = load_unit_image(path)
    assert (unit[:, :40] == 0).all() and unit[:, 40:].min() == 0 and unit[:, 40:].max() == 1


def test_jpeg_and_a_dicom_made_from_it_give_the_same_model_input(write_dicom):
    """The model is trained on exported JPEGs and screens DICOM: the two must agree.

    The bundled full-resolution JPEG becomes a MONOCHROME1 12-bit CR with the
    window a viewer would use (its 1st-99th percentiles); both go to the model input.
    """
    import cv2

    jpeg = ROOT / "samples" / "study6_plain_jpeg" / "chest_export.jpg"
    display = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    assert display is not None and max(display.shape) >= 1000
    stored = (4095 - np.rint(display / 255.0 * 4095)).astype(np.uint16)
    lo, hi = np.percentile(4095 - stored.astype(float), [1, 99])
    path = write_dicom(stored, modality="CR", photometric="MONOCHROME1", bits_stored=12,
                       WindowCenter=round((lo + hi) / 2), WindowWidth=round(hi - lo))
    spec = PreprocessSpec()
    a = load_model_input(jpeg, spec)[..., 0]
    b = load_model_input(path, spec)[..., 0]
    assert a.shape == b.shape == (224, 224)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    # and bone stays bright in both: the mediastinum (centre) is brighter than the lungs
    for img in (a, b):
        assert img[60:160, 100:124].mean() > img[60:160, 40:80].mean()


def test_model_input_shape_and_range():
    unit = np.random.default_rng(0).random((300, 500), dtype=np.float32)
    out = to_model_input(unit, PreprocessSpec(input_size=(128, 96)))
    assert out.shape == (128, 96, 1) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_preprocess_spec_round_trips_and_refuses_unknown_contract():
    for spec in (PreprocessSpec(input_size=(256, 256)),
                 PreprocessSpec(equalize="clahe", clahe_clip=3.0, clahe_tiles=4)):
        assert PreprocessSpec.from_json(spec.to_json()) == spec
    # a card written before equalisation existed means none
    assert PreprocessSpec.from_json({"input_size": [224, 224], "contract": "unit-gray-v1"}).equalize == "none"
    for bad in ({"contract": "imagenet-rgb"}, {"equalize": "histogram"}, {"interpolation": "lanczos"},
                {"equalize": "clahe", "clahe_tiles": 0}, {"equalize": "clahe", "clahe_clip": "high"}):
        with pytest.raises(ModelError):
            PreprocessSpec.from_json({"input_size": [224, 224], **bad})


def test_clahe_input_shrinks_exposure_differences():
    """The same radiograph under another exposure/window curve: CLAHE inputs differ less than plain ones."""
    jpeg = ROOT / "samples" / "study6_plain_jpeg" / "chest_export.jpg"
    unit = load_unit_image(jpeg)
    plain, clahe = PreprocessSpec(), PreprocessSpec(equalize="clahe")
    assert np.array_equal(to_model_input(unit, plain), resize_to_input(unit, plain))
    for changed in (unit ** 1.6, 0.2 + 0.5 * unit, unit ** 0.6, np.clip(1.3 * unit - 0.15, 0, 1)):
        before = np.abs(to_model_input(changed, plain) - to_model_input(unit, plain)).mean()
        after = np.abs(to_model_input(changed, clahe) - to_model_input(unit, clahe)).mean()
        assert after < 0.75 * before   # measured: 0.55-0.70 with clip 2, 8x8 tiles
    out = to_model_input(unit, clahe)
    assert out.shape == (224, 224, 1) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    # still a chest: the mediastinum (centre) is brighter than the lungs
    assert out[60:160, 100:124].mean() > out[60:160, 40:80].mean()


@pytest.mark.parametrize("name, picture, shade", [
    ("black.png", np.zeros((300, 400), np.uint8), "black"),
    ("white.jpg", np.full((300, 400), 255, np.uint8), "white"),
    ("grey.png", np.full((300, 400, 3), 128, np.uint8), "one grey"),
    ("dark-noise.jpg", np.random.default_rng(3).integers(0, 4, (300, 400)).astype(np.uint8), "black"),
])
def test_a_blank_export_fails_instead_of_being_scored(tmp_path, name, picture, shade):
    """A black or white JPEG/PNG (a failed or empty export) was scored, and flagged: the default model gave a
    black 512 x 512 PNG 0.91 and a white JPEG 0.94. The DICOM path already failed a flat image."""
    import cv2

    cv2.imwrite(str(tmp_path / name), picture)
    with pytest.raises(InvalidImageError, match=f"image is blank: 99% of its pixels are {shade} ") as failure:
        load_unit_image(tmp_path / name)
    assert failure.value.step == "normalise"


def test_a_header_window_that_leaves_nothing_to_see_fails_naming_it(write_dicom, chest_pixels):
    """A real image whose header window lies above every pixel is black as a workstation would show it: it fails
    naming the window, rather than being scored black. The same image with a sensible window is read."""
    high = write_dicom(chest_pixels, name="high.dcm", WindowCenter="60000", WindowWidth="400")
    with pytest.raises(InvalidImageError, match=r"black \(0.0%-0.0% of the display range\) after the header's "
                                                r"window \(center 60000, width 400\)") as failure:
        load_unit_image(high)
    assert failure.value.tag == "(0028,1050) WindowCenter"
    low, high_value = np.percentile(chest_pixels, [5, 95])
    fine = write_dicom(chest_pixels, name="fine.dcm", WindowCenter=f"{(low + high_value) / 2:.0f}",
                       WindowWidth=f"{high_value - low:.0f}")
    assert float(np.ptp(load_unit_image(fine))) > 0.5


def test_padding_and_shutter_take_no_part_in_the_blank_check():
    """Only what a workstation shows counts: an image area of 0.25% of the frame inside a padded border is not
    blank (over the whole frame, 99% of the pixels are padding)."""
    stored = np.zeros((200, 200), np.uint16)
    stored[95:105, 95:105] = np.arange(1, 101).reshape(10, 10) * 40
    unit = normalise_pixels(stored, PixelParams(bits_stored=12, padding_value=0))
    assert unit[104, 104] == 1.0 and unit[0, 0] == 0.0


def test_a_blank_monochrome1_plate_is_named_by_the_shade_it_shows():
    """MONOCHROME1 is inverted for display: stored values all under a window show white, not black."""
    with pytest.raises(InvalidImageError, match="pixels are white"):
        normalise_pixels(np.full((64, 64), 10, np.uint16) + np.arange(64, dtype=np.uint16) % 2,
                         PixelParams(bits_stored=12, photometric="MONOCHROME1", window_center=3000,
                                     window_width=100))


@pytest.mark.parametrize("orientation, turns", [
    ("L\\F", 0), ("R\\F", 0), ("A\\F", 0), ("P\\FL", 0),         # upright (mirrored, lateral, oblique): as stored
    ("F\\R", 3), ("F\\L", 3), ("H\\L", 1), ("H\\R", 1),         # on its side
    ("R\\H", 2), ("L\\H", 2),                                     # upside down
    ("", 0), ("L", 0), ("L\\F\\H", 0), ("X\\F", 0), ("A\\P", 0), ("L\\R", 0),   # unreadable, or no body axis
])
def test_upright_turns(orientation, turns):
    assert upright_turns(orientation) == turns
    assert bool(turn_note(orientation)) == bool(turns)


@pytest.mark.parametrize("stored, orientation, mirrored", [
    (lambda a: a, "L\\F", False),
    (lambda a: a[:, ::-1], "R\\F", True),                 # mirrored: left as stored
    (lambda a: np.rot90(a, 1), "F\\R", False),            # turned counter-clockwise: the head at the left
    (lambda a: np.rot90(a, 2), "R\\H", False),            # upside down
    (lambda a: np.rot90(a, 3), "H\\L", False),            # turned clockwise: the head at the right
    (lambda a: a[::-1, :], "L\\H", True),                 # upside down and mirrored: turned, still mirrored
])
def test_an_image_stored_on_its_side_is_turned_upright_as_its_patient_orientation_says(
        write_dicom, stored, orientation, mirrored):
    """A CR cassette or DX detector read sideways is stored so, its Patient Orientation saying where the head
    is; the model, scoring it as stored, lost 5-11 points of sensitivity (on 200 validation images). The
    orientations here are worked out by hand from where the marked head-and-right corner lands."""
    upright_image = np.full((120, 90), 800, np.uint16)
    upright_image[40:100, 10:40] = 200                 # a lung, on the patient's right (the viewer's left)
    upright_image[:8, :8] = 4000                       # the corner at the head and the patient's right
    expected = load_unit_image(write_dicom(upright_image, name="upright.dcm", PatientOrientation=["L", "F"]))
    turned = np.ascontiguousarray(stored(upright_image))
    got = load_unit_image(write_dicom(turned, name="stored.dcm", PatientOrientation=orientation.split("\\")))
    assert got.shape == expected.shape
    assert np.array_equal(got, expected[:, ::-1] if mirrored else expected)
    as_stored = load_unit_image(write_dicom(turned, name="none.dcm"))      # no orientation: as stored
    assert np.array_equal(as_stored, load_unit_image(write_dicom(turned, name="none2.dcm", PatientOrientation="")))
    assert as_stored.shape == turned.shape


def _presentation(rotation: int, flip: bool):
    from cxrscreen.records import Presentation

    return Presentation(sop_uid="2.25.1", name="ps.dcm", created="20261101120000.000000", rotation=rotation,
                        flip=flip, images=frozenset({"2.25.2"}))


# (ImageRotation, ImageHorizontalFlip) -> the Patient Orientation of an image that the presentation state shows
# upright (L\F): worked out by hand, undoing the flip, then turning counter-clockwise as far as it turns clockwise
_STORED_FOR_UPRIGHT = {(0, False): "L\\F", (90, False): "F\\R", (180, False): "R\\H", (270, False): "H\\L",
                       (0, True): "R\\F", (90, True): "F\\L", (180, True): "L\\H", (270, True): "H\\R"}


@pytest.mark.parametrize("rotation, flip", list(_STORED_FOR_UPRIGHT))
def test_an_image_is_taken_as_its_presentation_state_shows_it(write_dicom, rotation, flip):
    """A presentation state turns its image clockwise, then mirrors it (PS3.3 C.10.6; DCMTK's dcmp2pgm does
    the same). An image stored on its side with no Patient Orientation, shown upright by its presentation
    state, was scored on its side; with a Patient Orientation that says how it is stored, it is turned once,
    not twice; where the two disagree, the Patient Orientation of the image as shown decides."""
    upright_image = np.full((120, 90), 800, np.uint16)
    upright_image[40:100, 10:40] = 200
    upright_image[:8, :8] = 4000
    expected = load_unit_image(write_dicom(upright_image, name="upright.dcm"))
    stored = np.ascontiguousarray(np.rot90(upright_image[:, ::-1] if flip else upright_image, rotation // 90))
    shown = _presentation(rotation, flip)
    orientation = _STORED_FOR_UPRIGHT[rotation, flip]
    assert shown_orientation(orientation, shown) == "L\\F"
    assert np.array_equal(load_unit_image(write_dicom(stored, name="none.dcm"), presentation=shown), expected)
    told = write_dicom(stored, name="told.dcm", PatientOrientation=orientation.split("\\"))
    assert np.array_equal(load_unit_image(told, presentation=shown), expected)       # turned once, not twice
    note = turn_note(orientation, shown)
    assert note.startswith("Shown as its presentation state ps.dcm of 2026-11-01 12:00 shows it: ") == bool(
        rotation or flip)
    assert "Patient Orientation" not in note
    if rotation:        # a Patient Orientation that says the stored image is upright: shown turned, so turned back
        upright_told = write_dicom(stored, name="disagree.dcm", PatientOrientation=["L", "F"])
        as_stored = load_unit_image(upright_told)
        assert np.array_equal(load_unit_image(upright_told, presentation=shown),
                              as_stored[:, ::-1] if flip else as_stored)
        assert "(Patient Orientation " in turn_note("L\\F", shown) and "as shown): turned upright" in \
            turn_note("L\\F", shown)


@pytest.mark.parametrize("orientation, rotation, flip, shown", [
    ("L\\F", 90, False, "H\\L"), ("L\\F", 270, False, "F\\R"), ("L\\F", 180, True, "L\\H"),
    ("LP\\FH", 0, True, "RA\\FH"), ("", 90, False, ""), ("L", 90, True, "L"), ("X\\F", 180, False, "X\\F"),
])
def test_the_patient_orientation_turns_with_the_image(orientation, rotation, flip, shown):
    assert shown_orientation(orientation, _presentation(rotation, flip)) == shown
    assert shown_orientation(orientation, None) == orientation
