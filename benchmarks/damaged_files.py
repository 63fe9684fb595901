"""Damaged inputs: every DICOM file pydicom and pydicom-data ship (about 150: every transfer syntax, odd
headers, adult radiographs), plus the bundled samples, the HTJ2K file in tests/data and the PA sample as
Encapsulated Uncompressed Explicit VR Little Endian, damaged as transfers and disks damage files
(:func:`cxrscreen.testing.damage`), each read as ``batch`` and ``watch`` read a file: its header
(:func:`cxrscreen.ingest.read_record`), then its pixels (:func:`cxrscreen.normalise.load_unit_image`).

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
    from cxrscreen.ingest import read_record
    from cxrscreen.normalise import load_unit_image
    from cxrscreen.records import FileOutcome, Radiograph
    from cxrscreen.testing import damage

    files = sources(int(args.max_mb * 1e6))
    table: Counter = Counter()
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
            rng = random.Random(seed)
            for source in files:
                whole = source.read_bytes()
                for k in range(args.per_file):
                    data, how = damage(whole, rng)
                    path = Path(folder) / f"{seed}_{source.stem}_{k}_{how}{source.suffix}"
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
                    path.unlink()
    print("\r" + " " * 70, file=sys.stderr)
    hows = sorted({how for how, _ in table})
    endings = sorted({ended for _, ended in table})
    print(f"{len(files)} files x {len(args.seeds)} seeds x {args.per_file} copies = {sum(table.values())} damaged files")
    print(f"| damage | {' | '.join(endings)} |")
    print(f"|---|{'---|' * len(endings)}")
    for how in hows:
        print(f"| {how} | {' | '.join(str(table[how, e]) for e in endings)} |")
    for line in escaped:
        print("ESCAPED:", line)
    print(f"escaped: {len(escaped)}")
    return 1 if escaped else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
