"""Discovery, decoding of every transfer syntax, selection rules and bad inputs."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from conftest import colour_versions
from cxrscreen import ingest
from cxrscreen.errors import InputError, InvalidImageError, UnsupportedTransferSyntax
from cxrscreen.ingest import EVERY_IMAGE, Selection, discover, group_studies, read_record, scan
from cxrscreen.normalise import colour_frame, load_unit_image
from cxrscreen.records import FileKind, FileOutcome, Radiograph, Status
from cxrscreen.testing import SC_SOP_CLASS, damage, encapsulate_uncompressed, make_dicom, save, uid_from

ROOT = Path(__file__).resolve().parents[1]


def reference_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data test extra")
    return Path(path)


def decode(path) -> np.ndarray:
    return ingest.decode_first_frame(ingest.read_dicom(path))


# ---------------------------------------------------------------- transfer syntaxes

ROUND_TRIP = [
    ("1.2.840.10008.1.2", "implicit VR little endian"),
    ("1.2.840.10008.1.2.1", "explicit VR little endian"),
    ("1.2.840.10008.1.2.1.99", "deflated explicit VR little endian"),
    ("1.2.840.10008.1.2.5", "RLE lossless"),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 lossless"),
]


@pytest.mark.parametrize("ts, label", ROUND_TRIP, ids=[r[1] for r in ROUND_TRIP])
def test_lossless_syntaxes_round_trip(tmp_path, chest_pixels, ts, label):
    path = save(make_dicom(chest_pixels, bits_stored=12, transfer_syntax=ts, seed=label), tmp_path / "x.dcm")
    ds = ingest.read_dicom(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(decode(path), chest_pixels)


def test_jpeg_baseline_encodes_and_decodes_close(tmp_path, chest_pixels):
    eight = (chest_pixels >> 4).astype(np.uint8)
    path = save(make_dicom(eight, transfer_syntax="1.2.840.10008.1.2.4.50"), tmp_path / "b.dcm")
    assert np.abs(decode(path).astype(int) - eight).mean() < 2.0


def test_jpeg_2000_lossy_encodes_and_decodes_close(tmp_path, chest_pixels):
    ds = make_dicom(chest_pixels, bits_stored=12)
    ds.compress("1.2.840.10008.1.2.4.91", j2k_cr=[20], encoding_plugin="pylibjpeg")
    path = save(ds, tmp_path / "j2k.dcm")
    error = np.abs(decode(path).astype(float) - chest_pixels)
    assert 0 < error.mean() < 100  # of 4095: lossy, yet close


def test_high_throughput_jpeg_2000_decodes_to_the_pixels_it_was_made_from():
    # HTJ2K (PS3.5 A.4.11, 2023: what cloud PACS and DICOMweb increasingly send) through pylibjpeg-openjpeg;
    # pydicom cannot encode it, so tests/data/make_htj2k.py made the file with OpenJPH, from the PA sample
    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from make_htj2k import quarter

    import pydicom

    path = ROOT / "tests" / "data" / "htj2k_lossless.dcm"
    record = read_record(path)
    assert isinstance(record, Radiograph) and record.transfer_syntax == "1.2.840.10008.1.2.4.201"
    source = quarter(pydicom.dcmread(ROOT / "samples" / "study3_pa_and_lateral" / "IM0001.dcm"))
    np.testing.assert_array_equal(decode(path), source)
    assert load_unit_image(path).shape == source.shape


def test_encapsulated_uncompressed_explicit_vr_little_endian_is_read(tmp_path, chest_pixels):
    # PS3.5 A.4.11 (2023): native frames, one per fragment; pydicom 3.0 has no decoder for it, cxrscreen reads
    # the first frame itself: 12 bits in 16, signed, several frames, and colour in either planar configuration
    ds = make_dicom(chest_pixels, bits_stored=12, seed="eu")
    ds.NumberOfFrames = 2
    path = save(encapsulate_uncompressed(ds, [chest_pixels, chest_pixels[::-1]]), tmp_path / "eu.dcm")
    record = read_record(path)
    assert isinstance(record, Radiograph) and record.frames == 2
    np.testing.assert_array_equal(decode(path), chest_pixels)
    assert load_unit_image(path).shape == chest_pixels.shape

    signed = (chest_pixels.astype(np.int32) - 2048).astype(np.int16)
    path = save(encapsulate_uncompressed(make_dicom(signed, bits_stored=12, signed=True, seed="eus"), [signed]),
                tmp_path / "signed.dcm")
    np.testing.assert_array_equal(decode(path), signed)

    rgb = np.stack([chest_pixels >> 4, chest_pixels >> 5, chest_pixels >> 6], axis=-1).astype(np.uint8)
    for planar in (0, 1):
        ds = make_dicom(rgb, photometric="RGB", modality="OT", seed=f"rgb{planar}")
        ds.PlanarConfiguration = planar
        plane = rgb.transpose(2, 0, 1) if planar else rgb
        path = save(encapsulate_uncompressed(ds, [plane]), tmp_path / f"rgb{planar}.dcm")
        np.testing.assert_array_equal(decode(path), rgb)

    # fragments too short for Rows x Columns: a failure naming the syntax, the sizes and the tag
    ds = make_dicom(chest_pixels, bits_stored=12, seed="short")
    path = save(encapsulate_uncompressed(ds, [chest_pixels[: len(chest_pixels) // 2]]), tmp_path / "short.dcm")
    with pytest.raises(InputError) as info:
        decode(path)
    assert "Encapsulated Uncompressed" in info.value.cause and info.value.tag == "(7FE0,0010) PixelData"


# Reference files shipped with pydicom / pydicom-data, and the uncompressed twin they must match.
REFERENCE = [
    ("emri_small_big_endian.dcm", "emri_small.dcm", 0),            # explicit VR big endian
    ("image_dfl.dcm", None, 0),                                    # deflated
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 12),                   # JPEG baseline, YBR -> RGB
    ("JPGExtended.dcm", None, 0),                                  # JPEG extended (process 2/4), 12-bit
    ("JPEG-LL.dcm", None, 0),                                      # JPEG lossless process 14 SV1
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", None, 0),                   # JPEG lossless SV1, 8-bit
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),          # JPEG-LS lossless
    ("JPEGLSNearLossless_16.dcm", None, 0),                        # JPEG-LS near-lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),              # JPEG 2000 lossless
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm", 2000),                    # JPEG 2000 lossy (absolute 16-bit)
    ("MR_small_RLE.dcm", "MR_small.dcm", 0),                       # RLE
    ("emri_small_RLE.dcm", "emri_small.dcm", 0),
]


@pytest.mark.parametrize("name, twin, tolerance", REFERENCE, ids=[r[0] for r in REFERENCE])
def test_reference_files_decode(name, twin, tolerance):
    arr = decode(reference_file(name))
    assert arr.size > 0
    if twin:
        expected = decode(reference_file(twin))
        assert arr.shape == expected.shape
        assert np.abs(arr.astype(np.int64) - expected.astype(np.int64)).max() <= tolerance


def test_pixel_data_no_installed_decoder_accepts_is_a_failure_naming_the_syntax_and_each_decoder(caplog):
    # pydicom's JPEG-lossy.dcm is a non-conformant 12-bit extended JPEG no decoder accepts. The decoders for the
    # syntax are installed, so it is not called unsupported (which said: install a decoder).
    with caplog.at_level(logging.DEBUG), pytest.raises(InputError) as info:
        decode(reference_file("JPEG-lossy.dcm"))
    assert not [r for r in caplog.records if r.exc_info]    # pydicom's traceback of each decoder: not logged
    assert not isinstance(info.value, UnsupportedTransferSyntax)
    assert "JPEG Extended" in str(info.value) and "1.2.840.10008.1.2.4.51" in str(info.value)
    assert "every installed decoder failed: pylibjpeg: " in info.value.cause and "; pillow: " in info.value.cause
    assert "\n" not in info.value.cause and info.value.tag == "(7FE0,0010) PixelData"


def test_a_syntax_whose_decoders_are_not_installed_is_unsupported(monkeypatch):
    """pylibjpeg-rle (cxrscreen's plugin and pydicom's) not installed, and pydicom's own decoder left out."""
    from pydicom.pixels.decoders import RLELosslessDecoder

    monkeypatch.setitem(sys.modules, "rle", None)           # `import rle` fails, as where it is not installed
    monkeypatch.setattr(RLELosslessDecoder, "_available", {})
    monkeypatch.setattr(RLELosslessDecoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", "pylibjpeg-rle")})
    with pytest.raises(UnsupportedTransferSyntax) as info:
        decode(reference_file("MR_small_RLE.dcm"))
    assert info.value.cause == ("no installed decoder handles RLE Lossless (1.2.840.10008.1.2.5): Unable to decompress "
                                "'RLE Lossless' pixel data because all plugins are missing dependencies: pylibjpeg - "
                                "requires pylibjpeg and pylibjpeg-rle; cxrscreen - requires pylibjpeg-rle")


def test_rle_without_pylibjpeg_rle_is_decoded_by_pydicoms_decoder_and_checked(monkeypatch, tmp_path):
    """Where pylibjpeg-rle is not installed, cxrscreen's plugin is not either, pydicom's own decoder decodes RLE,
    and a segment more than a byte past the frame, which it cuts to size with only a warning, still fails."""
    from pydicom.pixels.decoders import RLELosslessDecoder

    source = ROOT / "samples" / "study2_dx_rescale_rle" / "IM0001.dcm"
    expected = decode(source)
    monkeypatch.setitem(sys.modules, "rle", None)
    monkeypatch.setattr(RLELosslessDecoder, "_available", {"pydicom": RLELosslessDecoder._available["pydicom"]})
    monkeypatch.setattr(RLELosslessDecoder, "_unavailable", {})
    assert np.array_equal(decode(source), expected)
    assert RLELosslessDecoder.available_plugins == ("pydicom",)
    failed = _fails_at_decoding(_with_a_longer_first_run(source, tmp_path / "longer.dcm"))
    assert failed.cause.startswith("pixel data cannot be decoded (RLE Lossless (1.2.840.10008.1.2.5)): an RLE "
                                   "segment decodes to ")
    assert "(pydicom would cut it to size)" in failed.cause


def _frame_cut(path: Path, keep: float, out: Path) -> Path:
    """``path``'s copy whose one frame keeps the first ``keep`` of its codestream: the file is whole, its
    frame is not (as a gateway that cut a frame leaves it)."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([stream[:int(len(stream) * keep)]])
    ds.save_as(out)
    return out


def _with_a_longer_first_run(source: Path, out: Path) -> Path:
    """``source`` (RLE) written to ``out`` with the first replicate run of its first segment made 128 bytes, more
    than it was: the segment then decodes past the frame, its later runs a place off (a run's length changed)."""
    ds, frame = _first_frame(source)
    at = 64
    while frame[at] <= 128:                                 # a literal run (or a no-op): to the first replicate run
        at += frame[at] + 2 if frame[at] < 128 else 1
    assert frame[at] > 129
    frame[at] = 129                                         # 257 - 129 = 128 bytes
    return _with_frame(ds, frame, out)


def _first_frame(path: Path):
    """``path``'s data set and its first frame's codestream, to change."""
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    return ds, bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _with_frame(ds, frame: bytes, path: Path) -> Path:
    """``ds`` written to ``path`` with ``frame`` (padded to an even length) as its one frame."""
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([bytes(frame) + b"\0" * (len(frame) % 2)])
    ds.save_as(path)
    return path


def _fails_at_decoding(path: Path) -> InputError:
    """The error reading ``path``'s pixels fails with, at decoding."""
    with pytest.raises(InputError) as info:
        load_unit_image(path)
    assert info.value.step == "decode"
    return info.value


def _jpeg_ls_file(pixels, tmp_path) -> Path:
    return save(make_dicom(pixels, seed="ls", transfer_syntax="1.2.840.10008.1.2.4.80"), tmp_path / "ls.dcm")


def _jpeg_baseline_file(pixels, tmp_path) -> Path:
    return save(make_dicom((pixels >> 4).astype(np.uint8), seed="jb", transfer_syntax="1.2.840.10008.1.2.4.50"),
                tmp_path / "jb.dcm")


@pytest.mark.parametrize("make", ["baseline", "lossless", "jpeg-ls"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_a_jpeg_frame_cut_short_in_a_whole_file_fails_at_decoding(tmp_path, chest_pixels, make, keep):
    # libjpeg and CharLS decoded these without a word: the part cut off came out grey (or garbage) and was
    # screened. A file cut short fails when it is read; this file is whole and only its frame is cut.
    source = {"baseline": lambda: _jpeg_baseline_file(chest_pixels, tmp_path),
              "lossless": lambda: reference_file("JPGLosslessP14SV1_1s_1f_8b.dcm"),
              "jpeg-ls": lambda: _jpeg_ls_file(chest_pixels, tmp_path)}[make]()
    assert decode(source).size                                  # the frame as it was decodes
    path = _frame_cut(source, keep, tmp_path / "cut.dcm")
    from pydicom.pixels import pixel_array
    assert pixel_array(str(path)).shape[:2] == decode(source).shape[:2]     # what pydicom alone makes of it
    with pytest.raises(InputError) as info:
        load_unit_image(path)
    assert info.value.step == "decode" and info.value.tag == "(7FE0,0010) PixelData"
    assert "frame 1 ends without the codestream's end-of-image marker (FFD9): it was cut short" in info.value.cause


def _scan_cut(stream: bytes, keep: float) -> bytes:
    """A JPEG codestream whose scan data stops after ``keep`` of it and ends with its end-of-image marker, as a
    decoder meets data damaged inside: it stops early, the rest of the picture grey, without a word."""
    return stream[:int(len(stream) * keep)] + b"\xff\xd9"


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_a_jpeg_baseline_frame_damaged_inside_fails_at_decoding(tmp_path, chest_pixels, keep):
    """The end-of-image marker is there, so the cut check passes it; libjpeg decoded on past the damage
    without a word (the picture grey from there) and it was screened."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(_jpeg_baseline_file(chest_pixels, tmp_path))
    ds.PixelData = encapsulate([_scan_cut(next(generate_frames(ds.PixelData, number_of_frames=1)), keep)])
    ds.save_as(tmp_path / "damaged.dcm")
    assert pixel_array(str(tmp_path / "damaged.dcm")).shape == chest_pixels.shape     # pydicom alone: decoded
    with pytest.raises(InputError) as info:
        load_unit_image(tmp_path / "damaged.dcm")
    assert info.value.step == "decode" and info.value.tag == "(7FE0,0010) PixelData"
    assert ("frame 1's JPEG data is corrupt (libjpeg: Corrupt JPEG data: premature end of data segment)"
            in info.value.cause)


@pytest.mark.parametrize("keep", [0.5, 0.97, None])
def test_a_jpeg_file_damaged_inside_or_cut_short_fails_at_decoding(tmp_path, chest_pixels, keep):
    """A plain JPEG whose data stops early: OpenCV decoded it with the rest grey, writing "Corrupt JPEG data"
    to stderr and naming no file, and it was screened. ``None``: cut short without its end marker."""
    import cv2

    whole = cv2.imencode(".jpg", (chest_pixels >> 4).astype(np.uint8))[1].tobytes()
    damaged = _scan_cut(whole, keep) if keep else whole[:len(whole) * 2 // 3]
    (tmp_path / "damaged.jpg").write_bytes(damaged)
    assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_UNCHANGED) is not None or keep is None
    with pytest.raises(InputError) as info:
        load_unit_image(tmp_path / "damaged.jpg")
    said = "Corrupt JPEG data: premature end of data segment" if keep else "Premature end of JPEG file"
    assert info.value.step == "decode" and f"the JPEG data is corrupt (libjpeg: {said})" in info.value.cause
    assert info.value.path == tmp_path / "damaged.jpg"


@pytest.mark.parametrize("damage", ["changed", "cut", "no_iend", "header", "text_before", "text_after"])
def test_a_png_changed_inside_or_cut_short_fails_naming_why(tmp_path, chest_pixels, capfd, damage):
    """libpng refused these too, but wrote why to stderr naming no file ("libpng error: IDAT: CRC error"), and
    the failure said only "cannot be decoded (corrupt or truncated)", or, for a chunk before the image data,
    "cannot identify image file"; a text chunk after it with a bad CRC was screened, libpng warning on stderr.
    The chunk and what is wrong are said now, with the file, and nothing unnamed reaches stderr."""
    import zlib

    import cv2

    whole = cv2.imencode(".png", chest_pixels)[1].tobytes()                 # 16-bit grey
    idat = whole.find(b"IDAT") - 4
    idat_end = idat + 12 + int.from_bytes(whole[idat:idat + 4], "big")
    text = (12).to_bytes(4, "big") + b"tEXtNote\0changed" + (zlib.crc32(b"tEXtNote\0chanGed")).to_bytes(4, "big")
    if damage in ("header", "text_before", "text_after"):
        broken = {"header": whole[:20] + b"\x01" + whole[21:],                # IHDR's height changed
                  "text_before": whole[:idat] + text + whole[idat:],
                  "text_after": whole[:idat_end] + text + whole[idat_end:]}[damage]
        at, kind = {"header": (8, "IHDR"), "text_before": (idat, "tEXt"), "text_after": (idat_end, "tEXt")}[damage]
        said = f"its '{kind}' chunk at byte {at:,} fails its CRC check"
    elif damage == "changed":
        broken = bytearray(whole)
        broken[idat + 100] ^= 0x5A
        said = f"its 'IDAT' chunk at byte {idat:,} fails its CRC check"
    elif damage == "cut":
        broken = whole[:idat + 100]
        said = f"its 'IDAT' chunk at byte {idat:,} runs past the end of the file at byte {idat + 100:,} (truncated)"
    else:
        broken = whole[:-12]                                                # whole but for its IEND chunk
        said = f"the file ends at byte {len(whole) - 12:,} before its IEND chunk (truncated)"
    (tmp_path / "damaged.png").write_bytes(bytes(broken))
    capfd.readouterr()
    with pytest.raises(InputError) as info:
        load_unit_image(tmp_path / "damaged.png")
    assert info.value.step in ("read", "decode") and info.value.path == tmp_path / "damaged.png"
    assert info.value.cause.startswith("the PNG data is damaged: " + said), info.value.cause
    assert "libpng" not in capfd.readouterr().err


def test_pngs_whole_decode_as_before_whatever_their_ancillary_chunks(tmp_path):
    """Grey, 16-bit, colour with alpha, palette, the image data in two IDAT chunks, a text chunk, and bytes
    after IEND: all pass the chunk check and decode to OpenCV's pixels, as before it."""
    import zlib

    import cv2
    from PIL import Image, PngImagePlugin

    from cxrscreen.ingest import png_damage, read_display_image

    rng = np.random.default_rng(5)
    grey = cv2.GaussianBlur(rng.integers(0, 256, (211, 190), dtype=np.uint8), (0, 0), 2)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "exported from a viewer")
    made = {"grey.png": Image.fromarray(grey), "rgba.png": Image.fromarray(np.dstack([grey, grey, 255 - grey, grey])),
            "palette.png": Image.fromarray(grey).convert("P")}
    for name, picture in made.items():
        picture.save(tmp_path / name, pnginfo=info)
    cv2.imwrite(str(tmp_path / "deep.png"), grey.astype(np.uint16) * 257)
    whole = (tmp_path / "grey.png").read_bytes()
    idat = whole.find(b"IDAT") - 4
    length = int.from_bytes(whole[idat:idat + 4], "big")
    data = whole[idat + 8:idat + 8 + length]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    split = whole[:idat] + chunk(b"IDAT", data[:50]) + chunk(b"IDAT", data[50:]) + whole[idat + 12 + length:]
    (tmp_path / "split.png").write_bytes(split)
    (tmp_path / "trailer.png").write_bytes(whole + b"\0" * 7)
    for name in (*made, "deep.png", "split.png", "trailer.png"):
        path = tmp_path / name
        assert png_damage(path.read_bytes()) is None, name
        expected = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        got = read_display_image(path)
        assert got.shape == expected.shape and np.array_equal(got, expected), name
    assert np.array_equal(read_display_image(tmp_path / "split.png"), grey)


def test_padding_before_the_end_of_image_marker_is_not_taken_for_damage(tmp_path, chest_pixels):
    """Some encoders pad a codestream with zeros before its end-of-image marker: beyond the few bytes its bit
    buffer reads ahead, libjpeg-turbo warns of `N extraneous bytes before marker 0xd9`, and the strict decoding
    refused the whole picture. Zero padding passes now, in a JPEG file and a DICOM frame (0xFF fill libjpeg
    skips without a word); the same warning over other bytes, coded data left unread, still refuses."""
    import cv2
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    from cxrscreen.ingest import read_display_image

    grey = (chest_pixels >> 4).astype(np.uint8)
    whole = cv2.imencode(".jpg", grey)[1].tobytes()
    ds = pydicom.dcmread(_jpeg_baseline_file(chest_pixels, tmp_path))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    expected = decode(tmp_path / "jb.dcm")
    for pad in (b"\0", b"\xff", b"\0" * 7, b"\0" * 20):                 # 7 and 20: libjpeg warns
        (tmp_path / "padded.jpg").write_bytes(whole[:-2] + pad + b"\xff\xd9")
        assert np.array_equal(read_display_image(tmp_path / "padded.jpg"), cv2.imdecode(np.frombuffer(
            whole, np.uint8), cv2.IMREAD_UNCHANGED)), pad
        ds.PixelData = encapsulate([frame.rstrip(b"\0")[:-2] + pad + b"\xff\xd9"])
        ds.save_as(tmp_path / "padded.dcm")
        assert np.array_equal(decode(tmp_path / "padded.dcm"), expected), pad
        assert load_unit_image(tmp_path / "padded.dcm").size
    (tmp_path / "unread.jpg").write_bytes(whole[:-2] + b"\x5a" * 7 + b"\xff\xd9")
    with pytest.raises(InputError, match="extraneous bytes before marker 0xd9"):
        read_display_image(tmp_path / "unread.jpg")


def test_a_lossless_frame_labelled_jpeg_baseline_is_checked_without_crashing_the_process(tmp_path):
    """A DICOM whose transfer syntax says JPEG baseline but whose frame is lossless JPEG (process 14): the strict
    check decoded it at an eighth of its size, and simplejpeg, sizing its buffer scaled while libjpeg decodes a
    lossless frame whole, wrote past it: a segmentation fault that killed the whole batch. Run in a child process
    so that a regression fails this test rather than the suite. A lossless frame is checked at full size now."""
    import subprocess
    import sys

    import pydicom

    ds = pydicom.dcmread(reference_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    expected = decode(reference_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.save_as(tmp_path / "labelled_baseline.dcm")
    child = subprocess.run([sys.executable, "-c", "import sys, numpy as np; from cxrscreen.ingest import "
                            "read_dicom, decode_first_frame; np.save(sys.argv[1], decode_first_frame(read_dicom("
                            "sys.argv[2])))", str(tmp_path / "pixels.npy"), str(tmp_path / "labelled_baseline.dcm")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert np.array_equal(np.load(tmp_path / "pixels.npy"), expected)


_RELABELLED = """
import sys, warnings
from pathlib import Path

import pydicom

from cxrscreen.errors import CxrError
from cxrscreen.normalise import load_unit_image

warnings.simplefilter("ignore")
out = Path(sys.argv[1])
for source in sys.argv[3:]:
    for syntax in sys.argv[2].split(","):
        print(Path(source).name, syntax, flush=True)      # the last line names the case that crashed, if one did
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(out, enforce_file_format=False)
        try:
            load_unit_image(out)
        except CxrError:
            pass
print("END", flush=True)
"""


def test_no_codestream_under_any_compressed_transfer_syntax_crashes_the_process(tmp_path):
    """A transfer syntax that misnames its codestream (a gateway relabelled it; lossless JPEG called baseline
    crashed the process, above): every kind of codestream the samples and pydicom's files hold, under every
    compressed transfer syntax cxrscreen reads, is decoded or refused, in one child process that must live."""
    import subprocess
    import sys

    syntaxes = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.98",
                "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203"]
    samples = ROOT / "samples"
    sources = [samples / "study5_cr_jpeg_baseline" / "IM0001.dcm", samples / "study1_cr_mono1_j2k" / "IM0001.dcm",
               samples / "study2_dx_rescale_rle" / "IM0001.dcm", reference_file("JPGLosslessP14SV1_1s_1f_8b.dcm"),
               reference_file("JPEG-LL.dcm"), reference_file("MR_small_jpeg_ls_lossless.dcm"),
               reference_file("JPGExtended.dcm")]
    child = subprocess.run([sys.executable, "-c", _RELABELLED, str(tmp_path / "relabelled.dcm"), ",".join(syntaxes),
                            *map(str, sources)], capture_output=True, text=True, timeout=600)
    said = child.stdout.strip().splitlines()
    assert child.returncode == 0 and said[-1] == "END", (child.returncode, said[-1:], child.stderr[-2000:])
    assert len(said) == len(syntaxes) * len(sources) + 1


@pytest.mark.parametrize("kind", ["baseline", "jpeg-ls"])
@pytest.mark.parametrize("lines", [60000, 0])
def test_a_jpeg_frame_whose_size_is_not_the_headers_fails_before_it_is_decoded(tmp_path, chest_pixels, kind, lines):
    """Rows x Columns and the codestream's own start-of-frame size disagree: decoders allocate what the
    codestream says, and the shape check came only after the decoding. 0 lines (which a DNL marker would give)
    made pylibjpeg and CharLS allocate until the OOM killer ended the whole batch (found by changing bytes of
    the codestreams' headers). The frame now fails before anything decodes it, naming both sizes."""
    source = _jpeg_baseline_file(chest_pixels, tmp_path) if kind == "baseline" else _jpeg_ls_file(chest_pixels,
                                                                                                  tmp_path)
    ds, frame = _first_frame(source)
    sof = frame.find(b"\xff\xc0" if kind == "baseline" else b"\xff\xf7")
    frame[sof + 5:sof + 9] = lines.to_bytes(2, "big") + (61000).to_bytes(2, "big")
    failed = _fails_at_decoding(_with_frame(ds, frame, tmp_path / "resized.dcm"))
    assert isinstance(failed, InvalidImageError) and failed.tag == "(0028,0010) Rows"
    assert (f"frame 1's JPEG codestream is {lines} x 61000 (its start-of-frame header), not Rows x Columns "
            f"{chest_pixels.shape[0]} x {chest_pixels.shape[1]}") in failed.cause


@pytest.mark.parametrize("kind", ["jpeg-2000", "htj2k", "jp2"])
def test_a_jpeg_2000_frame_whose_size_is_not_the_headers_fails_before_it_is_decoded(tmp_path, kind):
    """As for JPEG: openjpeg allocated a JPEG 2000 codestream's own size (its SIZ segment) whole, and only the
    shape check after it refused the frame, with numpy's "could not broadcast input array" (30000 x 30000: 5 GB
    and 13 s to fail; 65,535 a side is 17 GB). The frame now fails before it is decoded, naming both sizes; in a
    JP2 file (DICOM allows only the bare codestream, some encoders write the file) its codestream is found."""
    import io

    from PIL import Image

    source = ROOT / ("tests/data/htj2k_lossless.dcm" if kind == "htj2k" else "samples/study1_cr_mono1_j2k/IM0001.dcm")
    ds, frame = _first_frame(source)
    if kind == "jp2":
        written = io.BytesIO()
        Image.fromarray(decode(source)).save(written, "JPEG2000", no_jp2=False)
        frame = bytearray(written.getvalue())
        assert frame.startswith(ingest._JP2_SIGNATURE)
        assert np.array_equal(decode(_with_frame(ds, frame, tmp_path / "jp2.dcm")), decode(source))  # whole: as before
    assert ingest._j2k_grid(frame) == (ds.Rows, ds.Columns, 0, 0)
    siz = frame.find(b"\xff\x4f\xff\x51")
    whole = bytes(frame)
    frame[siz + 8:siz + 16] = (61000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    failed = _fails_at_decoding(_with_frame(ds, frame, tmp_path / "resized.dcm"))
    assert isinstance(failed, InvalidImageError) and failed.tag == "(0028,0010) Rows"
    assert (f"frame 1's JPEG 2000 codestream is 30000 x 61000 (its SIZ segment), not Rows x Columns "
            f"{ds.Rows} x {ds.Columns}") in failed.cause
    if kind == "jpeg-2000":
        # one byte of the image offset changed (found by benchmarks/fuzz_codestreams.py): openjpeg decoded a
        # picture of the right size, 99% of its pixels wrong, and it was screened
        frame = bytearray(whole)
        frame[siz + 19] = 208     # XOsiz, 4 bytes at 16
        failed = _fails_at_decoding(_with_frame(ds, frame, tmp_path / "offset.dcm"))
        assert (f"frame 1's JPEG 2000 codestream is {ds.Rows} x {ds.Columns - 208} (its SIZ segment: {ds.Rows} x "
                f"{ds.Columns} less an image offset of 0 x 208), not Rows x Columns") in failed.cause


def test_jpeg_files_decode_to_opencvs_pixels_and_a_harmless_warning_passes(tmp_path):
    """Plain JPEGs are decoded by libjpeg-turbo through simplejpeg (strictly) where they were decoded by OpenCV:
    the same pixels, for grey and colour, every chroma subsampling, progressive, with restart markers, and at
    an EXIF orientation. A warning that leaves the picture whole (an unknown JFIF revision) is not a refusal."""
    import cv2
    from PIL import Image

    from cxrscreen.ingest import read_display_image

    rng = np.random.default_rng(3)
    grey = cv2.GaussianBlur(rng.integers(0, 256, (301, 257), dtype=np.uint8), (0, 0), 3)
    colour = np.dstack([grey, grey[::-1], 255 - grey])
    files = {}
    for subsampling in (0, 1, 2):
        Image.fromarray(colour).save(tmp_path / f"s{subsampling}.jpg", quality=90, subsampling=subsampling)
        files[f"s{subsampling}"] = tmp_path / f"s{subsampling}.jpg"
    Image.fromarray(grey).save(tmp_path / "grey_progressive.jpg", progressive=True)
    Image.fromarray(colour).save(tmp_path / "colour_progressive.jpg", progressive=True)
    cv2.imwrite(str(tmp_path / "restarts.jpg"), grey, [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])
    files.update(grey_progressive=tmp_path / "grey_progressive.jpg", restarts=tmp_path / "restarts.jpg",
                 colour_progressive=tmp_path / "colour_progressive.jpg")
    jfif = bytearray((tmp_path / "restarts.jpg").read_bytes())
    jfif[jfif.find(b"JFIF\0") + 5] = 9                         # JFIF 9.01: libjpeg warns, the picture is whole
    (tmp_path / "jfif9.jpg").write_bytes(bytes(jfif))
    files["jfif9"] = tmp_path / "jfif9.jpg"
    for name, path in files.items():
        expected = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        got = read_display_image(path)
        assert got.shape == expected.shape and np.array_equal(got, expected), name


def test_a_jpeg_frame_that_lost_its_last_fragment_fails_at_decoding(tmp_path, chest_pixels):
    import pydicom
    from pydicom.encaps import generate_frames, itemize_fragment

    ds = pydicom.dcmread(_jpeg_baseline_file(chest_pixels, tmp_path))
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    third = len(stream) // 3 // 2 * 2                                   # even: no padding inside the codestream
    pieces = [stream[:third], stream[third:2 * third], stream[2 * third:]]
    for name, fragments in (("three.dcm", pieces), ("two.dcm", pieces[:2])):
        empty_offset_table = itemize_fragment(b"")
        ds.PixelData = empty_offset_table + b"".join(itemize_fragment(f) for f in fragments)
        ds.save_as(tmp_path / name)
    assert decode(tmp_path / "three.dcm").shape == chest_pixels.shape      # in three fragments, whole: decodes
    with pytest.raises(InputError, match="end-of-image marker"):
        load_unit_image(tmp_path / "two.dcm")


def test_every_bundled_compressed_sample_with_its_frame_cut_short_fails_at_decoding(tmp_path):
    """cxrscreen.testing.cut_frame, which benchmarks/damaged_files.py runs on every file pydicom ships, on the
    samples: JPEG 2000, RLE and JPEG baseline, each cut at three points; an uncompressed file has no frame to cut."""
    import random

    from cxrscreen.testing import cut_frame

    rng = random.Random(5)
    compressed = [p for p in sorted((ROOT / "samples").rglob("IM*.dcm")) if cut_frame(p.read_bytes(), rng)]
    assert len(compressed) >= 3
    for source in compressed:
        for k in range(3):
            path = tmp_path / f"{source.parent.name}_{k}.dcm"
            path.write_bytes(cut_frame(source.read_bytes(), rng))
            with pytest.raises(InputError) as info:
                decode(path)
            assert info.value.step == "decode", source
    assert cut_frame((ROOT / "samples" / "study3_pa_and_lateral" / "IM0001.dcm").read_bytes(), rng) is None


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGExtended.dcm"])
def test_a_jpeg_frame_padded_after_its_end_marker_decodes(name):
    # these end FF D9 FF (a pad byte after the marker): whole frames, as pydicom's own frame search takes them
    import pydicom
    from pydicom.encaps import generate_frames

    path = reference_file(name)
    assert next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1)).endswith(b"\xff\xd9\xff")
    assert decode(path).size


def test_unknown_transfer_syntax_is_a_per_file_failure(tmp_path, chest_pixels):
    ds = make_dicom(chest_pixels)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    path = tmp_path / "odd.dcm"
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(InputError) as info:
        load_unit_image(path)
    assert "1.2.3.4.5.6.7" in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------- the real CR chest radiograph

def test_real_cr_chest_uncompressed_and_j2k_lossless_agree():
    unc = load_unit_image(reference_file("RG1_UNCR.dcm"))
    j2k = load_unit_image(reference_file("RG1_J2KR.dcm"))
    np.testing.assert_array_equal(unc, j2k)
    rows, cols = unc.shape
    mediastinum = unc[int(rows * 0.3):int(rows * 0.6), int(cols * 0.46):int(cols * 0.54)].mean()
    left_lung = unc[int(rows * 0.3):int(rows * 0.6), int(cols * 0.2):int(cols * 0.35)].mean()
    right_lung = unc[int(rows * 0.3):int(rows * 0.6), int(cols * 0.65):int(cols * 0.8)].mean()
    # MONOCHROME1 was inverted: lungs (air) dark, mediastinum and spine bright
    assert mediastinum > left_lung + 0.1 and mediastinum > right_lung + 0.1


def test_real_cr_is_selected_and_extremity_skipped():
    chest = read_record(reference_file("RG1_UNCR.dcm"))
    assert isinstance(chest, Radiograph) and chest.body_part == "CHEST" and chest.view_position == "PA"
    for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm"):
        out = read_record(reference_file(name))
        assert isinstance(out, FileOutcome) and out.status is Status.SKIPPED
        assert "EXTREMITY" in out.reason and "(0018,0015)" in out.tag
    assert isinstance(read_record(reference_file("RG3_UNCR.dcm"), Selection(any_body_part=True)), Radiograph)


# ---------------------------------------------------------------- discovery

def test_discovery_by_content_in_a_pacs_tree(tmp_path, chest_pixels):
    import cv2

    tree = tmp_path / "export"
    save(make_dicom(chest_pixels, seed="a"), tree / "DICOM" / "ST0" / "SE0" / "IM0")       # no extension
    save(make_dicom(chest_pixels, seed="b"), tree / "weird.jpg")                            # DICOM named .jpg
    raw = make_dicom(chest_pixels, seed="c")
    raw.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    raw.preamble = None
    del raw.file_meta
    raw.save_as(tree / "raw_no_preamble.bin", implicit_vr=True, little_endian=True)        # no DICM preamble
    cv2.imwrite(str(tree / "scan.png"), (chest_pixels >> 4).astype(np.uint8))
    (tree / "notes.txt").write_text("referral letter")
    (tree / ".hidden.dcm").write_bytes(b"x")
    (tree / "._weird.jpg").write_bytes(b"\x00\x05\x16\x07")      # AppleDouble magic, beside its file
    (tree / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tree / "incoming.dcm.part").write_bytes(b"x")
    (tree / "backup.dcm~").write_bytes(b"x")
    (tree / ".cache").mkdir()
    (tree / ".cache" / "IM9").write_bytes(b"x")

    found = {p.relative_to(tree).as_posix() for p in discover([tree]) if isinstance(p, Path)}
    assert found == {"DICOM/ST0/SE0/IM0", "weird.jpg", "raw_no_preamble.bin", "scan.png", "notes.txt"}
    # hidden and temporary names are not read, and not lost either: each is listed, saying why
    unread = {o.path.relative_to(tree).as_posix(): o for o in discover([tree]) if isinstance(o, FileOutcome)}
    assert {name: (o.status, o.step) for name, o in unread.items()} == \
        dict.fromkeys([".hidden.dcm", "._weird.jpg", ".DS_Store", "incoming.dcm.part", "backup.dcm~", ".cache"],
                      (Status.SKIPPED, "discover"))
    assert unread[".hidden.dcm"].reason == "a hidden file (its name starts with '.'): not read"
    assert unread["._weird.jpg"].reason.startswith("a Mac's AppleDouble file (._*: the file information a Mac")
    assert unread[".DS_Store"].reason == "a Mac's folder view settings (.DS_Store; not an image): not read"
    assert unread["incoming.dcm.part"].reason == \
        "a temporary name (*.part): a transfer still under way, or one that failed; not read"
    assert unread[".cache"].reason == "a hidden folder (its name starts with '.'): not scanned"
    items = {p.path.relative_to(tree).as_posix(): p for p in scan([tree])}
    assert items["DICOM/ST0/SE0/IM0"].kind is FileKind.DICOM
    assert items["weird.jpg"].kind is FileKind.DICOM
    assert items["raw_no_preamble.bin"].kind is FileKind.DICOM
    assert items["scan.png"].kind is FileKind.PNG
    assert items["notes.txt"].status is Status.SKIPPED and "not a DICOM, JPEG or PNG" in items["notes.txt"].reason
    # and every one of them decodes to a unit image
    for key in ("DICOM/ST0/SE0/IM0", "weird.jpg", "raw_no_preamble.bin", "scan.png"):
        assert load_unit_image(tree / key).shape == chest_pixels.shape


def test_links_to_folders_are_followed_and_each_folder_is_walked_once(tmp_path, chest_pixels):
    """A link to a folder was passed over in silence (os.walk's followlinks=False): an export that links a
    study's folder in from elsewhere lost that study, with no row and no log line."""
    elsewhere = tmp_path / "storage" / "ST1"
    save(make_dicom(chest_pixels, seed="linked"), elsewhere / "IM1.dcm")
    inbox = tmp_path / "inbox"
    save(make_dicom(chest_pixels, seed="here"), inbox / "ST0" / "IM0.dcm")
    (inbox / "ST1").symlink_to(elsewhere, target_is_directory=True)
    (inbox / "ST0" / "loop").symlink_to(inbox, target_is_directory=True)        # a cycle
    (inbox / "again").symlink_to(inbox / "ST0", target_is_directory=True)       # a folder reached twice

    found = [p.relative_to(inbox).as_posix() for p in discover([inbox])]
    assert found == ["ST0/IM0.dcm", "ST1/IM1.dcm"]
    assert [p.name for p in discover([inbox, inbox / "ST0", elsewhere])] == ["IM0.dcm", "IM1.dcm"]
    assert all(isinstance(item, Radiograph) for item in scan([inbox]))


def test_a_folder_that_cannot_be_listed_is_a_failure_not_a_silence(tmp_path, chest_pixels, monkeypatch):
    """os.walk drops a folder it cannot list unless given onerror: its studies vanished from the run."""
    inbox = tmp_path / "inbox"
    save(make_dicom(chest_pixels, seed="a"), inbox / "A" / "IM0.dcm")
    save(make_dicom(chest_pixels, seed="b"), inbox / "B" / "IM0.dcm")
    save(make_dicom(chest_pixels, seed="c"), inbox / "C" / "IM0.dcm")
    scandir, refused = os.scandir, {inbox / "B"}

    def refusing(path="."):
        if Path(os.fsdecode(path)) in refused:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    items = list(scan([inbox]))
    assert [Path(i.path).relative_to(inbox).as_posix() for i in items] == ["A/IM0.dcm", "B", "C/IM0.dcm"]
    failed = items[1]
    assert isinstance(failed, FileOutcome) and (failed.status, failed.step) == (Status.FAILED, "discover")
    assert failed.reason == "cannot list the folder: Permission denied; its files were not screened"
    # the input folder itself
    refused.add(inbox)
    assert [(o.path, o.status) for o in scan([inbox])] == [(inbox, Status.FAILED)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders whatever their permissions")
def test_a_folder_without_read_permission_is_a_failure(tmp_path, chest_pixels):
    save(make_dicom(chest_pixels, seed="a"), tmp_path / "locked" / "IM0.dcm")
    (tmp_path / "locked").chmod(0)
    try:
        [outcome] = scan([tmp_path])
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert (outcome.path, outcome.status, outcome.step) == (tmp_path / "locked", Status.FAILED, "discover")


def test_dicomdir_file_is_skipped_with_reason(tmp_path):
    from pydicom.dataset import Dataset

    ds = make_dicom(None, seed="dir", sop_class="1.2.840.10008.1.3.10", modality="", body_part="",
                    view_position="")
    ds.DirectoryRecordSequence = [Dataset()]
    out = read_record(save(ds, tmp_path / "DICOMDIR"))
    assert out.status is Status.SKIPPED and "DICOMDIR" in out.reason


# ---------------------------------------------------------------- selection

@pytest.mark.parametrize("kwargs, reason", [
    ({"view_position": "LL"}, "view 'LL' is not frontal"),
    ({"view_position": "", "SeriesDescription": "CHEST LAT"}, "view 'LATERAL' is not frontal"),
    ({"body_part": "EXTREMITY"}, "body part 'EXTREMITY' is not chest"),
    ({"modality": "CT"}, "modality 'CT' is not a projection radiograph"),
    ({"modality": "MR"}, "modality 'MR' is not a projection radiograph"),
    ({"PresentationIntentType": "FOR PROCESSING"}, "raw detector image (FOR PROCESSING)"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.1.1.1"}, "raw detector image (FOR PROCESSING)"),
    ({"modality": "OT", "sop_class": SC_SOP_CLASS, "ConversionType": "SD"},
     "secondary capture of a scanned document (ConversionType SD), not a radiograph"),
    ({"modality": "OT", "sop_class": SC_SOP_CLASS, "ConversionType": "SYN"}, "of a synthetic image"),
    ({"modality": "OT", "sop_class": SC_SOP_CLASS, "ConversionType": "DRW"}, "of a drawing"),
])
def test_non_frontal_non_chest_non_radiograph_are_skipped(write_dicom, chest_pixels, kwargs, reason):
    out = read_record(write_dicom(chest_pixels, **kwargs))
    assert isinstance(out, FileOutcome) and out.status is Status.SKIPPED and reason in out.reason


def test_a_digitized_film_secondary_capture_is_screened(write_dicom, chest_pixels):
    film = read_record(write_dicom(chest_pixels, modality="OT", sop_class=SC_SOP_CLASS, ConversionType="DF",
                                   body_part="", view_position=""))
    assert isinstance(film, Radiograph) and film.conversion_type == "DF"


def _colour_files(folder: Path) -> dict[str, Path]:
    """Each of conftest.colour_versions as a JPEG, a PNG and an RGB secondary capture, plus a large JPEG
    rainbow (decoded reduced when selected)."""
    import cv2

    paths = {}
    for name, image in colour_versions().items():
        stem = name.replace(" ", "_")
        for suffix in (".jpg", ".png"):
            cv2.imwrite(str(folder / f"{stem}{suffix}"), image[..., ::-1])
            paths[f"{name}{suffix}"] = folder / f"{stem}{suffix}"
        paths[f"{name}.dcm"] = save(make_dicom(image, seed=name, modality="OT", sop_class=SC_SOP_CLASS,
                                               photometric="RGB", body_part="", view_position="",
                                               ConversionType="WSD"), folder / f"{stem}.dcm")
    large = np.repeat(np.repeat(colour_versions()["rainbow"], 5, axis=0), 5, axis=1)
    cv2.imwrite(str(folder / "large_rainbow.jpg"), large[..., ::-1])
    paths["rainbow, large.jpg"] = folder / "large_rainbow.jpg"
    return paths


def test_colour_pictures_are_skipped_and_colour_radiographs_screened(tmp_path):
    for key, path in _colour_files(tmp_path).items():
        out = read_record(path)
        if key.startswith(("heatmap overlay", "rainbow")):
            assert isinstance(out, FileOutcome) and out.status is Status.SKIPPED, key
            assert out.reason.startswith("a colour picture, not a radiograph: ") and out.step == "select", key
            assert out.tag == ("(0028,0004) PhotometricInterpretation" if path.suffix == ".dcm" else "")
        else:
            assert isinstance(out, Radiograph), (key, out)
            assert load_unit_image(path).shape == (320, 320)


def test_a_palette_colour_photograph_is_skipped():
    out = read_record(reference_file("OT-PAL-8-face.dcm"))      # modality OT, ConversionType DV: a face
    assert out.status is Status.SKIPPED and "a colour picture, not a radiograph" in out.reason


def test_a_big_endian_palette_gives_the_colours_of_its_little_endian_twin(tmp_path):
    # pydicom 3.0's apply_color_lut reads 16-bit palette entries little endian whatever the file: a big-endian
    # file's white 0xFF00 came out 0x00FF, the picture black, and such an image failed as blank
    little, big = (ingest.read_dicom(reference_file(name)) for name in ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"))
    np.testing.assert_array_equal(colour_frame(big), colour_frame(little))
    np.testing.assert_array_equal(colour_frame(big), colour_frame(little))     # ds is left as it was
    written = []
    for name, ds in (("little.dcm", little), ("big.dcm", big)):
        ds.Modality = "OT"                                  # an ultrasound image (grey in a palette) as an OT
        written.append(save(ds, tmp_path / name))
    assert all(isinstance(read_record(path), Radiograph) for path in written)
    np.testing.assert_array_equal(load_unit_image(written[1]), load_unit_image(written[0]))


def test_a_colour_image_that_cannot_be_decoded_fails_at_decoding_not_at_selection(tmp_path):
    ds = make_dicom(colour_versions()["rainbow"], modality="OT", photometric="RGB", body_part="", view_position="")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    path = save(ds, tmp_path / "short.dcm")
    assert isinstance(read_record(path), Radiograph)
    out = _outcome(path)
    assert out.status is Status.FAILED and out.step == "decode"


def test_overrides_lift_the_view_and_body_part_rules(write_dicom, chest_pixels):
    lateral = write_dicom(chest_pixels, name="lat.dcm", view_position="LL")
    hand = write_dicom(chest_pixels, name="hand.dcm", body_part="HAND")
    assert isinstance(read_record(lateral, Selection(include_lateral=True)), Radiograph)
    assert isinstance(read_record(hand, Selection(any_body_part=True)), Radiograph)
    ct = write_dicom(chest_pixels, name="ct.dcm", modality="CT")
    assert isinstance(read_record(ct, EVERY_IMAGE), FileOutcome)
    shown = write_dicom(chest_pixels, name="pres.dcm", PresentationIntentType="FOR PRESENTATION")
    assert read_record(shown).presentation_intent == "FOR PRESENTATION"


@pytest.mark.parametrize("field, written, given, other", [
    ("body_part", "TORAX", "torax", "HAND"),
    ("body_part", "CHEST PA", " chest   pa ", "CHEST AP"),
    ("view_position", "PA ERECT", "pa erect", "LL"),
])
def test_a_sites_own_names_for_the_chest_and_a_frontal_view_are_screened(write_dicom, chest_pixels, field, written,
                                                                         given, other):
    """A modality that writes BodyPartExamined TORAX or ViewPosition 'PA ERECT' had every study skipped, and
    the only way round, --any-body-part or --include-lateral, also screened knees or laterals."""
    own = write_dicom(chest_pixels, name="own.dcm", **{field: written})
    skipped = read_record(own)
    assert skipped.status is Status.SKIPPED
    assert ("--chest-body-part" if field == "body_part" else "--frontal-view") in skipped.reason
    names = {"chest_body_parts" if field == "body_part" else "frontal_views": {given}}
    selection = Selection(**names)
    assert isinstance(read_record(own, selection), Radiograph)
    assert read_record(write_dicom(chest_pixels, name="other.dcm", **{field: other}), selection).status \
        is Status.SKIPPED                     # the name added, and only it
    assert selection.as_json()[next(iter(names))] == [" ".join(given.upper().split())]


def test_an_empty_site_name_is_refused():
    from cxrscreen.errors import UsageError

    with pytest.raises(UsageError, match="--chest-body-part needs a name"):
        Selection(chest_body_parts={"  "})
    assert Selection(frontal_views="PA ERECT").frontal_views == {"PA ERECT"}     # a string is one name


# an attribute that may be empty, and the code sequence that decides then: the Radiograph field (make_dicom's
# parameter), the sequence, the values screened, the skip reason, the option that lifts it, a value to give
CODED = {
    "view": ("view_position", "ViewCodeSequence", {"PA", "AP"}, "view {!r} is not frontal", "include_lateral", "PA"),
    "region": ("body_part", "AnatomicRegionSequence", ingest.CHEST_BODY_PARTS, "body part {!r} is not chest",
               "any_body_part", "CHEST"),
}


@pytest.mark.parametrize("kind, scheme, value, meaning, decided", [
    ("view", "SCT", "399067008", "lateral", "LATERAL"),                 # CID 4010, SNOMED CT
    ("view", "SCT", "399173006", "left lateral", "LEFT LATERAL"),
    ("view", "SCT", "272479007", "postero-anterior", "PA"),
    ("view", "SRT", "R-10206", "antero-posterior", "AP"),               # legacy SNOMED-RT code
    ("view", "99LOCAL", "V1", "Postero-Anterior (PA)", "PA"),           # a local code: its meaning decides
    ("view", "SCT", "399162004", "left anterior oblique", "LEFT ANTERIOR OBLIQUE"),
    ("region", "SCT", "51185008", "Chest", "CHEST"),                    # CID 4031 (PS3.16 Annex L: CHEST)
    ("region", "SRT", "T-D3000", "Chest", "CHEST"),
    ("region", "SCT", "39607008", "Lung", "LUNG"),
    ("region", "99LOCAL", "R7", "Thoracic structure", "CHEST"),
    ("region", "SCT", "72696002", "Knee", "KNEE"),
    ("region", "SCT", "416550000", "Chest and Abdomen", "CHEST AND ABDOMEN"),
    ("region", "99LOCAL", "R9", "", "R9"),                              # no meaning: the code value, not a chest
])
def test_a_dx_image_with_an_empty_view_or_body_part_takes_it_from_its_code_sequence(
        write_dicom, chest_pixels, kind, scheme, value, meaning, decided):
    """ViewPosition is type 2 (may be empty) and BodyPartExamined optional in a DX image, which may code its
    view in (0054,0220) and must code its region in (0008,2218): a lateral, or a knee, coded only there was
    screened as a frontal chest."""
    from pydicom.dataset import Dataset

    field, sequence, screened, reason, override, given = CODED[kind]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    path = write_dicom(chest_pixels, name="coded.dcm", **{field: "", sequence: [code]})
    out = read_record(path)
    if decided in screened:
        assert isinstance(out, Radiograph) and getattr(out, field) == decided
    else:
        assert out.status is Status.SKIPPED and reason.format(decided) in out.reason
        assert getattr(read_record(path, Selection(**{override: True})), field) == decided
    # the attribute, when given, decides; an empty sequence says nothing
    assert getattr(read_record(write_dicom(chest_pixels, name="both.dcm", **{field: given, sequence: [code]})),
                   field) == given
    assert getattr(read_record(write_dicom(chest_pixels, name="empty.dcm", **{field: "", sequence: []})), field) == ""


def test_records_keep_report_metadata(write_dicom, chest_pixels):
    rec = read_record(write_dicom(chest_pixels, patient_id="P-42", patient_name="DOE^JANE",
                                  AccessionNumber="A1", ImageLaterality="", StudyDescription="CXR PA"))
    assert (rec.patient_id, rec.patient_name, rec.accession, rec.study_description) == ("P-42", "DOE^JANE", "A1",
                                                                                       "CXR PA")
    assert rec.sop_uid.startswith("2.25.") and rec.series_uid.startswith("2.25.")
    assert rec.study_date == "20261101" and rec.modality == "DX" and rec.view_position == "PA"
    # age at the study: PatientAge when the header has it, else birth and study dates
    aged = read_record(write_dicom(chest_pixels, name="aged.dcm", PatientAge="054Y"))
    assert aged.patient_age == "054Y" and aged.age_years == 54
    assert rec.age_years == pytest.approx(1400 / 365.25)     # born 2023-01-01, seen 2026-11-01


def test_monochrome1_that_says_presentation_lut_shape_identity_is_logged_and_shown_as_monochrome1(
        tmp_path, chest_pixels, caplog):
    ds = make_dicom(chest_pixels.max() - chest_pixels, seed="m1", photometric="MONOCHROME1")
    plain = save(ds, tmp_path / "plain.dcm")
    ds.PresentationLUTShape = "IDENTITY"
    identity = save(ds, tmp_path / "identity.dcm")
    with caplog.at_level("WARNING", logger="cxrscreen.ingest"):
        assert isinstance(read_record(identity), Radiograph)
    assert "identity.dcm: (2050,0020) PresentationLUTShape IDENTITY contradicts (0028,0004)" in caplog.text
    np.testing.assert_array_equal(load_unit_image(identity), load_unit_image(plain))
    caplog.clear()
    with caplog.at_level("WARNING", logger="cxrscreen.ingest"):
        read_record(plain)
    assert "PresentationLUTShape" not in caplog.text


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_the_header_read_leaves_the_pixel_data_unread(tmp_path, chest_pixels, charset, monkeypatch):
    """The header scan reads a few kilobytes of each file, not its pixel data (megabytes, over a network share
    too): the look for undeclared UTF-8 text, made when the set is absent or ISO_IR 100, read it."""
    import pydicom.filereader

    from cxrscreen.ingest import scan

    extra = {"SpecificCharacterSet": charset} if charset else {}
    save(make_dicom(chest_pixels, seed=f"deferred-{charset}", **extra), tmp_path / "image.dcm")
    assert chest_pixels.nbytes > 4096       # over the header read's defer_size: left on disk
    reads = []
    real = pydicom.filereader.read_deferred_data_element
    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element",
                        lambda *args, **kwargs: reads.append(args) or real(*args, **kwargs))
    found = list(scan([tmp_path]))
    assert [type(item) for item in found] == [Radiograph] and found[0].patient_name == "SYNTHETIC^PATIENT"
    assert reads == []


_OPENED: list[str] | None = None       # while a list, every file Python opens is appended to it


def _count_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None:
        _OPENED.append(str(args[0]))


@functools.cache
def _counting_opens() -> None:
    """Adds the audit hook once in this process (an audit hook cannot be taken away)."""
    sys.addaudithook(_count_opens)


@pytest.mark.parametrize("kind", ["dcm", "jpg", "png"])
def test_a_file_is_opened_once_to_recognise_it_and_read_its_header(tmp_path, chest_pixels, kind):
    """On a share each open is a round trip (and NFS revalidates the file's attributes at each one): the header
    read opened every file twice, once for its first bytes and once more for pydicom or Pillow. A value left
    on disk by the header read (the pixel data) is read later by its name, as before."""
    import cv2

    global _OPENED
    path = tmp_path / f"image.{kind}"
    if kind == "dcm":
        save(make_dicom(chest_pixels, seed="opened-once"), path)
    else:
        cv2.imwrite(str(path), (chest_pixels / max(1, chest_pixels.max()) * 255).astype(np.uint8))
    _counting_opens()       # counts only while _OPENED is a list
    _OPENED = []
    try:
        record = read_record(path)
        opened, _OPENED = _OPENED, []
        pixels = load_unit_image(path)
    finally:
        _OPENED = None
    assert isinstance(record, Radiograph) and record.path == path
    assert opened.count(str(path)) == 1, opened
    assert pixels.shape == chest_pixels.shape


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])     # explicit, implicit VR
def test_text_in_undeclared_utf8_is_read_as_utf8(tmp_path, chest_pixels, syntax, caplog):
    """No (0008,0005) means ASCII; a modality that wrote UTF-8 anyway gets its names read as written,
    not as Latin-1 mojibake ('MÃ¼ller'), and so does one that declared Latin-1 (ISO_IR 100) and wrote
    UTF-8; Latin-1 bytes stay Latin-1 and any other declared set is obeyed."""
    import hashlib

    from pydicom.dataelem import DataElement

    def written(file, *values):
        ds = make_dicom(chest_pixels, seed=file, transfer_syntax=syntax)
        for tag, vr, raw in values:
            ds[tag] = DataElement(tag, vr, raw)
        return save(ds, tmp_path / file)

    utf8 = written("utf8.dcm", (0x00100010, "PN", "Müller^Jürgen".encode()),
                   (0x00081030, "LO", "Thorax p.a. (Kinder), Łódź".encode()))
    before = hashlib.sha256(utf8.read_bytes()).digest()
    with caplog.at_level("WARNING", logger="cxrscreen.ingest"):
        rec = read_record(utf8)
    assert (rec.patient_name, rec.study_description) == ("Müller^Jürgen", "Thorax p.a. (Kinder), Łódź")
    assert "SpecificCharacterSet does not say so" in caplog.text and "utf8.dcm" in caplog.text
    assert hashlib.sha256(utf8.read_bytes()).digest() == before             # the input is never modified
    latin1 = written("latin1.dcm", (0x00100010, "PN", "Müller^Jürgen".encode("latin-1")))
    assert read_record(latin1).patient_name == "Müller^Jürgen"
    # one value that is not UTF-8 means the file is not: nothing is re-read
    mixed = written("mixed.dcm", (0x00100010, "PN", "Müller^Jürgen".encode()),
                    (0x00081030, "LO", "Lunge rechts, Größe".encode("latin-1")))
    assert read_record(mixed).study_description == "Lunge rechts, Größe"
    # A modality set up for Latin-1 that writes UTF-8 says ISO_IR 100: its UTF-8 is read as UTF-8 too
    caplog.clear()
    said_latin1 = written("said_latin1.dcm", (0x00080005, "CS", b"ISO_IR 100"),
                          (0x00100010, "PN", "Müller^Jürgen".encode()))
    with caplog.at_level("WARNING", logger="cxrscreen.ingest"):
        rec = read_record(said_latin1)
    assert rec.patient_name == "Müller^Jürgen" and rec.character_set == "ISO_IR 192"
    assert "SpecificCharacterSet says ISO_IR 100; read as UTF-8" in caplog.text
    latin1 = written("latin1_declared.dcm", (0x00080005, "CS", b"ISO_IR 100"),
                     (0x00100010, "PN", "Müller^Jürgen".encode("latin-1")))
    assert read_record(latin1).patient_name == "Müller^Jürgen"
    # another declared set is obeyed, even where its bytes would decode as UTF-8
    raw = "Müller".encode()
    cyrillic = written("cyrillic.dcm", (0x00080005, "CS", b"ISO_IR 144"), (0x00100010, "PN", raw))
    assert read_record(cyrillic).patient_name == raw.decode("iso8859-5")


@pytest.mark.parametrize("age, birth, study, expected", [
    ("004Y", "", "", 4.0), ("018M", "", "", 1.5), ("070W", "", "", 70 * 7 / 365.25), ("010D", "", "", 10 / 365.25),
    ("", "20200101", "20250101", 5.0), ("", "20200101", "20250101T", 5.0), ("", "", "20250101", None),
    ("", "20300101", "20250101", None), ("", "2020", "20250101", None), ("4 Y", "", "", None),
    ("012Y", "20000101", "20250101", 12.0),
    # 000Y: the placeholder of a modality that did not know the age; 000D is a newborn
    ("000Y", "", "", None), ("000Y", "20240101", "20250101", 1.0), ("000D", "", "", 0.0), ("000M", "", "", 0.0),
])
def test_age_at_the_study(age, birth, study, expected):
    from cxrscreen.records import age_in_years

    got = age_in_years(age, birth, study)
    assert got == (pytest.approx(expected, abs=0.003) if expected is not None else None)


def test_studies_are_grouped_by_uid_and_jpegs_stand_alone(tmp_path, chest_pixels):
    import cv2

    save(make_dicom(chest_pixels, seed="pa", study_seed="S"), tmp_path / "a.dcm")
    save(make_dicom(chest_pixels, seed="ap", study_seed="S", view_position="AP"), tmp_path / "b.dcm")
    save(make_dicom(chest_pixels, seed="lat", study_seed="S", view_position="LL"), tmp_path / "c.dcm")
    save(make_dicom(chest_pixels, seed="pa", study_seed="S"), tmp_path / "copy_of_a.dcm")
    save(make_dicom(chest_pixels, seed="other", study_seed="T"), tmp_path / "d.dcm")
    cv2.imwrite(str(tmp_path / "e.jpg"), (chest_pixels >> 4).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "f.jpg"), (chest_pixels >> 4).astype(np.uint8))
    studies, loose = group_studies(scan([tmp_path]))
    assert len(studies) == 4 and loose == []
    first = studies[0]
    assert [r.path.name for r in first.images] == ["a.dcm", "b.dcm"]
    assert {o.path.name for o in first.skipped} == {"c.dcm", "copy_of_a.dcm"}


def test_each_image_carries_the_newest_presentation_state_of_its_study_that_turns_or_mirrors_it(tmp_path,
                                                                                                 chest_pixels):
    """PACS exports carry presentation states (GSPS) beside the images: each is listed as skipped (not an
    image) with what it does, and the image takes the newest that references it (its first frame), only
    from its own study, and only when that one turns or mirrors it (a newer one that does not shows it as
    stored). Values outside the standard's are not applied, and the file says so."""
    from cxrscreen.ingest import PRESENTATION_STATE_TAG
    from cxrscreen.testing import make_presentation_state

    a = save(make_dicom(chest_pixels, seed="a", study_seed="S"), tmp_path / "a.dcm")
    b = save(make_dicom(chest_pixels, seed="b", study_seed="S", view_position="AP"), tmp_path / "b.dcm")
    multi = save(make_dicom(chest_pixels, seed="m", study_seed="S", more_frames=[chest_pixels]), tmp_path / "m.dcm")
    other = save(make_dicom(chest_pixels, seed="o", study_seed="T"), tmp_path / "o.dcm")
    a, b, multi, other = (pydicom_read(p) for p in (a, b, multi, other))
    save(make_presentation_state([a, b, multi], seed="old", rotation=90, created="20261101120000",
                                 frames={multi.SOPInstanceUID: 2}), tmp_path / "ps_old.dcm")
    save(make_presentation_state([b], seed="new", rotation=0, created="20261102080000"), tmp_path / "ps_new.dcm")
    save(make_presentation_state([other], seed="elsewhere", rotation=180, flip="Y"), tmp_path / "ps_t.dcm")
    wrong = make_presentation_state([other], seed="wrong", rotation=45, created="20261103000000")
    wrong.StudyInstanceUID = other.StudyInstanceUID
    save(wrong, tmp_path / "ps_wrong.dcm")
    cross = make_presentation_state([a], seed="cross", rotation=270, created="20261109000000")
    cross.StudyInstanceUID = other.StudyInstanceUID       # another study's presentation state naming image a
    save(cross, tmp_path / "ps_cross.dcm")

    studies, loose = group_studies(scan([tmp_path]))
    assert loose == []
    shown = {img.path.name: img.presentation for study in studies for img in study.images}
    assert shown["a.dcm"].name == "ps_old.dcm" and shown["a.dcm"].rotation == 90
    assert shown["b.dcm"] is None            # the newer one shows it as stored
    assert shown["m.dcm"] is None            # the old one names its frame 2 only
    assert shown["o.dcm"].name == "ps_t.dcm" and (shown["o.dcm"].rotation, shown["o.dcm"].flip) == (180, True)
    files = {o.path.name: o for study in studies for o in study.skipped}
    assert set(files) == {"ps_old.dcm", "ps_new.dcm", "ps_t.dcm", "ps_wrong.dcm", "ps_cross.dcm"}
    assert all(o.status is Status.SKIPPED and o.tag == PRESENTATION_STATE_TAG for o in files.values())
    assert "it shows 2 images turned 90 degrees clockwise" in files["ps_old.dcm"].reason
    assert "mirrored left to right" in files["ps_t.dcm"].reason
    assert "neither turns nor mirrors" in files["ps_new.dcm"].reason
    assert files["ps_wrong.dcm"].presentation is None
    assert "(0070,0042) ImageRotation 45 is not 0, 90, 180 or 270, so it is not applied" in files["ps_wrong.dcm"].reason


@pytest.mark.parametrize("damaged, said", [
    ("rotation", "its (0070,0042) ImageRotation 90\\0 is not 0, 90, 180 or 270"),
    ("flip", "its (0070,0041) ImageHorizontalFlip 'Y\\N' is not Y or N"),
    ("frame", "its (0008,1160) ReferencedFrameNumber 1.5 is not whole frame numbers"),
])
def test_a_presentation_state_with_a_damaged_value_is_not_applied_and_says_which(tmp_path, chest_pixels,
                                                                                  damaged, said):
    """A one-valued attribute read as two (4 bytes of a US: 90 and 0; Y backslash N) or a frame number that is not
    a whole number failed the presentation state's file with a TypeError naming no attribute ("int() argument
    must be ... not 'list'", "'ISfloat' object is not iterable"). It is skipped now as one whose values are not
    the standard's: not applied, its attribute and value named; an older one of the image's still applies."""
    import warnings

    from pydicom.dataelem import DataElement

    from cxrscreen.testing import make_presentation_state

    image = pydicom_read(save(make_dicom(chest_pixels, seed="a", study_seed="S"), tmp_path / "a.dcm"))
    save(make_presentation_state([image], seed="old", rotation=180, created="20261101120000"), tmp_path / "ps_old.dcm")
    ps = make_presentation_state([image], seed="new", rotation=90, created="20261102120000",
                                 frames={image.SOPInstanceUID: 1} if damaged == "frame" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # pydicom warns of the invalid IS as it is set
        if damaged == "rotation":
            ps[0x00700042] = DataElement(0x00700042, "US", [90, 0])
        elif damaged == "flip":
            ps[0x00700041] = DataElement(0x00700041, "CS", ["Y", "N"])
        else:
            item = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
            item[0x00081160] = DataElement(0x00081160, "IS", "1.5")
        save(ps, tmp_path / "ps_new.dcm")
    [study], loose = group_studies(scan([tmp_path]))
    assert loose == []
    [new] = [o for o in study.skipped if o.path.name == "ps_new.dcm"]
    assert new.status is Status.SKIPPED and new.presentation is None
    assert f"not an image: {said}, so it is not applied" in new.reason
    [shown] = study.images
    assert shown.presentation.name == "ps_old.dcm" and shown.presentation.rotation == 180


def test_images_a_rejection_note_of_their_study_names_are_listed_as_skipped_not_screened(tmp_path, chest_pixels):
    """An IHE IOCM rejection note (a Key Object Selection titled with a reason for removal: a retake's bad
    exposure, an image made on another patient's worklist entry) withdraws images that a PACS export may still
    carry: they are listed as skipped, naming the note, and never scored. A study left with no image is a
    study of skipped files; a key object selection of another title withdraws nothing."""
    from cxrscreen.ingest import REJECTED_TAG, REJECTION_TAG
    from cxrscreen.testing import make_key_object_selection

    kept = save(make_dicom(chest_pixels, seed="kept", study_seed="S"), tmp_path / "kept.dcm")
    retake = save(make_dicom(chest_pixels, seed="retake", study_seed="S"), tmp_path / "retake.dcm")
    wrong = save(make_dicom(chest_pixels, seed="wrong", study_seed="W"), tmp_path / "wrong_patient.dcm")
    kept, retake, wrong = (pydicom_read(p) for p in (kept, retake, wrong))
    save(make_key_object_selection([retake], seed="reject"), tmp_path / "KO1.dcm")
    save(make_key_object_selection([kept], seed="interest", code="113000", meaning="Of Interest"), tmp_path / "KO2.dcm")
    save(make_key_object_selection([wrong], seed="mwl", code="113038", meaning="Incorrect Modality Worklist Entry"),
         tmp_path / "KO3.dcm")

    studies, loose = group_studies(scan([tmp_path]))
    assert [[img.path.name for img in s.images] for s in studies] == [["kept.dcm"]]
    skipped = {o.path.name: o for o in [*studies[0].skipped, *loose]}
    assert skipped["retake.dcm"].status is Status.SKIPPED and skipped["retake.dcm"].tag == REJECTED_TAG
    assert skipped["retake.dcm"].reason == ("rejected by the rejection note KO1.dcm (Rejected for Quality Reasons): "
                                            "withdrawn on the PACS, not screened")
    assert "(Incorrect Modality Worklist Entry)" in skipped["wrong_patient.dcm"].reason
    assert skipped["wrong_patient.dcm"].study_uid == wrong.StudyInstanceUID
    assert skipped["KO1.dcm"].tag == REJECTION_TAG and skipped["KO1.dcm"].reason == (
        "rejection note (Rejected for Quality Reasons), not an image: the 1 instance it names is not screened")
    assert skipped["KO2.dcm"].rejection is None and skipped["KO2.dcm"].reason.startswith("no pixel data")


def pydicom_read(path):
    import pydicom

    return pydicom.dcmread(path)


# ---------------------------------------------------------------- bad inputs

def _outcome(path) -> FileOutcome:
    out = read_record(path)
    if isinstance(out, Radiograph):  # header fine: the failure comes at decode time
        with pytest.raises(InputError) as info:
            load_unit_image(path, out.kind)
        return FileOutcome.from_error(info.value)
    return out


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    out = _outcome(tmp_path / "empty.dcm")
    assert out.status is Status.FAILED and "0 bytes" in out.reason and out.step == "read"


def test_truncated_dicom(tmp_path, chest_pixels):
    whole = save(make_dicom(chest_pixels), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) - 3000])
    out = _outcome(cut)
    assert out.status is Status.FAILED and out.path == cut
    assert out.step in ("read", "decode") and ("truncated" in out.reason or "decoded" in out.reason)


def test_truncated_compressed_dicom(tmp_path, chest_pixels):
    whole = save(make_dicom(chest_pixels, transfer_syntax="1.2.840.10008.1.2.4.90"), tmp_path / "w.dcm").read_bytes()
    cut = tmp_path / "cut_j2k.dcm"
    cut.write_bytes(whole[: len(whole) // 2])
    out = _outcome(cut)
    assert out.status is Status.FAILED and out.path == cut


def test_a_header_value_pydicom_cannot_convert_fails_the_file_naming_the_tag(tmp_path, chest_pixels):
    """pydicom converts a value when it is first read, after the file was parsed: a corrupt VR raised
    NotImplementedError out of read_record and stopped the whole batch (found by fuzzing the samples)."""
    path = save(make_dicom(chest_pixels), tmp_path / "vr.dcm")
    data = path.read_bytes()
    at = data.index(b"\x08\x00\x50\x00SH")         # (0008,0050) AccessionNumber, explicit VR little endian
    path.write_bytes(data[:at + 4] + b"S\xc3" + data[at + 6:])
    out = read_record(path)
    assert out.status is Status.FAILED and out.path == path and out.step == "read"
    assert out.tag == "(0008,0050) AccessionNumber" and "Unknown Value Representation" in out.reason
    items = list(scan([tmp_path]))
    assert len(items) == 1 and items[0].reason == out.reason


def test_a_decoder_that_panics_on_corrupt_pixel_data_fails_the_file(tmp_path, capfd):
    """pylibjpeg-rle's frame decoder is written in Rust and panics on some corrupt RLE segments (one byte is
    enough); pyo3's PanicException is a BaseException, which `except Exception` let through: the whole batch
    stopped. cxrscreen's RLE plugin decodes the segments one at a time, without a panic, and names what is wrong."""
    ds, frame = _first_frame(reference_file("MR_small_RLE.dcm"))
    frame[2793] = 124           # in the second segment: the decoder then writes past the end of its buffer
    path = _with_frame(ds, frame, tmp_path / "panic.dcm")
    capfd.readouterr()
    failed = _fails_at_decoding(path)
    assert failed.step == "decode" and failed.tag == "(7FE0,0010) PixelData"
    assert "RLE Lossless" in failed.cause and str(path) in str(failed)
    assert "an RLE segment decodes to 4,225 bytes, not the 4,096 of Rows x Columns" in failed.cause
    assert "panicked" not in capfd.readouterr().err


def test_an_rle_segment_read_from_the_wrong_place_fails_and_a_padding_byte_passes(tmp_path):
    """pylibjpeg-rle refuses an RLE header whose unused offsets are not 0 (it counts segments by them) and a
    segment that decodes past Rows x Columns; pydicom's own decoder, tried next, decoded such a frame, cut the
    segments to size and only warned. With the second segment's offset moved as well (found by
    benchmarks/fuzz_codestreams.py) the first segment runs on into the second and the second starts mid-run:
    a garbled picture, screened. It fails now; a segment one byte over (an encoder's padding, pydicom issue
    1438) still decodes to its picture."""
    import struct

    source = ROOT / "samples" / "study2_dx_rescale_rle" / "IM0001.dcm"
    ds, frame = _first_frame(source)
    count, first, second = struct.unpack("<3I", frame[:12])
    assert (count, first) == (2, 64)
    frame[8:16] = struct.pack("<2I", second + 16, 195)
    failed = _fails_at_decoding(_with_frame(ds, frame, tmp_path / "moved.dcm"))
    assert failed.tag == "(7FE0,0010) PixelData"
    assert failed.cause == ("pixel data cannot be decoded (RLE Lossless (1.2.840.10008.1.2.5)): RLE segment 1 ends "
                            "in the middle of a run: its data was cut or changed")

    # the first segment's runs changed so that it decodes past the frame (into the second's place)
    ds = ingest.read_dicom(source)
    failed = _fails_at_decoding(_with_a_longer_first_run(source, tmp_path / "longer.dcm"))
    assert failed.cause.startswith("pixel data cannot be decoded (RLE Lossless (1.2.840.10008.1.2.5)): an RLE "
                                   "segment decodes to ")
    assert failed.cause.endswith(f"bytes, not the {ds.Rows * ds.Columns:,} of Rows x Columns: its header or its "
                                 "runs were changed, and the picture would be garbled")

    # one literal byte more at the end of the last segment: one byte of padding, let through as before
    ds, frame = _first_frame(source)
    assert np.array_equal(decode(_with_frame(ds, frame + b"\x00\x00", tmp_path / "padded.dcm")), decode(source))


@pytest.mark.parametrize("segment", [0, 1])
def test_a_16_bit_rle_segment_one_byte_over_decodes_and_nothing_panics(tmp_path, segment, capfd):
    """A 16-bit RLE segment whose last run is one byte longer than the frame needs (the padding some encoders
    add): pylibjpeg-rle 2.2's frame decoder panics on it (index out of bounds), Rust writing its lines to stderr
    naming no file, and pyo3's PanicException, a BaseException, went through pydicom's loop over its decoders:
    the whole image failed, then (b825478) pydicom's slower decoder was tried after the panic. cxrscreen's plugin
    (cxrscreen.rle) decodes the segments one at a time: the picture, and nothing on stderr."""
    import struct

    source = ROOT / "samples" / "study2_dx_rescale_rle" / "IM0001.dcm"
    ds, frame = _first_frame(source)
    assert ds.BitsAllocated == 16
    offsets = list(struct.unpack("<3I", frame[:12])[1:]) + [len(frame)]
    at, last = offsets[segment], None
    while at < offsets[segment + 1]:            # PackBits runs: a header byte, then 1 byte or header + 1 bytes
        last = at
        at += frame[at] + 2 if frame[at] < 128 else 2 if frame[at] > 128 else 1
    assert frame[last] > 129                    # a replicate run of 257 - header bytes
    frame[last] -= 1                            # one byte more
    over = _with_frame(ds, frame, tmp_path / "over.dcm")
    capfd.readouterr()
    assert np.array_equal(decode(over), decode(source))
    assert "panicked" not in capfd.readouterr().err


def test_rle_frames_decode_as_pydicoms_decoders_decode_them(tmp_path):
    """cxrscreen's RLE plugin lays the segments out as pydicom's decoders do: each RLE file of pydicom's test
    data (8, 16 and 32 bits; one sample and three, RGB and as YBR_FULL; one frame and several) and the sample give
    the same first frame as pylibjpeg-rle and pydicom's own decoder, and a header whose segment count is damaged
    (which pydicom's decoder trusts) or with a non-zero offset left in an unused place (which pylibjpeg-rle
    counts) still decodes."""
    import struct

    from pydicom.pixels import pixel_array

    names = ["MR_small_RLE.dcm", "emri_small_RLE.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_rle_2frame.dcm", "SC_rgb_rle.dcm",
             "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_32bit.dcm",
             "SC_rgb_rle_32bit_2frame.dcm", "rtdose_rle.dcm", "rtdose_rle_1frame.dcm"]
    sets = [ingest.read_dicom(reference_file(name)) for name in names]
    sets.append(ingest.read_dicom(ROOT / "samples" / "study2_dx_rescale_rle" / "IM0001.dcm"))
    ybr = ingest.read_dicom(reference_file("SC_rgb_rle.dcm"))
    ybr.PhotometricInterpretation = "YBR_FULL"
    sets.append(ybr)
    for ds in sets:
        assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.5"
        expected = pixel_array(ds, index=0, decoding_plugin="pydicom")
        assert np.array_equal(pixel_array(ds, index=0, decoding_plugin="pylibjpeg"), expected), ds.filename
        assert np.array_equal(ingest.decode_first_frame(ds), expected), ds.filename

    source = ROOT / "samples" / "study2_dx_rescale_rle" / "IM0001.dcm"
    ds, frame = _first_frame(source)
    expected = decode(source)
    damaged_count = bytearray(frame)
    damaged_count[0:4] = struct.pack("<I", 7)
    assert np.array_equal(decode(_with_frame(ds, damaged_count, tmp_path / "count.dcm")), expected)
    ds, frame = _first_frame(source)
    left_over = bytearray(frame)
    left_over[12:16] = struct.pack("<I", 99)
    assert np.array_equal(decode(_with_frame(ds, left_over, tmp_path / "unused.dcm")), expected)


def test_jpeg_data_out_of_step_with_its_huffman_tables_fails_though_another_decoder_decodes_it(tmp_path):
    """One byte of the JPEG baseline sample's AC Huffman table changed (found by benchmarks/fuzz_codestreams.py):
    libjpeg-turbo decodes the coded data on with the wrong table without a word (the strict check passes it),
    pylibjpeg's libjpeg refuses it ("AC coefficient decoding out of sync"), and pydicom then tried Pillow, whose
    picture, nearly every pixel wrong, was screened. pylibjpeg's refusal stands now."""
    source = ROOT / "samples" / "study5_cr_jpeg_baseline" / "IM0001.dcm"
    ds, frame = _first_frame(source)
    ac_table = frame.find(b"\xff\xc4", frame.find(b"\xff\xc4") + 2)       # the second DHT segment: AC codes
    assert frame[ac_table + 53] == 0x24
    frame[ac_table + 53] = 0x34                                             # one of its symbols
    failed = _fails_at_decoding(_with_frame(ds, frame, tmp_path / "table.dcm"))
    assert failed.tag == "(7FE0,0010) PixelData"
    assert failed.cause.startswith("pixel data cannot be decoded (JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)): "
                                   "frame 1's JPEG data is corrupt (libjpeg: AC coefficient decoding out of sync)")
    assert np.array_equal(decode(source), _first_frame(source)[0].pixel_array)    # whole: as pydicom decodes it


def test_header_warnings_are_logged_once_naming_the_file(caplog, recwarn):
    """pydicom warns of an invalid value as it converts it, and logs the same text, neither naming the file."""
    path = reference_file("badVR.dcm")
    with caplog.at_level(logging.WARNING):
        read_record(path)
    said = [r for r in caplog.records if "Invalid value for VR IS: '1A'" in r.getMessage()]
    assert len(said) == 1 and said[0].name == "cxrscreen.ingest"
    assert said[0].getMessage().startswith(f"{path}: header read with 1 warning: ")
    assert not [w for w in recwarn if "Invalid value" in str(w.message)]


@pytest.mark.parametrize("keyword, value, said, at_read", [
    ("Rows", [256, 0], "holds 2 values (256\\0), where the standard allows one", True),
    ("Columns", [256, 0], "holds 2 values (256\\0), where the standard allows one", True),
    ("BitsStored", [12, 0], "holds 2 values (12\\0), where the standard allows one", False),
    ("PixelRepresentation", [0, 0], "holds 2 values (0\\0), where the standard allows one", False),
    ("BitsAllocated", [16, 0], "holds 2 values (16\\0), where the standard allows one", False),
    ("NumberOfFrames", ["1", "2"], "holds 2 values (1\\2), where the standard allows one", False),
    ("NumberOfFrames", "1.5", "value '1.5' is not a whole number", False),
])
def test_an_image_pixel_attribute_with_two_values_fails_naming_it(tmp_path, chest_pixels, keyword, value, said,
                                                                   at_read):
    """A one-valued attribute of the Image Pixel module read as two (4 bytes of a US: a damaged length or VR) failed
    its file with Python's words naming no attribute ("cannot read the header: TypeError: int() argument must be
    ... not 'list'", "'<=' not supported between instances of 'MultiValue' and 'int'"). The file fails at
    validation naming it: Rows and Columns when the header is read, the others when the image is decoded, so a
    file that is skipped anyway (not a radiograph) is skipped as before."""
    import warnings

    from pydicom.dataelem import DataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    ds = make_dicom(chest_pixels, seed="damaged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # pydicom warns of an invalid IS as it is set
        ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        path = save(ds, tmp_path / "damaged.dcm")
    label = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"
    outcome = read_record(path)
    if at_read:
        assert outcome.status is Status.FAILED and (outcome.step, outcome.tag) == ("validate", label)
        assert outcome.reason == f"{said}: the header is damaged"
    else:
        assert isinstance(outcome, Radiograph)
        with pytest.raises(InvalidImageError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore")         # and as it reads it again (batch catches these per thread)
            load_unit_image(path)
        assert (info.value.step, info.value.tag, info.value.cause) == ("validate", label,
                                                                      f"{said}: the header is damaged")
    ds.Modality = "RTDOSE"                          # not a radiograph: skipped for that, whatever the rest says
    if not at_read:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert read_record(save(ds, tmp_path / "other.dcm")).status is Status.SKIPPED


@pytest.mark.parametrize("keyword, value, said", [
    ("ViewPosition", ["PA", "LL"], "view 'PA\\LL' is not frontal"),
    ("BodyPartExamined", ["CHEST", "HAND"], "body part 'CHEST\\HAND' is not chest"),
    ("Modality", ["DX", "CT"], "modality 'DX\\CT' is not a projection radiograph"),
])
def test_a_selecting_attribute_with_two_values_is_skipped_naming_both(tmp_path, chest_pixels, keyword, value, said):
    """ViewPosition, BodyPartExamined and Modality have one value each; a damaged header that makes two of one was
    selected by the first alone (PA\\LL screened as a PA, CHEST\\HAND as a chest). Both are shown now, which no
    rule takes for a frontal chest radiograph: the file is skipped, its reason naming them."""
    ds = make_dicom(chest_pixels, seed="two")
    setattr(ds, keyword, value)
    outcome = read_record(save(ds, tmp_path / "two.dcm"))
    assert isinstance(outcome, FileOutcome) and outcome.status is Status.SKIPPED and outcome.step == "select"
    assert outcome.reason.startswith(said)


def test_a_shown_attribute_with_two_values_is_shown_whole_and_an_age_of_two_is_no_age(tmp_path, chest_pixels):
    """Patient Age, Patient Sex and Image Laterality have one value each; a damaged header that makes two of one
    was read by its first alone: 045Y\\003Y as an adult (the population caution then decided by a value the
    header does not hold alone), M\\F as male, L\\R as left in the report. Each is kept as written now: an age of
    two values is no age (the dates decide, and the report shows it as written)."""
    from cxrscreen.report import display_age

    ds = make_dicom(chest_pixels, seed="shown", PatientAge=["045Y", "003Y"], PatientSex=["M", "F"],
                    ImageLaterality=["L", "R"], PatientBirthDate="")
    record = read_record(save(ds, tmp_path / "shown.dcm"))
    assert isinstance(record, Radiograph)
    assert (record.patient_age, record.patient_sex, record.laterality) == ("045Y\\003Y", "M\\F", "L\\R")
    assert record.age_years is None
    assert display_age(record.patient_age, record.patient_birth_date, record.study_date) == "045Y\\003Y"
    ds = make_dicom(chest_pixels, seed="dated", PatientAge=["045Y", "003Y"], PatientBirthDate="20200101",
                    StudyDate="20261101")
    assert read_record(save(ds, tmp_path / "dated.dcm")).age_years == pytest.approx(6.83, abs=0.01)
    ds = make_dicom(chest_pixels, seed="one", PatientAge="045Y", Laterality="R")
    record = read_record(save(ds, tmp_path / "one.dcm"))
    assert (record.patient_age, record.age_years, record.laterality) == ("045Y", 45.0, "R")


def test_a_transfer_syntax_a_damaged_byte_split_in_two_fails_its_file_at_decoding(tmp_path, chest_pixels):
    # a backslash where a digit was makes the UID two values: AttributeError ('MultiValue' has no 'name') came
    # out of decode_first_frame (found damaging an encapsulated uncompressed file)
    path = save(make_dicom(chest_pixels, seed="ts"), tmp_path / "ts.dcm")
    data = path.read_bytes()
    at = data.index(b"1.2.840.10008.1.2.1\0")
    path.write_bytes(data[:at + 7] + b"\\" + data[at + 8:])                   # 1.2.840\0008.1.2.1
    record = read_record(path)
    assert isinstance(record, Radiograph)                   # the header read does not decode the pixels
    with pytest.raises(InputError) as info:
        load_unit_image(path, record.kind)
    assert info.value.step == "decode" and "unreadable transfer syntax" in info.value.cause


def test_a_corrupt_vr_of_a_pixel_attribute_fails_its_file_at_normalising_naming_the_tag(tmp_path, chest_pixels):
    # Found by the damage test below when its files still had random UIDs: a corrupt VR in (0028,1051) is not
    # read with the header, and pydicom's NotImplementedError came out of load_unit_image (a batch failed the
    # file without its tag; training's data check got no InputError)
    path = save(make_dicom(chest_pixels, seed="vr", WindowCenter="2048", WindowWidth="4096"), tmp_path / "vr.dcm")
    data = path.read_bytes()
    at = data.index(bytes.fromhex("28005110") + b"DS")                   # (0028,1051) WindowWidth, explicit VR
    path.write_bytes(data[:at + 4] + b"D\xb1" + data[at + 6:])
    assert isinstance(read_record(path), Radiograph)
    with pytest.raises(InputError) as info:
        load_unit_image(path)
    assert info.value.step == "normalise" and info.value.tag == "(0028,1051) WindowWidth"
    assert "Unknown Value Representation" in info.value.cause and str(path) in str(info.value)


def test_mutated_samples_each_end_as_an_outcome_of_their_own(tmp_path):
    """Every bundled DICOM sample, damaged as transfers and disks damage files (bytes changed in the header or
    anywhere, a run of zeros, a piece repeated, the end cut off), ends as a Radiograph or a per-file outcome
    at the header read, and at decoding as an image or an InputError: nothing else escapes to stop a batch.
    Seeded. Caught a corrupt VR (NotImplementedError at the header read) and pylibjpeg-rle's panic."""
    import random

    import pydicom
    rng = random.Random(11)
    sources = sorted(p for p in (ROOT / "samples").rglob("*") if p.is_file() and p.suffix not in (".py", ".md", ".jpg"))
    paths = []
    for source in sources:
        ds = pydicom.dcmread(source, force=True)
        ds.SOPInstanceUID = uid_from(f"mutated/{source.relative_to(ROOT)}")   # the same bytes, the same damage
        if "MediaStorageSOPInstanceUID" in getattr(ds, "file_meta", {}):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / "clean.dcm")
        whole = (tmp_path / "clean.dcm").read_bytes()
        for k in range(40):
            data, how = damage(whole, rng)
            path = tmp_path / f"{source.parent.name}_{source.stem}_{k:02d}_{how}.dcm"
            path.write_bytes(data)
            paths.append(path)
    outcomes = {"decoded": 0, "failed": 0}
    for path in paths:
        item = read_record(path)
        assert isinstance(item, (Radiograph, FileOutcome)) and item.path == path
        if isinstance(item, FileOutcome):
            assert item.reason and (item.status is Status.SKIPPED or item.step)
            outcomes[item.status.value] = outcomes.get(item.status.value, 0) + 1
            continue
        try:
            load_unit_image(path, item.kind)
            outcomes["decoded"] += 1
        except InputError as exc:
            assert exc.step and exc.cause and str(path) in str(exc)
            outcomes["failed"] += 1
    assert sum(outcomes.values()) == len(paths) and min(outcomes.values()) > 0, outcomes


def test_archives_and_other_image_formats_are_named_in_the_skip_reason(tmp_path):
    """A study sent zipped, or exported as TIFF, was skipped as 'not a DICOM, JPEG or PNG file', like a log;
    so was a phone's HEIC photograph of a film."""
    import gzip
    import tarfile
    import zipfile

    import cv2
    from PIL import Image

    picture = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    for suffix in (".tif", ".bmp", ".webp", ".jp2"):
        assert cv2.imwrite(str(tmp_path / f"x{suffix}"), picture)
    Image.fromarray(picture).save(tmp_path / "x.gif")
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as archive:
        archive.writestr("IM0001.dcm", b"DICM")
    with tarfile.open(tmp_path / "study.tar", "w") as archive:
        archive.add(tmp_path / "x.gif", "x.gif")
    (tmp_path / "study.tgz").write_bytes(gzip.compress((tmp_path / "study.tar").read_bytes()))
    (tmp_path / "zipped.dcm").write_bytes((tmp_path / "study.zip").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image\n")
    for name, brand in (("IMG_0001.HEIC", b"heic"), ("x.avif", b"avif"), ("clip.mp4", b"isom")):   # ISO media
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1" + brand + bytes(600))
    reasons = {item.path.name: (item.status, item.reason) for item in scan([tmp_path])}
    unpack, export = "unpack it to screen the files it holds", "export the image as one of them"
    assert reasons == {
        "x.tif": (Status.SKIPPED, f"a TIFF image: cxrscreen reads DICOM, JPEG and PNG: {export}"),
        "x.bmp": (Status.SKIPPED, f"a BMP image: cxrscreen reads DICOM, JPEG and PNG: {export}"),
        "x.webp": (Status.SKIPPED, f"a WebP image: cxrscreen reads DICOM, JPEG and PNG: {export}"),
        "x.jp2": (Status.SKIPPED, f"a JPEG 2000 image: cxrscreen reads DICOM, JPEG and PNG: {export}"),
        "x.gif": (Status.SKIPPED, f"a GIF image: cxrscreen reads DICOM, JPEG and PNG: {export}"),
        "study.zip": (Status.SKIPPED, f"a ZIP archive: {unpack}"),
        "study.tar": (Status.SKIPPED, f"a tar archive: {unpack}"),
        "study.tgz": (Status.SKIPPED, f"a gzip-compressed file: {unpack}"),
        "zipped.dcm": (Status.FAILED, f"named .dcm but is not DICOM: a ZIP archive: {unpack}"),
        "notes.txt": (Status.SKIPPED, "not a DICOM, JPEG or PNG file"),
        "IMG_0001.HEIC": (Status.SKIPPED, f"a HEIC/HEIF image (a phone's photograph): cxrscreen reads DICOM, JPEG "
                                          f"and PNG: {export}"),
        "x.avif": (Status.SKIPPED, f"an AVIF image: cxrscreen reads DICOM, JPEG and PNG: {export}"),
        "clip.mp4": (Status.SKIPPED, "an MP4 or QuickTime video (or other ISO media file), not an image"),
    }
    with pytest.raises(InputError, match="a TIFF image"):
        load_unit_image(tmp_path / "x.tif")


def test_a_palette_image_without_its_palette_fails_naming_the_missing_table(tmp_path):
    """load_unit_image raised AttributeError (found by benchmarks/damaged_files.py): not an InputError naming
    the file, which a caller outside the batch pipeline (training's data check, a script) relies on."""
    import pydicom

    ds = pydicom.dcmread(reference_file("OT-PAL-8-face.dcm"), force=True)
    del ds.BluePaletteColorLookupTableData
    ds.save_as(tmp_path / "palette.dcm")
    with pytest.raises(InputError) as info:
        load_unit_image(tmp_path / "palette.dcm")
    assert info.value.tag == "(0028,1203) BluePaletteColorLookupTableData" and info.value.step == "normalise"
    assert "colour palette cannot be applied" in info.value.cause and str(tmp_path / "palette.dcm") in str(info.value)


def test_text_file_named_dcm(tmp_path):
    (tmp_path / "x.dcm").write_text("this is not an image\n" * 10)
    out = _outcome(tmp_path / "x.dcm")
    assert out.status is Status.FAILED and "not DICOM" in out.reason and out.step == "discover"


def test_dicom_without_pixel_data(tmp_path):
    from cxrscreen.testing import make_text_sr

    out = read_record(save(make_text_sr(seed="sr"), tmp_path / "sr.dcm"))
    assert out.status is Status.SKIPPED and "no pixel data" in out.reason and "(7FE0,0010)" in out.tag
    assert "Basic Text SR" in out.reason


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_listed_never_opened_and_a_dangling_link_names_its_target(tmp_path):
    """A FIFO was listed as an 'empty file (0 bytes): the transfer failed or is still in progress'
    (only its size of 0 kept it from being opened, which blocks); a symbolic link whose target is
    missing as 'cannot stat'."""
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "dangling.dcm").symlink_to("/nonexistent/IM0001.dcm")
    outcomes = {Path(o.path).name: o for o in scan([tmp_path])}
    pipe, dangling = outcomes["pipe.dcm"], outcomes["dangling.dcm"]
    assert (pipe.status, pipe.step) == (Status.SKIPPED, "discover")
    assert pipe.reason == "a FIFO (named pipe), not a regular file: not opened"
    assert (dangling.status, dangling.step) == (Status.FAILED, "read")
    assert dangling.reason == "a symbolic link to /nonexistent/IM0001.dcm, which does not exist"
    assert ingest.not_regular(tmp_path / "pipe.dcm") and ingest.not_regular(tmp_path / "dangling.dcm")
    assert ingest.not_regular(tmp_path) == ingest.not_regular(tmp_path / "gone") == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_permissions(tmp_path, chest_pixels):
    path = save(make_dicom(chest_pixels), tmp_path / "locked.dcm")
    path.chmod(0)
    try:
        out = _outcome(path)
    finally:
        path.chmod(0o644)
    assert out.status is Status.FAILED and "permission denied" in out.reason


def test_unreadable_file_reported_when_open_is_refused(tmp_path, chest_pixels, monkeypatch):
    """As root chmod cannot refuse a read; make open() refuse it as the OS would for another user."""
    path = save(make_dicom(chest_pixels), tmp_path / "locked.dcm")
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    out = read_record(path)
    assert out.status is Status.FAILED and "permission denied" in out.reason and out.step == "read"


@pytest.mark.parametrize("rows, columns", [(60000, 60000), (10, 4000)])
def test_absurd_dimensions(tmp_path, rows, columns):
    ds = make_dicom(np.zeros((64, 64), np.uint16))
    ds.Rows, ds.Columns = rows, columns
    out = read_record(save(ds, tmp_path / "huge.dcm"))
    assert out.status is Status.FAILED and "absurd image dimensions" in out.reason
    assert out.step == "validate" and "(0028,0010)" in out.tag
    # the header was read: the failure stays with its study, which the summary can then name
    assert out.study_uid == str(ds.StudyInstanceUID) and out.patient_id == str(ds.PatientID)


def test_a_walk_over_bad_files_continues_and_writes_nothing(tmp_path, chest_pixels):
    save(make_dicom(chest_pixels, seed="good"), tmp_path / "good.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "x.dcm").write_text("hello")
    before = sorted(p.name for p in tmp_path.iterdir())
    items = list(scan([tmp_path]))
    assert len(items) == 3
    assert sum(isinstance(i, Radiograph) for i in items) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bundled_samples_scan_as_documented():
    items = {p.path.relative_to(ROOT / "samples").as_posix(): p for p in scan([ROOT / "samples"])}
    scored = sorted(k for k, v in items.items() if isinstance(v, Radiograph))
    assert len(scored) == 6
    assert items["study3_pa_and_lateral/IM0002.dcm"].status is Status.SKIPPED
    assert items["study7_not_chest_deflated/IM0001.dcm"].status is Status.SKIPPED
    assert items["study2_dx_rescale_rle/SR0001.dcm"].status is Status.SKIPPED
    syntaxes = {v.transfer_syntax for v in items.values() if isinstance(v, Radiograph)}
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"} <= syntaxes


def _files_read_by(monkeypatch, work):
    """``read_record`` replaced by one that does ``work`` and records which thread read each file."""
    import threading

    read_in = {}

    def read(path, selection=Selection()):
        work()
        read_in[Path(path).name] = threading.current_thread()
        return FileOutcome(Path(path), Status.SKIPPED, "read", step="discover")

    monkeypatch.setattr(ingest, "read_record", read)
    return read_in


def _folder_of(tmp_path, n: int) -> Path:
    for i in range(n):
        (tmp_path / f"{i:03d}.dcm").write_bytes(b"x")
    return tmp_path


def test_a_scan_whose_reads_wait_reads_in_threads_in_the_order_found(tmp_path, monkeypatch):
    """On a network share each header read waits for round trips: after SCAN_PROBE reads that waited more
    than they computed, the rest are read SCAN_THREADS at a time, and still yielded in the order found."""
    import threading
    import time

    read_in = _files_read_by(monkeypatch, lambda: time.sleep(0.01))
    items = list(scan([_folder_of(tmp_path, 60)]))
    names = [f"{i:03d}.dcm" for i in range(60)]
    assert [item.path.name for item in items] == names
    first = ingest.SCAN_PROBE
    assert all(read_in[name] is threading.main_thread() for name in names[:first])
    assert all(read_in[name].name.startswith("cxr-scan") for name in names[first:])
    assert len({read_in[name] for name in names[first:]}) > 1
    # one thread asked for: one at a time, in this one
    read_in.clear()
    assert [item.path.name for item in scan([tmp_path], threads=1)] == names
    assert set(read_in.values()) == {threading.main_thread()}


def test_a_scan_whose_reads_compute_reads_one_at_a_time(tmp_path, monkeypatch):
    """Files cached on a local disk: the reads compute (parsing), and threads would only contend for the
    interpreter (8 of them made such a scan twice as slow on 2 cores)."""
    import threading
    import time

    def compute():
        until = time.thread_time() + 0.002
        while time.thread_time() < until:
            pass

    read_in = _files_read_by(monkeypatch, compute)
    assert len(list(scan([_folder_of(tmp_path, 40)]))) == 40
    assert set(read_in.values()) == {threading.main_thread()}


def test_a_walk_whose_listings_wait_lists_ahead_in_threads_and_walks_the_same(tmp_path, monkeypatch):
    """A folder per study on a network share: after WALK_PROBE listings that waited, the next folders are
    listed ahead in threads; the walk is the same as one folder at a time: order, links walked once,
    hidden and output folders left out, a folder the caller prunes not entered."""
    import threading
    import time

    for patient in range(4):
        for study in range(5):
            folder = tmp_path / "export" / f"P{patient}" / f"S{study}"
            folder.mkdir(parents=True)
            (folder / "IM1.dcm").write_bytes(b"x")
            (folder / ".hidden").write_bytes(b"x")
    (tmp_path / "export" / ".snapshot" / "S9").mkdir(parents=True)
    (tmp_path / "export" / "P1" / "reports").mkdir()
    (tmp_path / "export" / "P1" / "reports" / ".cxrscreen-state.json").write_text("{}")
    (tmp_path / "export" / "P2" / "again").symlink_to(tmp_path / "export" / "P0", target_is_directory=True)
    (tmp_path / "export" / "P3" / "skip-me").mkdir()

    def walked(**kwargs):
        errors, left_out, out = [], [], []
        for folder, dirs, files in ingest.walk(tmp_path / "export", errors, left_out=left_out, **kwargs):
            out.append((os.path.relpath(folder, tmp_path), list(dirs), files))
            dirs[:] = [d for d in dirs if d != "skip-me"]
        return out, errors, left_out

    one_at_a_time = walked(threads=1)
    listed_in, listing = {}, ingest._listing

    def slow_listing(folder):
        time.sleep(0.005)
        listed_in[folder] = threading.current_thread().name
        return listing(folder)

    monkeypatch.setattr(ingest, "_listing", slow_listing)
    assert walked() == one_at_a_time
    folders, errors, left_out = one_at_a_time
    assert folders[0] == ("export", ["P0", "P1", "P2", "P3"], []) and not errors
    assert [f for f, _, _ in folders].count(os.path.join("export", "P0", "S0")) == 1     # the link: once
    assert len(folders) == 1 + 4 + 20 and not any("skip-me" in f or "reports" in f for f, _, _ in folders)
    assert len(left_out) == 20 + 1              # the hidden files, the hidden folder
    assert sum(name.startswith("cxr-walk") for name in listed_in.values()) > 10
    assert not any("skip-me" in folder or "snapshot" in folder for folder in listed_in)      # never listed


def test_read_ahead_keeps_order_raises_at_the_item_and_stops_early():
    import threading
    import time

    from cxrscreen.ingest import read_ahead

    def slow_square(n):
        time.sleep(0.002 * (n % 3))
        if n == 7:
            raise ValueError("seven")
        return n * n

    assert list(read_ahead(slow_square, range(7), threads=3, ahead=4, name="t")) == [(n, n * n) for n in range(7)]
    got = []
    with pytest.raises(ValueError, match="seven"):
        for n, square in read_ahead(slow_square, range(20), threads=3, ahead=4, name="t"):
            got.append(n)
    assert got == list(range(7))
    started = []

    def record(n):
        started.append(n)
        return n

    stream = read_ahead(record, range(1000), threads=2, ahead=5, name="t")
    assert next(stream) == (0, 0)
    stream.close()        # the pool is shut down: what was queued is not run
    assert len(started) <= 7 and not any(t.name.startswith("t_") for t in threading.enumerate())


def test_a_png_whose_header_promises_a_decompression_bomb_fails_before_it_is_decoded(tmp_path):
    """9,600 x 9,600 is within MAX_PIXELS but over Pillow's limit, whose warning fails the file (only the header
    exists here: a decoder would fail on it anyway, but not as an absurd size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9600, 9600, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(InvalidImageError, match="absurd image size") as failure:
        load_unit_image(path)
    assert failure.value.step == "validate"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_or_png_is_read_upright_as_its_exif_orientation_says(tmp_path, orientation):
    """OpenCV's IMREAD_UNCHANGED ignores the EXIF Orientation that every viewer obeys: a phone's photograph of a
    film, held upright and stored sideways with Orientation 6, was scored (and shown in its report) sideways,
    while the colour look at selection (IMREAD_COLOR) turned it upright."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(orientation)
    stored = np.zeros((120, 80), np.uint8)
    stored[:, :30], stored[:20] = 200, 90                          # no turn or mirror maps it onto itself
    stored = np.clip(stored.astype(int) + rng.integers(0, 40, stored.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for name, picture in (("grey.png", Image.fromarray(stored)),
                          ("colour.png", Image.fromarray(np.dstack([stored, stored // 2, 255 - stored]))),
                          ("grey.jpg", Image.fromarray(stored))):
        picture.save(tmp_path / name, exif=exif.tobytes(), **({"quality": 95} if name.endswith("jpg") else {}))
        with Image.open(tmp_path / name) as img:
            shown = np.asarray(ImageOps.exif_transpose(img).convert("L"), dtype=np.float32) / 255
        unit = load_unit_image(tmp_path / name)
        assert unit.shape == shown.shape, name
        np.testing.assert_allclose(unit, shown, atol=0.01 if name.endswith("png") else 0.05, err_msg=name)
    upright = ingest.read_display_image(tmp_path / "colour.png")
    assert upright.shape[:2] == ingest.read_display_image(tmp_path / "colour.png", reduced=True).shape[:2] == \
        shown.shape
