"""RLE Lossless frames decoded a segment at a time by pylibjpeg-rle: a pydicom decoding plugin.

pydicom tries pylibjpeg-rle's frame decoder first. Version 2.2 checks a run against the end of the frame as if a
segment's bytes lay next to each other, not a sample apart, so a segment of a 16- or 32-bit frame that runs past
the frame (damaged, or the byte of padding some encoders add) writes past its end, and it panics: Rust writes
lines to stderr that name no file (3, or 60 with RUST_BACKTRACE=1), and pyo3's PanicException, a BaseException,
ends pydicom's loop over its decoders. pydicom's own RLE decoder decodes in Python, a run at a time, and reads the
segment count its header gives, which pylibjpeg-rle ignores.

This plugin reads the header as the standard says, or where that does not hold as pylibjpeg-rle does
(:func:`segments`), decodes each segment with pylibjpeg-rle's ``decode_segment``, which does not panic (but on an
empty segment, which increasing offsets rule out), and lays the segments out as pydicom's own decoder does (planar
configuration 1, each sample's bytes least significant first). Through pydicom, 2.9 ms a 742 x 1024 16-bit frame
against pylibjpeg-rle's frame decoder's 1.9 and pydicom's own 23; 29 ms a 2500 x 2048 frame against 21 and 114.
A segment one byte long is cut to size (the padding some encoders add); one longer than that, or one that ends
in the middle of a run, fails the frame: a segment read from the wrong place (an offset in the header changed) or
with a run's length changed decodes so, the picture garbled. Of 2,000 copies of the RLE sample with bytes of
its header changed, the 49 that pydicom's decoder decoded to a changed picture each ran more than 8 bytes over,
and none it decoded to the sample's picture was over at all (``benchmarks/fuzz_codestreams.py``); pylibjpeg-rle
decoded some segments more than a byte over without a word, which now fail as well.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
from pydicom.uid import RLELossless

LABEL = "cxrscreen"
DECODER_DEPENDENCIES = {RLELossless: ("pylibjpeg-rle",)}

_registering = threading.Lock()


def is_available(uid: str) -> bool:
    """pydicom's question of a plugin: whether it decodes ``uid`` here (pylibjpeg-rle installed)."""
    try:
        from rle import rle
    except ImportError:
        return False
    return uid == RLELossless and hasattr(rle, "decode_segment")


def plugin() -> str | None:
    """The label to pass pydicom as ``decoding_plugin`` for RLE Lossless, the plugin added to pydicom's RLE decoder
    where it is not there; None where pylibjpeg-rle is not installed (pydicom's own decoder then decodes)."""
    from pydicom.pixels.decoders import RLELosslessDecoder

    with _registering:          # pydicom's add_plugin is not thread-safe, and frames are decoded in threads
        if LABEL not in RLELosslessDecoder.available_plugins:
            try:
                RLELosslessDecoder.add_plugin(LABEL, (__name__, "decode_frame"))
            except ValueError:  # added before, and not available
                pass
        return LABEL if LABEL in RLELosslessDecoder.available_plugins else None


class DamagedRle(ValueError):
    """An RLE frame that cannot be decoded to its picture, with what is wrong in the words of the summary."""


def segments(frame: bytes, bytes_per_sample: int, samples: int) -> list[bytes]:
    """The ``samples`` x ``bytes_per_sample`` encoded segments of an RLE ``frame``: at the offsets its header
    counts, as the standard and pydicom's decoder read them, or where those do not hold, at its non-zero
    offsets, as pylibjpeg-rle reads them (a damaged count); each way the first at 64, increasing within the
    frame, and as many as whole samples."""
    if len(frame) < 64:
        raise DamagedRle(f"the RLE frame is {len(frame)} bytes, shorter than its 64-byte header")
    count = int.from_bytes(frame[:4], "little")
    listed = struct.unpack("<15I", frame[4:64])
    for offsets in (list(listed[:count]) if 1 <= count <= 15 else [], [offset for offset in listed if offset]):
        ends = offsets[1:] + [len(frame)]
        if offsets[:1] == [64] and all(start < end for start, end in zip(offsets, ends)) and \
                len(offsets) // bytes_per_sample == samples:
            return [frame[start:end] for start, end in list(zip(offsets, ends))[:samples * bytes_per_sample]]
    shown = ", ".join(str(offset) for offset in listed if offset) or "none"
    raise DamagedRle(f"the RLE header counts {count:,} segments at offsets {shown}, where {samples} sample(s) of "
                     f"{8 * bytes_per_sample} bits need {samples * bytes_per_sample}, the first at 64 and each "
                     f"after the last within the frame's {len(frame):,} bytes: the header is damaged")


def decode(frame: bytes, rows: int, columns: int, samples: int, bits_allocated: int,
           segment_order: str = ">") -> np.ndarray:
    """An RLE ``frame`` decoded into bytes (a flat uint8 array) laid out as pydicom's own RLE decoder lays them
    out."""
    from rle.rle import decode_segment

    if bits_allocated % 8 or not 8 <= bits_allocated <= 64:
        raise DamagedRle(f"RLE Lossless holds whole bytes a sample, not {bits_allocated} bits allocated")
    bytes_per_sample, pixels = bits_allocated // 8, rows * columns
    # each sample's bytes least significant first, as pydicom's decoder lays them: 16-bit samples shifted into
    # place (0.1 ms a 742 x 1024 frame; a strided copy of each byte, as wider samples take, 0.4 ms), each segment
    # decoded and placed before the next is (a segment more alive at once cost 1 ms more in page faults)
    decoded = np.empty((samples, pixels, bytes_per_sample), np.uint8)
    wide = decoded.view(np.uint16).reshape(samples, pixels) if bytes_per_sample == 2 else None
    for number, encoded in enumerate(segments(frame, bytes_per_sample, samples)):
        try:
            segment = decode_segment(encoded)
        except ValueError:
            raise DamagedRle(f"RLE segment {number + 1} ends in the middle of a run: its data was cut or "
                             "changed") from None
        if not pixels <= len(segment) <= pixels + 1:      # one byte over: an encoder's padding
            raise DamagedRle(f"an RLE segment decodes to {len(segment):,} bytes, not the {pixels:,} of Rows x "
                             f"Columns: its header or its runs were changed, and the picture would be garbled")
        sample, byte = divmod(number, bytes_per_sample)
        significance = bytes_per_sample - 1 - byte if segment_order == ">" else byte     # 0: least significant
        plane = np.frombuffer(segment, np.uint8, count=pixels)
        if wide is None:
            decoded[sample, :, significance] = plane
        elif byte == 0:
            np.left_shift(plane, 8 * significance, out=wide[sample], dtype=np.uint16)
        else:
            wide[sample] |= plane if significance == 0 else plane.astype(np.uint16) << 8
        del segment, plane
    return decoded.reshape(-1)


def decode_frame(src: bytes, runner) -> np.ndarray:
    """pydicom's plugin interface: one encoded frame and the runner that knows its attributes."""
    decoded = decode(src, runner.rows, runner.columns, runner.samples_per_pixel, runner.bits_allocated,
                     runner.get_option("rle_segment_order", ">"))
    runner.set_option("planar_configuration", 1)
    return decoded
