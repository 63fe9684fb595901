"""cxrscreen's display of DICOM images against DCMTK's, an independent implementation of the PS3.3 grayscale
pipeline and of colour to grey (:func:`cxrscreen.testing.compare_with_dcmtk`). Runs where DCMTK is installed
(``apt-get install dcmtk``; ``.ci/run`` installs it when it can); ``benchmarks/reference_rendering.py`` checks
every image pydicom and pydicom-data ship the same way."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from cxrscreen.ingest import sniff
from cxrscreen.normalise import load_unit_image
from cxrscreen.records import FileKind
from cxrscreen.testing import compare_with_dcmtk, lut_item, save

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3        # of the display range; the two agree within 2e-5 on every lossless case here

pytestmark = pytest.mark.skipif(shutil.which("dcmj2pnm") is None or shutil.which("dcml2pnm") is None,
                                reason="DCMTK (dcmj2pnm, dcml2pnm) not installed")


def _sample_images() -> list[Path]:
    return [p for p in sorted((ROOT / "samples").rglob("*")) if p.is_file() and sniff(p) is FileKind.DICOM
            and "PixelData" in pydicom.dcmread(p, stop_before_pixels=False, force=True)]


@pytest.mark.parametrize("path", _sample_images(), ids=lambda p: str(p.relative_to(ROOT / "samples")))
def test_every_bundled_sample_is_shown_as_dcmtk_shows_it(path):
    check = compare_with_dcmtk(path)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax == "1.2.840.10008.1.2.4.50":       # lossy JPEG: two libjpeg builds round a grey level apart
        assert check.mean <= TOLERANCE and check.largest <= 0.02, check
    else:
        assert check.largest <= TOLERANCE, check


@pytest.fixture(scope="module")
def cr() -> Dataset:
    """pydicom-data's real CR chest PA (MONOCHROME1, 15 bits, one window), a quarter of its size."""
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("RG1_UNCR.dcm needs the pydicom-data test extra")
    ds = pydicom.dcmread(path)
    pixels = np.ascontiguousarray(ds.pixel_array[::4, ::4])
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def _voi_lut(ds):
    del ds.WindowCenter, ds.WindowWidth
    x = np.arange(4096)
    ds.VOILUTSequence = [lut_item(np.sqrt(x / 4095) * 65535, 0, 16)]


def _voi_lut_offset(ds):
    del ds.WindowCenter, ds.WindowWidth
    x = np.arange(8192)
    ds.VOILUTSequence = [lut_item((x / 8191) ** 2 * 4095, 2000, 12)]


def _voi_lut_8_bit(ds, packed: bool):
    del ds.WindowCenter, ds.WindowWidth
    ds.VOILUTSequence = [lut_item(np.linspace(0, 1, 5000) ** 0.7 * 255, 8000, 8, packed=packed)]


def _modality_lut(ds):
    item = lut_item(np.minimum(np.arange(32768) * 2, 65535), 0, 16)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = ds.WindowCenter * 2, ds.WindowWidth * 2


def _rescale(ds):
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.5, -1000, "US"
    ds.WindowCenter, ds.WindowWidth = ds.WindowCenter * 0.5 - 1000, ds.WindowWidth * 0.5


def _signed(ds):
    ds.PixelRepresentation = 1
    ds.PixelData = (ds.pixel_array.astype(np.int32) - 16384).astype(np.int16).tobytes()
    ds.WindowCenter = ds.WindowCenter - 16384


def _enhanced(ds):
    # an enhanced multi-frame image keeps its rescale and window in the functional groups (PS3.3 C.7.6.16)
    transform, voi, group = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -100, "US"
    voi.WindowCenter, voi.WindowWidth = ds.WindowCenter * 2 - 100, ds.WindowWidth * 2
    group.PixelValueTransformationSequence, group.FrameVOILUTSequence = [transform], [voi]
    ds.SharedFunctionalGroupsSequence = [group]
    del ds.WindowCenter, ds.WindowWidth


def _padding(ds):
    pixels = ds.pixel_array.copy()
    pixels[:20], pixels[:, :20] = 0, 0
    ds.PixelData = pixels.tobytes()
    ds.add_new(0x00280120, "US", 0)       # Pixel Padding Value


VARIANTS = {
    "as it is (MONOCHROME1, LINEAR window)": lambda ds: None,
    "SIGMOID": lambda ds: setattr(ds, "VOILUTFunction", "SIGMOID"),
    "LINEAR_EXACT": lambda ds: setattr(ds, "VOILUTFunction", "LINEAR_EXACT"),
    "narrow window": lambda ds: setattr(ds, "WindowWidth", 2),
    "window width 1": lambda ds: setattr(ds, "WindowWidth", 1),
    "two windows, the first used": lambda ds: (setattr(ds, "WindowCenter", [ds.WindowCenter, 100]),
                                               setattr(ds, "WindowWidth", [ds.WindowWidth, 50])),
    "VOI LUT": _voi_lut,
    "VOI LUT from a first mapped value, 12-bit entries": _voi_lut_offset,
    "VOI LUT of 8-bit entries, one per 16-bit word": lambda ds: _voi_lut_8_bit(ds, packed=False),
    "VOI LUT of 8-bit entries, two per word (the standard's letter)": lambda ds: _voi_lut_8_bit(ds, packed=True),
    "Modality LUT": _modality_lut,
    "rescale": _rescale,
    "signed pixels": _signed,
    "MONOCHROME2": lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME2"),
    "MONOCHROME2 with Presentation LUT Shape INVERSE": lambda ds: (
        setattr(ds, "PhotometricInterpretation", "MONOCHROME2"), setattr(ds, "PresentationLUTShape", "INVERSE")),
    "MONOCHROME1 with Presentation LUT Shape INVERSE (inverted once)":
        lambda ds: setattr(ds, "PresentationLUTShape", "INVERSE"),
    "enhanced: rescale and window in the functional groups": _enhanced,
    "pixel padding": _padding,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_real_cr_under_each_grayscale_transformation_is_shown_as_dcmtk_shows_it(cr, variant, tmp_path):
    ds = copy.deepcopy(cr)
    VARIANTS[variant](ds)
    check = compare_with_dcmtk(save(ds, tmp_path / "variant.dcm"))
    # DCMTK widens an 8-bit LUT's output by a shift (255 -> 65280 of 65535), one grey level of 256 below
    assert check.largest <= (1 / 255 + TOLERANCE if "8-bit entries" in variant else TOLERANCE), check


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm", "OBXXXX1A.dcm",
                                  "OBXXXX1A_expb.dcm"])
def test_colour_images_turn_grey_as_dcmtk_turns_them(name):
    # RGB, YBR and palette colour (little and big endian: pydicom misreads the latter's palette, cxrscreen
    # reads it around that); DCMTK's grey of 8-bit colour is whole grey levels, cxrscreen's is not rounded
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data test extra")
    check = compare_with_dcmtk(path)
    assert check.largest <= 2 / 255 + TOLERANCE, check


def test_monochrome1_with_presentation_lut_shape_identity_is_shown_as_monochrome1_unlike_dcmtk(cr, tmp_path):
    # The one place the two part, deliberately: for DX the standard says IDENTITY "shall be used if Photometric
    # Interpretation is MONOCHROME2", so a MONOCHROME1 image that says IDENTITY contradicts itself. DCMTK lets
    # the shape win and shows the plate as a negative (bone dark); cxrscreen lets the Photometric
    # Interpretation, which says how the pixel data are stored, win: bone bright, as the model learned.
    plain = save(copy.deepcopy(cr), tmp_path / "plain.dcm")
    ds = copy.deepcopy(cr)
    ds.PresentationLUTShape = "IDENTITY"
    identity = save(ds, tmp_path / "identity.dcm")
    np.testing.assert_array_equal(load_unit_image(identity), load_unit_image(plain))
    assert compare_with_dcmtk(identity).mean > 0.3          # DCMTK: the negative


@pytest.mark.skipif(shutil.which("dcmpsmk") is None or shutil.which("dcmp2pgm") is None,
                    reason="DCMTK's dcmpsmk and dcmp2pgm not installed")
@pytest.mark.parametrize("rotation, flip", [(0, "Y"), (90, "N"), (180, "N"), (270, "N"), (90, "Y"), (270, "Y")])
def test_a_presentation_state_turns_and_mirrors_its_image_as_dcmtk_shows_it(tmp_path, rotation, flip):
    """A presentation state made by DCMTK (``dcmpsmk``), given a rotation and a flip, read by cxrscreen and
    applied to its image, shows it as DCMTK's ``dcmp2pgm`` does: of the image's eight turns and mirrors,
    DCMTK's picture matches cxrscreen's best, and by far. The image is noise, so that no other agrees."""
    import subprocess

    import cv2

    from cxrscreen.ingest import read_presentation
    from cxrscreen.testing import make_dicom

    rng = np.random.default_rng(rotation + (flip == "Y"))
    pixels = cv2.GaussianBlur(rng.integers(0, 4096, (96, 72)).astype(np.float32), (0, 0), 2)
    pixels = np.round((pixels - pixels.min()) / np.ptp(pixels) * 4095).astype(np.uint16)
    image = save(make_dicom(pixels, seed="ps-image", bits_stored=12, WindowCenter=2048, WindowWidth=4096),
                 tmp_path / "image.dcm")
    subprocess.run(["dcmpsmk", str(image), str(tmp_path / "made.dcm")], check=True, capture_output=True)
    ds = pydicom.dcmread(tmp_path / "made.dcm")
    ds.ImageRotation, ds.ImageHorizontalFlip = rotation, flip
    ds.save_as(tmp_path / "ps.dcm")
    subprocess.run(["dcmp2pgm", "-p", str(tmp_path / "ps.dcm"), str(image), str(tmp_path / "shown.pgm")],
                   check=True, capture_output=True)
    dcmtk = cv2.imread(str(tmp_path / "shown.pgm"), cv2.IMREAD_UNCHANGED).astype(np.float64)

    presentation, wrong = read_presentation(tmp_path / "ps.dcm", pydicom.dcmread(tmp_path / "ps.dcm"))
    assert not wrong and presentation.images == {pydicom.dcmread(image).SOPInstanceUID}
    ours = load_unit_image(image, presentation=presentation)
    as_stored = load_unit_image(image)
    candidates = {(k, mirrored): np.rot90(as_stored[:, ::-1] if mirrored else as_stored, k)
                  for k in range(4) for mirrored in (False, True)}

    def agreement(picture):
        return -1.0 if picture.shape != dcmtk.shape else float(np.corrcoef(picture.ravel(), dcmtk.ravel())[0, 1])

    best = max(candidates, key=lambda key: agreement(candidates[key]))
    assert np.array_equal(candidates[best], ours)
    assert agreement(ours) > 0.99 and sorted(agreement(c) for c in candidates.values())[-2] < 0.5
