"""Labeled data for training: listing, patient-level split, streaming batches with augmentation.

Every image goes through :func:`cxrscreen.normalise.load_model_input`, the same
function screening uses, so the model sees the same intensities in both.
Training batches augment between its two halves: resize, augment, then the
card's equalisation (CLAHE when asked), so what the model learns from is
always something screening can show it.

Augmentation (training batches only) covers what differs between sites and
exports. Two levels (``AUGMENT_LEVELS``): ``standard`` is small rotations
(+-7 deg), shifts (+-6 %), zoom (0.9-1.1), brightness (+-0.08), contrast
(0.8-1.25) and gamma (0.75-1.33); ``strong`` widens those ranges and adds what
differs between acquisitions rather than between patients: a random re-window
(clipping the darkest/brightest few percent, as a different VOI LUT would),
blur or sharpening (detector MTF, downscaling), and quantum-like noise.
**No horizontal flips**:
a chest radiograph is not left-right symmetric (heart, aortic knob, gastric
bubble, side markers), and a flipped film is an anatomy the model will never
be shown in practice.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cxrscreen.calibrate import (CLASSES, class_folders, identical_images, joined_by_shared_images, patient_from_path,
                                 pattern_finds_nobody, read_labeled_csv, relative_name)
from cxrscreen.errors import CxrError
from cxrscreen.ingest import dataset_patient_key, discover, not_screenable, read_dicom, sniff
from cxrscreen.normalise import (PreprocessSpec, equalize_input, load_model_input, load_unit_image,
                                 normalise_dataset, pixels_digest, resize_to_input)
from cxrscreen.records import FileKind, FileOutcome

log = logging.getLogger("training")

_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^(NORMAL2-IM-\d+)"), re.compile(r"^(IM-\d+)"))


@dataclass(frozen=True)
class Example:
    path: Path
    label: int            # 1 = PNEUMONIA
    patient: str
    patient_from: str = field(default="", compare=False)    # csv, pattern, dicom, name or file (list_examples)
    pixels: str = field(default="", compare=False)          # digest of the decoded image (list_examples)


def patient_id(path: Path | str) -> str:
    """Patient id from a Kermany file name (``person123_bacteria_4.jpeg`` -> ``person123``); '' for another
    name."""
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return ""


def split_folder(data_dir: Path | str, name: str) -> Path | None:
    """``data_dir``'s ``train`` or ``test`` folder, its name in any case (``Train/``), as the class folders
    are found (:func:`cxrscreen.calibrate.class_folders`); None when there is none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None
    return next((p for p in sorted(data_dir.iterdir()) if p.name.lower() == name and p.is_dir()), None)


def list_examples(source: Path | str, excluded: list[dict] | None = None, *, workers: int = 2,
                  patient_pattern=None, refuse_unmatched: bool = True) -> list[Example]:
    """Examples from ``DIR/{NORMAL,PNEUMONIA}/**`` (JPEG/PNG/DICOM, any depth) or a CSV of ``path,label``.

    Every image is decoded once here, as training and scoring will decode it: a file that is not an
    image, or cannot be read or decoded (truncated, corrupt), is left out, with a warning, and appended
    to ``excluded`` as ``{"path", "reason"}`` for the card. Before, a non-image vanished without a word,
    and a corrupt image stopped the run when its batch came, minutes or an hour in.

    An example's patient, which the validation split keeps on one side: the CSV's ``patient`` column where
    it names one, else what ``patient_pattern`` (a compiled regular expression, ``--patient-pattern``) finds
    in the file's path relative to ``source`` or to the CSV's folder
    (:func:`cxrscreen.calibrate.patient_from_path`, as calibration reads it), else the DICOM Issuer of Patient
    ID and Patient ID (as calibration keys a patient), else :func:`patient_id` of a Kermany file name, else
    the file itself (``file:`` and its path relative to ``source``: its own patient, warned of; before, its
    name without the suffix, so that same-named files of different folders, ``P1/2026-01-03.png`` and
    ``P2/2026-01-03.png``, were one "patient"). ``Example.patient_from`` says which (``csv``, ``pattern``,
    ``dicom``, ``name``, ``file``). A pattern that finds no
    patient in any file is refused (:class:`cxrscreen.errors.UsageError`), unless not ``refuse_unmatched``
    (a test split listed with the pattern training was given, once the model is trained: there the patients
    are only counted); files it misses are warned of.
    """
    source = Path(source)
    candidates: list[Example] = []
    left_out: list[dict] = []
    if source.is_file() and source.suffix.lower() == ".csv":
        candidates = [Example(path, label, patient.strip()) for path, label, patient in read_labeled_csv(source)]
    else:
        for value, folder in enumerate(check_labeled(source)):
            for path in discover([folder]):
                if isinstance(path, FileOutcome):     # a folder it could not list, a hidden or temporary file
                    left_out.append({"path": str(path.path), "reason": path.reason})
                    continue
                try:
                    kind = sniff(path)
                except CxrError as exc:
                    left_out.append({"path": str(path), "reason": exc.cause})
                    continue
                if kind is None:
                    left_out.append({"path": str(path), "reason": not_screenable(path)})
                else:
                    candidates.append(Example(path, value, ""))
    root = source.parent if source.is_file() else source      # the paths a pattern reads are relative to it

    def checked(example: Example) -> tuple[str, Example]:
        """(why it is left out, or ''; the example with its patient)."""
        try:
            kind = sniff(example.path)
            if kind is FileKind.DICOM:      # read once: the pixels to check, the header for the patient
                dataset = read_dicom(example.path)
                unit = normalise_dataset(dataset)
            else:
                unit = load_unit_image(example.path, kind)
        except CxrError as exc:
            return exc.cause, example
        except Exception as exc:       # a decoder's own error: this file is left out, the run goes on
            return f"{type(exc).__name__}: {exc}", example
        example = replace(example, pixels=pixels_digest(unit))
        if example.patient:
            return "", replace(example, patient_from="csv")
        found = patient_pattern and patient_from_path(patient_pattern, example.path, root)
        if found:
            return "", replace(example, patient=found, patient_from="pattern")
        named = dataset_patient_key(dataset) if kind is FileKind.DICOM else ""
        if named:
            return "", replace(example, patient=named, patient_from="dicom")
        named = patient_id(example.path)
        if named:
            return "", replace(example, patient=named, patient_from="name")
        return "", replace(example, patient=f"file:{relative_name(example.path, root)}", patient_from="file")

    results: list[tuple[str, Example]] = []
    every = max(100, -(-len(candidates) // 10))     # at most ten lines: a site's set can take many minutes
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cxr-check") as pool:
        for result in pool.map(checked, candidates):
            results.append(result)
            if len(results) % every == 0 or len(results) == len(candidates):
                log.info("read %d/%d images of %s", len(results), len(candidates), source)
    left_out += [{"path": str(e.path), "reason": why} for why, e in results if why]
    for item in left_out:
        log.warning("left out %s: %s", item["path"], item["reason"])
    if excluded is not None:
        excluded.extend(left_out)
    examples = [e for why, e in results if not why]
    _warn_of_identical_images(examples)
    if patient_pattern and examples:
        _check_pattern_found(patient_pattern, examples, root, refuse_unmatched)
    alone = patients_from(examples).get("file", 0)
    if alone:
        log.warning("%d of %d files name no patient (no CSV patient column, --patient-pattern match, DICOM Patient "
                    "ID or Kermany file name): each is its own patient, and the validation split (or a bootstrap "
                    "by patient) takes a patient's other images as another's; give --patient-pattern or a CSV "
                    "patient column", alone, len(examples))
    return examples


def _warn_of_identical_images(examples: list[Example]) -> None:
    """Warn of identical images that are keyed to different patients (taken as one patient: :func:`joined_patients`)
    or labelled both classes (a contradiction in the labels)."""
    found = identical_images((e.pixels, e.path, e.patient, e.label) for e in examples)
    for what, key in (("are keyed to different patients: taken as one patient (kept on one side of a validation "
                       "split, resampled whole by a bootstrap)", "across_patients"),
                      ("are labelled both NORMAL and PNEUMONIA (check those labels)", "labelled_both")):
        if found[key]:
            log.warning("%d groups of identical images %s, e.g. %s", len(found[key]), what,
                        " and ".join(found[key][0][:2]))


def check_labeled(source: Path | str) -> list[Path]:
    """Refuse (SystemExit, naming it) what :func:`list_examples` cannot read: neither a folder holding NORMAL/
    and PNEUMONIA/ nor a CSV of path,label (a CSV's rows are read and checked too). For a test split, checked
    before training: it is listed after, and a wrong one stopped the run there. Returns a folder's class
    folders (NORMAL first; :func:`cxrscreen.calibrate.class_folders`), [] for a CSV."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        read_labeled_csv(source)
        return []
    folders = class_folders(source) if source.is_dir() else None
    if folders is None:
        raise SystemExit(f"{source} must hold NORMAL/ and PNEUMONIA/ folders (names in any case), or be a CSV "
                         "of path,label")
    return folders


def patients_from(examples: list[Example]) -> dict[str, int]:
    """How many examples had their patient from each source (``csv``, ``pattern``, ``dicom``, ``name``,
    ``file``)."""
    return dict(sorted(Counter(e.patient_from for e in examples if e.patient_from).items()))


def _check_pattern_found(pattern, examples: list[Example], root: Path, refuse: bool) -> None:
    """Refuse (``refuse``) a pattern that found no patient in any file; warn of the files it missed (counted
    by where their patient came from instead)."""
    counts = patients_from(examples)
    missed = counts.get("dicom", 0) + counts.get("name", 0) + counts.get("file", 0)
    if refuse and not counts.get("pattern") and missed:
        unnamed = [e.path for e in examples if e.patient_from in ("dicom", "name", "file")]
        raise pattern_finds_nobody(pattern, unnamed, root, step="training")
    if missed:
        log.warning("--patient-pattern %r found no patient in the paths of %d of %d files: their patient is the "
                    "DICOM Patient ID (%d), a Kermany file name (%d) or the file itself (%d)", pattern.pattern, missed,
                    len(examples), counts.get("dicom", 0), counts.get("name", 0), counts.get("file", 0))


def patient_split(examples: list[Example], val_fraction: float = 0.15, seed: int = 1337):
    """Split by patient (no patient on both sides), stratified by class, seeded. Patients that share an
    identical image (the same picture exported twice, under two patient IDs or names) are kept together, as
    one: otherwise that image would be trained on and validated on."""
    joined = joined_patients(examples)
    by_patient: dict[str, list[Example]] = {}
    for ex, patient in zip(examples, joined):
        by_patient.setdefault(patient, []).append(ex)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    totals = [sum(1 for e in examples if e.label == c) for c in (0, 1)]
    taken = [0, 0]
    val_patients = set()
    for patient in patients:
        label = max(e.label for e in by_patient[patient])
        if taken[label] < val_fraction * totals[label]:
            val_patients.add(patient)
            taken[label] += len(by_patient[patient])
    train = [e for e, patient in zip(examples, joined) if patient not in val_patients]
    val = [e for e, patient in zip(examples, joined) if patient in val_patients]
    return train, val


def joined_patients(examples: list[Example]) -> list[str]:
    """Each example's patient; a patient that shares an identical image with others, directly or through
    others, given the first (sorted) of them (:func:`cxrscreen.calibrate.joined_by_shared_images`; examples
    read from a split file have no digest). The groups the validation split keeps whole and a bootstrap by
    patient resamples."""
    together = joined_by_shared_images((ex.pixels, ex.patient) for ex in examples)
    return [together.get(e.patient, e.patient) for e in examples]


def write_split(path: Path, **splits: list[Example]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "path", "label", "patient"])
        for name, items in splits.items():
            for ex in items:
                writer.writerow([name, str(ex.path), CLASSES[ex.label], ex.patient])


def read_split(path: Path) -> dict[str, set[tuple[str, str]]]:
    """A split file as ``{split: {(file name, label), ...}}`` (file names: the paths depend on the cwd)."""
    out: dict[str, set[tuple[str, str]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            out.setdefault(row["split"], set()).add((Path(row["path"]).name, row["label"]))
    return out


def split_examples(path: Path, split: str) -> list[Example]:
    """The examples of one side of a split file (paths as written at training time)."""
    with open(path, newline="") as handle:
        return [Example(Path(row["path"]), CLASSES.index(row["label"]), row["patient"])
                for row in csv.DictReader(handle) if row["split"] == split]


def split_names(**splits: list[Example]) -> dict[str, set[tuple[str, str]]]:
    """The same shape as :func:`read_split`, from lists of examples."""
    return {name: {(ex.path.name, CLASSES[ex.label]) for ex in items} for name, items in splits.items()}


def class_weights(examples: list[Example]) -> dict[int, float]:
    """Inverse-frequency weights (balanced): n / (2 * n_class)."""
    counts = np.bincount([e.label for e in examples], minlength=2)
    return {c: float(len(examples) / (2.0 * counts[c])) for c in (0, 1) if counts[c]}


AUGMENT_LEVELS = {
    #            rotation  zoom          shift  gamma         contrast     brightness
    "standard": dict(rot=7, zoom=(0.9, 1.1), shift=0.06, gamma=(0.75, 1.33), contrast=(0.8, 1.25), bright=0.08,
                     rewindow=0.0, blur=0.0, noise=0.0),
    "strong": dict(rot=10, zoom=(0.85, 1.2), shift=0.08, gamma=(0.6, 1.6), contrast=(0.7, 1.4), bright=0.12,
                   rewindow=0.5, blur=0.4, noise=0.4),
}


def augment(img: np.ndarray, rng: np.random.Generator, level: str = "standard") -> np.ndarray:
    """Random geometric and photometric changes of one (H, W, 1) model input in [0, 1].

    ``rewindow``, ``blur`` and ``noise`` are the probabilities of those steps.
    """
    import cv2

    p = AUGMENT_LEVELS[level]
    h, w = img.shape[:2]
    angle = rng.uniform(-p["rot"], p["rot"])
    zoom = rng.uniform(*p["zoom"])
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    matrix[:, 2] += rng.uniform(-p["shift"], p["shift"], size=2) * (w, h)
    out = cv2.warpAffine(img[..., 0], matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out = np.clip(out, 0, 1)
    if rng.random() < p["rewindow"]:
        lo, hi = np.quantile(out, [rng.uniform(0.0, 0.05), rng.uniform(0.95, 1.0)])
        if hi > lo:
            out = np.clip((out - lo) / (hi - lo), 0, 1)
    out = out ** rng.uniform(*p["gamma"])
    mean = out.mean()
    out = (out - mean) * rng.uniform(*p["contrast"]) + mean + rng.uniform(-p["bright"], p["bright"])
    if rng.random() < p["blur"]:
        sigma = rng.uniform(0.5, 1.5)
        blurred = cv2.GaussianBlur(out.astype(np.float32), (0, 0), sigma)
        amount = rng.uniform(-0.8, 1.0)       # < 0: sharpen (unsharp mask), > 0: blur
        out = out + amount * (blurred - out) if amount > 0 else out - amount * (out - blurred)
    if rng.random() < p["noise"]:
        out = out + rng.normal(0.0, rng.uniform(0.005, 0.03), size=out.shape)
    return np.clip(out, 0, 1).astype(np.float32)[..., None]


def make_sequence(examples: list[Example], spec: PreprocessSpec, *, batch_size: int, train: bool,
                  seed: int = 1337, workers: int = 2, augment_level: str = "standard"):
    """A keras PyDataset that streams batches from disk (never the whole set in memory)."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=8)
            self.examples = list(examples)
            self.epoch = 0
            self.order = np.arange(len(self.examples))
            if train:
                np.random.default_rng(seed).shuffle(self.order)

        def __len__(self):
            return int(np.ceil(len(self.examples) / batch_size))

        def __getitem__(self, index):
            rng = np.random.default_rng((seed, self.epoch, index))
            picked = self.order[index * batch_size:(index + 1) * batch_size]
            images = []
            for i in picked:
                path = self.examples[i].path
                if train:
                    img = augment(resize_to_input(load_unit_image(path), spec), rng, augment_level)
                    images.append(equalize_input(img, spec))
                else:
                    images.append(load_model_input(path, spec))
            labels = np.array([self.examples[i].label for i in picked], dtype=np.float32)
            return np.stack(images), labels

        def on_epoch_end(self):
            self.epoch += 1
            if train:
                np.random.default_rng((seed, self.epoch)).shuffle(self.order)

    return Batches()
