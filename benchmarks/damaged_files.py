"""Damaged inputs: every DICOM file pydicom and pydicom-data ship (about 150: every transfer syntax, odd
headers, adult radiographs), plus the bundled samples, the HTJ2K file in tests/data and the PA sample as
Encapsulated Uncompressed Explicit VR Little Endian, damaged as transfers and disks damage files
(:func:`cxrscreen.testing.damage`), each read as ``batch`` and ``watch`` read a file: its header
(:func:`cxrscreen.ingest.read_record`), then its pixels (:func:`cxrscreen.normalise.load_unit_image`).
Each compressed single-frame file is also written whole around its frame cut short
(:func:`cxrscreen.testing.cut_frame`, a seed of its own), and that frame decoded whatever the selection
says: a decoder that takes a cut frame for a whole one makes the run exit 1 too.

    python benchmarks/damaged_files.py [--seeds 1 2 3] [--per-file 5] [--max-mb 8]

Prints, per kind of damage, how the files ended (a radiograph decoded, skipped, failed at the header or
at decoding), and every file for which something other than a per-file outcome came out (an exception
that would stop a batch): the run exits 1 when there is one. Each file is read in this process, so a
decoder that crashes the interpreter (a segmentation fault) ends the run at that file, which it prints
before reading. Not a timing: a robustness check of the decoders cxrscreen installs, seeded, for
``tests/test_ingest.py``'s small version to lean on. Needs no ../shared.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sources(max_bytes: int) -> list[Path]:
    from pydicom.data import get_testdata_files

    files = [Path(f) for f in get_testdata_files("*")]
    files += sorted((ROOT / "samples").rglob("*")) + sorted((ROOT / "tests" / "data").glob("*.dcm"))
    return [f for f in files if f.is_file() and 200 <= f.stat().st_size <= max_bytes
            and f.suffix not in (".py", ".md", ".txt", ".json", ".zip", ".gz", ".bz2")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-file", type=int, default=5, help="damaged copies of each file per seed")
    parser.add_argument("--max-mb", type=float, default=8.0, help="leave out larger files")
    args = parser.parse_args()

    from cxrscreen.errors import InputError
    from cxrscreen.ingest import decode_first_frame, read_dicom, read_record
    from cxrscreen.normalise import load_unit_image
    from cxrscreen.records import FileOutcome, Radiograph
    from cxrscreen.testing import cut_frame, damage

    files = sources(int(args.max_mb * 1e6))
    table: Counter = Counter()
    decoders: Counter = Counter()
    escaped: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        # a syntax no shipped file has: the PA sample as Encapsulated Uncompressed Explicit VR Little Endian
        import pydicom

        from cxrscreen.testing import encapsulate_uncompressed

        plain = pydicom.dcmread(ROOT / "samples" / "study3_pa_and_lateral" / "IM0001.dcm")
        generated = Path(folder) / "encapsulated_uncompressed.dcm"
        encapsulate_uncompressed(plain).save_as(generated, enforce_file_format=True)
        files.append(generated)
        for seed in args.seeds:
            rng, cuts = random.Random(seed), random.Random(-seed)    # the cuts do not change the other damage
            for source in files:
                whole = source.read_bytes()
                copies = [damage(whole, rng) for _ in range(args.per_file)]
                cut = cut_frame(whole, cuts)        # and, of a compressed one, the frame of the whole file cut short
                copies += [(cut, "frame cut")] if cut else []
                for k, (data, how) in enumerate(copies):
                    path = Path(folder) / f"{seed}_{source.stem}_{k}_{how.replace(' ', '_')}{source.suffix}"
                    path.write_bytes(data)
                    print(f"\r{path.name[:70]:70s}", end="", file=sys.stderr, flush=True)
                    try:
                        item = read_record(path)
                        if isinstance(item, FileOutcome):
                            ended = f"{item.status.value} at {item.step or '?'}"
                        elif not isinstance(item, Radiograph):
                            raise TypeError(f"read_record gave {type(item).__name__}")
                        else:
                            try:
                                load_unit_image(path, item.kind)
                                ended = "decoded"
                            except InputError as exc:
                                ended = f"failed at {exc.step}"
                    except BaseException as exc:      # what would stop a batch
                        if isinstance(exc, KeyboardInterrupt):
                            raise
                        ended = "ESCAPED"
                        escaped.append(f"{source.name} seed {seed} copy {k} ({how}): {type(exc).__name__}: "
                                       f"{str(exc)[:200]}")
                    table[how, ended] += 1
                    if how == "frame cut":      # decoded whatever the selection says: each syntax's decoders
                        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                        try:
                            decode_first_frame(read_dicom(path))
                            decoders[syntax.name, "decoded (cut frame taken whole)"] += 1
                        except InputError:
                            decoders[syntax.name, "refused"] += 1
                    path.unlink()
    print("\r" + " " * 70, file=sys.stderr)
    hows = sorted({how for how, _ in table})
    endings = sorted({ended for _, ended in table})
    frame_cuts = sum(n for (how, _), n in table.items() if how == "frame cut")
    print(f"{len(files)} files x {len(args.seeds)} seeds x {args.per_file} copies = "
          f"{sum(table.values()) - frame_cuts} damaged files, and {frame_cuts} whole files with a frame cut short")
    print(f"| damage | {' | '.join(endings)} |")
    print(f"|---|{'---|' * len(endings)}")
    for how in hows:
        print(f"| {how} | {' | '.join(str(table[how, e]) for e in endings)} |")
    print("\nWhole files with their frame cut short, decoded whatever the selection, per transfer syntax:")
    print("| transfer syntax | refused | decoded (cut frame taken whole) |\n|---|---|---|")
    for syntax in sorted({name for name, _ in decoders}):
        print(f"| {syntax} | {decoders[syntax, 'refused']} | {decoders[syntax, 'decoded (cut frame taken whole)']} |")
    for line in escaped:
        print("ESCAPED:", line)
    print(f"escaped: {len(escaped)}")
    return 1 if escaped or any(ended != "refused" for _, ended in decoders) else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
