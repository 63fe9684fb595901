"""Threshold selection and operating-point metrics (pure functions on score lists).

Used by training (the validation-chosen threshold in the model card) and, later,
by ``cxrscreen calibrate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OperatingPoint:
    """Binary metrics of a score list at one threshold (positive when score >= threshold)."""

    threshold: float
    n_positive: int
    n_negative: int
    tp: int
    fp: int
    tn: int
    fn: int
    auc: float

    @property
    def sensitivity(self) -> float:
        return self.tp / self.n_positive if self.n_positive else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / self.n_negative if self.n_negative else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if (self.tp + self.fp) else float("nan")

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / (self.n_positive + self.n_negative)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.sensitivity
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(sensitivity=self.sensitivity, specificity=self.specificity, precision=self.precision,
                    accuracy=self.accuracy, f1=self.f1,
                    confusion_matrix={"rows": "true NORMAL, PNEUMONIA", "columns": "predicted NORMAL, PNEUMONIA",
                                      "values": [[self.tn, self.fp], [self.fn, self.tp]]})
        return data


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of the same length")
    return scores, labels


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks: ties count half)."""
    from scipy.stats import rankdata

    scores, labels = _check(scores, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_for_sensitivity(scores, labels, target: float) -> float:
    """The highest threshold whose sensitivity (score >= threshold) is at least ``target``.

    Candidate thresholds are the positive scores themselves; ties are handled
    because every score equal to the threshold counts as positive.
    """
    scores, labels = _check(scores, labels)
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity {target} is outside (0, 1]")
    pos = np.sort(scores[labels])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases: sensitivity is undefined")
    needed = int(np.ceil(target * len(pos) - 1e-9))
    return float(pos[max(needed, 1) - 1])


def operating_point(scores, labels, threshold: float) -> OperatingPoint:
    scores, labels = _check(scores, labels)
    pred = scores >= threshold
    return OperatingPoint(threshold=float(threshold), n_positive=int(labels.sum()), n_negative=int((~labels).sum()),
                          tp=int((pred & labels).sum()), fp=int((pred & ~labels).sum()),
                          tn=int((~pred & ~labels).sum()), fn=int((~pred & labels).sum()),
                          auc=roc_auc(scores, labels))


# --------------------------------------------------------------------------- site calibration

CALIBRATION_FORMAT = "cxrscreen-calibration/1"
MIN_PER_CLASS = 20


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV at a prevalence (Bayes), from sensitivity and specificity."""
    tp = sensitivity * prevalence
    fp = (1 - specificity) * (1 - prevalence)
    tn = specificity * (1 - prevalence)
    fn = (1 - sensitivity) * prevalence
    ppv = tp / (tp + fp) if tp + fp else float("nan")
    npv = tn / (tn + fn) if tn + fn else float("nan")
    return ppv, npv


def bootstrap_intervals(scores, labels, threshold: float, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95, groups=None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of AUC, sensitivity, specificity and accuracy at a fixed threshold.

    Resampling is stratified by class. With ``groups`` (one value per case, e.g. the patient), whole
    groups are resampled, all of a group's cases together: the images or studies of one patient are
    alike, and resampling them one by one, as if independent, gives intervals too narrow. The groups are
    stratified by the classes they hold (only positive, only negative, both: a patient with a normal
    study and a pneumonia one is one group, drawn whole). Without ``groups`` every case is its own group
    (the class counts of the data are then kept exactly).

    The intervals of sensitivity, specificity and accuracy are each widened to hold the exact binomial
    (Clopper-Pearson) interval of the same count: a percentile bootstrap cannot see past the data, so
    when every positive case is above the threshold it gives sensitivity [1, 1], although 60 of 60 are
    as consistent with a true 0.95 (the exact lower bound is 0.94).
    """
    scores, labels = _check(scores, labels)
    samples: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": [], "accuracy": []}
    for idx in resamples(labels, groups, n_boot, seed):
        point = operating_point(scores[idx], labels[idx], threshold)
        for key, values in samples.items():
            values.append(float(getattr(point, key)))
    tail = (1 - level) / 2 * 100
    bounds = [tail, 100 - tail]
    intervals = {key: tuple(float(v) for v in np.percentile(values, bounds)) for key, values in samples.items()}
    point = operating_point(scores, labels, threshold)
    for key, hits, cases in (("sensitivity", point.tp, point.n_positive), ("specificity", point.tn, point.n_negative),
                             ("accuracy", point.tp + point.tn, point.n_positive + point.n_negative)):
        if cases:
            lo, hi = exact_interval(hits, cases, level)
            intervals[key] = (min(intervals[key][0], lo), max(intervals[key][1], hi))
    return intervals


def resamples(labels, groups=None, n_boot: int = 2000, seed: int = 0) -> list[np.ndarray]:
    """The case indices of ``n_boot`` bootstrap resamples, stratified by class, whole groups at a time
    (see :func:`bootstrap_intervals`)."""
    labels = np.asarray(labels).astype(bool)
    if groups is None:
        groups = np.arange(len(labels))
    groups = np.asarray([str(g) for g in groups])
    if groups.shape != labels.shape:
        raise ValueError("groups must give one value per score")
    _, group_of = np.unique(groups, return_inverse=True)
    order = np.argsort(group_of, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(group_of[order])) + 1) if len(order) else []
    # groups stratified by what they hold (only positive cases, only negative, both: a patient with a
    # normal study and a pneumonia one), so that every resample holds both classes in the data's proportion
    holds = [(bool(labels[m].any()), bool((~labels[m]).any())) for m in members]
    strata = [[m for m, h in zip(members, holds) if h == kind] for kind in ((True, False), (False, True), (True, True))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([stratum[k] for stratum in strata if stratum
                            for k in rng.integers(0, len(stratum), len(stratum))]) for _ in range(n_boot)]


def threshold_for_sensitivity_bound(scores, labels, target: float, groups=None, n_boot: int = 2000, seed: int = 0,
                                    level: float = 0.95) -> float | None:
    """The highest threshold at which the lower bound of sensitivity's interval (as
    :func:`bootstrap_intervals` gives it, at ``level``) reaches ``target``; None when even the lowest
    positive score does not reach it (too few positive cases to show the target)."""
    scores, labels = _check(scores, labels)
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity {target} is outside (0, 1]")
    positives = [idx[labels[idx]] for idx in resamples(labels, groups, n_boot, seed)]
    candidates = np.unique(scores[labels])[::-1]        # highest first: the bound grows as the threshold falls
    if len(candidates) == 0:
        raise ValueError("no positive cases: sensitivity is undefined")
    tail = (1 - level) / 2 * 100

    def lower_bound(threshold: float) -> float:
        boot = np.percentile([float((scores[idx] >= threshold).mean()) for idx in positives], tail)
        return min(float(boot), exact_interval(int((scores[labels] >= threshold).sum()), int(labels.sum()), level)[0])

    if lower_bound(candidates[-1]) < target:
        return None
    lo, hi = 0, len(candidates) - 1          # the answer is the first candidate whose bound reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        if lower_bound(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def exact_interval(hits: int, cases: int, level: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson interval of a proportion ``hits / cases``."""
    from scipy.stats import binomtest

    found = binomtest(int(hits), int(cases)).proportion_ci(confidence_level=level, method="exact")
    return float(found.low), float(found.high)


def group_count(labels, groups) -> dict[str, int]:
    """Groups (patients) per class, as :func:`bootstrap_intervals` resamples them."""
    labels = np.asarray(labels).astype(bool)
    groups = np.asarray([str(g) for g in groups])
    return {"NORMAL": len(set(groups[~labels])), "PNEUMONIA": len(set(groups[labels]))}


@dataclass(frozen=True)
class Calibration:
    """A site calibration file: the threshold for a target sensitivity on the site's labeled data."""

    path: "object"
    threshold: float
    target_sensitivity: float
    model_sha256: str
    created: str
    figures: dict

    @property
    def operating_point(self) -> dict:
        f = self.figures
        return {"sensitivity": f["sensitivity"], "specificity": f["specificity"],
                "source": f"site calibration of {self.created[:10]} on {f['n']['NORMAL']} normal and "
                          f"{f['n']['PNEUMONIA']} pneumonia cases"
                          + (", threshold where the lower 95% bound of sensitivity reaches "
                             f"{self.target_sensitivity:g}" if f.get("threshold_rule", "").startswith("lower") else "")
                          + f" ({getattr(self.path, 'name', self.path)})"}

    @classmethod
    def load(cls, path) -> "Calibration":
        import json
        from pathlib import Path

        from .errors import UsageError

        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != CALIBRATION_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(path=path, threshold=float(data["threshold"]),
                       target_sensitivity=float(data["target_sensitivity"]),
                       model_sha256=str(data["model_sha256"]), created=str(data["created"]), figures=data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: not a usable calibration file ({exc})", step="calibration") from None


def calibration_files(model_path) -> list:
    """Calibration files stored beside a model: ``<stem>.calibration.*.json``."""
    from pathlib import Path

    model_path = Path(model_path)
    return sorted(model_path.parent.glob(f"{model_path.stem}.calibration.*.json"))


def select_calibration(model_path, model_sha256: str, explicit=None) -> "Calibration | None":
    """The calibration to use: ``explicit`` (refused unless made for this model), else the newest
    file beside the model whose model hash matches, else None (the card's threshold applies)."""
    from .errors import UsageError

    if explicit is not None:
        cal = Calibration.load(explicit)
        if cal.model_sha256 != model_sha256:
            raise UsageError(f"{explicit} was made for another model (sha256 {cal.model_sha256[:12]}..., this "
                             f"model is {model_sha256[:12]}...): re-run `cxrscreen calibrate` for this model",
                             step="calibration")
        return cal
    matching = []
    for path in calibration_files(model_path):
        try:
            cal = Calibration.load(path)
        except Exception:
            continue
        if cal.model_sha256 == model_sha256:
            matching.append(cal)
    return max(matching, key=lambda c: c.created) if matching else None


POSITIVE_LABELS = ("1", "PNEUMONIA", "POSITIVE")
NEGATIVE_LABELS = ("0", "NORMAL", "NEGATIVE")


CLASSES = ("NORMAL", "PNEUMONIA")     # label 0 and 1
CSV_DELIMITERS = (",", ";", "\t")     # ";" is what Excel writes where the decimal separator is a comma


def class_folders(data) -> list | None:
    """``data``'s NORMAL and PNEUMONIA folders (in :data:`CLASSES` order), their names in any case
    (``Normal/``, ``pneumonia/``); None when either is missing. Shared by calibration and training."""
    from pathlib import Path

    folders = {p.name.upper(): p for p in Path(data).iterdir() if p.is_dir()}
    return [folders[name] for name in CLASSES] if all(name in folders for name in CLASSES) else None


def read_labeled_csv(path) -> list[tuple["object", int, str]]:
    """Rows of a ``path,label[,patient]`` CSV as ``(path, 1 for PNEUMONIA else 0, patient or "")``.

    Relative paths are taken from the CSV's folder. Labels are case-insensitive
    :data:`POSITIVE_LABELS` or :data:`NEGATIVE_LABELS`; any other label (a typo) is
    refused with its line number rather than silently counted as a negative.
    Read as a spreadsheet saves one: UTF-8 with or without a byte-order mark, else Windows-1252 (Excel's
    plain "CSV", with a log line); columns separated by a comma, a semicolon (Excel where the decimal
    separator is a comma) or a tab, whichever the header is split by; column names in any case.
    Shared by calibration and training.
    """
    import csv
    import io
    import logging
    from pathlib import Path

    from .errors import UsageError

    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path} is neither UTF-8 nor Windows-1252 text ({exc}): save it as CSV UTF-8",
                             step="calibration") from None
        logging.getLogger(__name__).warning("%s is not UTF-8: read as Windows-1252 (Excel's plain CSV)", path)
    first = text.splitlines()[0] if text else ""
    for delimiter in CSV_DELIMITERS:
        header = [name.strip().lower() for name in next(csv.reader([first], delimiter=delimiter), [])]
        if {"path", "label"} <= set(header):
            break
    else:
        found = next(csv.reader([first]), [])
        raise UsageError(f"{path} needs a header with 'path' and 'label' columns (found {found})",
                         step="calibration")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    next(reader)
    rows, listed = [], {}         # listed: path -> (its label, its line)
    for values in reader:
        if not any(value.strip() for value in values):
            continue
        row = dict(zip(header, values))
        if not (row.get("path") or "").strip():
            raise UsageError(f"{path} line {reader.line_num}: no path", step="calibration")
        item = Path(row["path"])
        label = str(row.get("label") or "").strip().upper()
        if label not in POSITIVE_LABELS + NEGATIVE_LABELS:
            raise UsageError(f"{path} line {reader.line_num}: label {row.get('label')!r} is neither PNEUMONIA "
                             f"({'/'.join(POSITIVE_LABELS)}) nor NORMAL ({'/'.join(NEGATIVE_LABELS)})",
                             step="calibration")
        item, value = item if item.is_absolute() else (path.parent / item).resolve(), int(label in POSITIVE_LABELS)
        if item in listed:
            if listed[item][0] != value:
                raise UsageError(f"{path} line {reader.line_num}: {row['path']} is labelled {CLASSES[value]} here and "
                                 f"{CLASSES[1 - value]} on line {listed[item][1]}", step="calibration")
            continue        # listed twice alike: read once
        listed[item] = (value, reader.line_num)
        rows.append((item, value, str(row.get("patient") or "")))
    return rows


def _labeled_studies(data, selection=None, patient_pattern=None):
    """Studies with labels from ``DATA/{NORMAL,PNEUMONIA}/**`` or a CSV ``path,label``, their images chosen by
    ``selection`` (a :class:`cxrscreen.ingest.Selection`; default: frontal chest images, as ``batch``'s).

    Returns ``(studies, labels {uid: 0/1}, patients {uid: key}, excluded FileOutcomes, inputs digest)``.
    A study's patient key, which the bootstrap resamples by, is the CSV's ``patient`` column where it
    names one, else what ``patient_pattern`` (a compiled regular expression) finds in its files' paths
    (:func:`patient_from_path`), else the DICOM Issuer of Patient ID and Patient ID, else (a JPEG or PNG,
    or a DICOM without a Patient ID) the study itself. A pattern that finds no patient in any file whose CSV row
    names none is refused.
    """
    import hashlib
    from pathlib import Path

    from .errors import UsageError
    from .ingest import Selection, group_studies, scan
    from .records import FileOutcome, Status

    selection = selection or Selection()
    data = Path(data)
    if not data.exists():
        raise UsageError(f"{data} does not exist", step="calibration")
    sources: list[tuple[Path, int, str]] = []
    if data.is_file():
        sources = [(path, label, patient.strip()) for path, label, patient in read_labeled_csv(data)]
    else:
        folders = class_folders(data)
        if folders is None:
            raise UsageError(f"{data} must hold NORMAL/ and PNEUMONIA/ folders (or pass a CSV path,label)",
                             step="calibration")
        sources = [(folder, label, "") for label, folder in enumerate(folders)]
    root = data.parent if data.is_file() else data      # the paths a pattern reads are relative to it
    items, label_of, patient_of, unnamed = [], {}, {}, []
    for path, label, patient in sources:
        for item in scan([path], selection):
            items.append(item)
            label_of[item.path] = label
            found = not patient and patient_pattern and patient_from_path(patient_pattern, item.path, root)
            if patient or found:
                patient_of[item.path] = f"csv:{patient}" if patient else f"pattern:{found}"
            elif patient_pattern:
                unnamed.append(item.path)
    if unnamed and not any(key.startswith("pattern:") for key in patient_of.values()):
        raise pattern_finds_nobody(patient_pattern, unnamed, root, step="calibration")
    studies, excluded = group_studies(items)
    labels, patients, kept = {}, {}, []
    for study in studies:
        values = {label_of[r.path] for r in study.images}
        if len(values) > 1:
            excluded.extend(FileOutcome(r.path, Status.SKIPPED, "its study has images labelled both NORMAL and "
                                        "PNEUMONIA", step="calibration", study_uid=study.study_uid)
                            for r in study.images)
            continue
        labels[study.study_uid] = values.pop()
        patients[study.study_uid] = _patient_key(study, patient_of)
        kept.append(study)
    digest = hashlib.sha256()
    for path, label in sorted((str(r.path), labels[s.study_uid]) for s in kept for r in s.images):
        digest.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
    return kept, labels, patients, excluded, digest.hexdigest()


def relative_name(path, root) -> str:
    """``path`` relative to ``root`` with forward slashes, or whole where it is elsewhere."""
    import os
    from pathlib import Path

    for strip in (os.path.abspath, os.path.realpath):      # a CSV's paths are resolved, a folder's are not
        try:
            return Path(strip(path)).relative_to(strip(root)).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def compile_patient_pattern(text: str | None, step: str):
    """``--patient-pattern``'s regular expression compiled (None for none); refused with a
    :class:`cxrscreen.errors.UsageError` when it is not one. Calibration's and training's."""
    import re

    from .errors import UsageError

    if not text:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise UsageError(f"--patient-pattern {text!r} is not a regular expression: {exc}", step=step) from None


def pattern_finds_nobody(pattern, paths: list, root, step: str):
    """The refusal of a ``--patient-pattern`` that found no patient in any of ``paths`` (those it was run on)."""
    from .errors import UsageError

    return UsageError(f"--patient-pattern {pattern.pattern!r} finds no patient in any of the {len(paths)} files' "
                      f"paths (one is {relative_name(paths[0], root)!r})", step=step)


def patient_from_path(pattern, path, root) -> str:
    """The patient that ``pattern`` (a compiled regular expression) finds in ``path``, read relative to
    ``root`` with forward slashes (``PNEUMONIA/person12_virus_40.jpeg``, ``P0042/2026-01-03.dcm``): the
    first of its groups that took part in the match (``(person\\d+)|(IM-\\d+)``), else the whole match;
    '' when it does not match, or matches nothing."""
    match = pattern.search(relative_name(path, root))
    if not match:
        return ""
    return next((group for group in match.groups() if group is not None), match.group(0))


def joined_by_shared_images(pairs) -> dict[str, str]:
    """For ``pairs`` of (image digest, patient): ``{patient: the first (least) patient of those it shares an
    identical image with, directly or through others}``, for each patient that shares one and is not that first
    one. Training's validation split keeps such patients on one side; calibrate's bootstrap resamples them as
    one (the same picture sent again under another patient ID is one patient's evidence, not two)."""
    parent: dict[str, str] = {}

    def root(patient: str) -> str:
        while parent.get(patient, patient) != patient:
            patient = parent[patient]
        return patient

    first_with: dict[str, str] = {}
    for digest, patient in pairs:
        if not digest:
            continue
        a, b = root(first_with.setdefault(digest, patient)), root(patient)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {patient: root(patient) for patient in parent}      # a root is itself: absent, as the others


def identical_images(items) -> dict[str, list[list]]:
    """Of ``items`` (digest, path, patient, label), the groups of paths whose images are identical and are
    keyed to different patients (``across_patients``) or labelled both classes (``labelled_both``)."""
    by_digest: dict[str, list] = {}
    for digest, *rest in items:
        if digest:
            by_digest.setdefault(digest, []).append(rest)
    same = [group for group in by_digest.values() if len(group) > 1]
    return {"across_patients": [[str(p) for p, *_ in g] for g in same if len({patient for _, patient, _ in g}) > 1],
            "labelled_both": [[str(p) for p, *_ in g] for g in same if len({label for *_, label in g}) > 1]}


def _patient_key(study, patient_of: dict) -> str:
    named = {patient_of[r.path] for r in study.images if r.path in patient_of}
    if len(named) == 1:
        return named.pop()
    first = study.first
    if first is not None and first.patient_key:
        return first.patient_key
    return "study:" + study.study_uid


def run_calibration(data, *, target: float = 0.95, model_path=None, out=None, n_boot: int = 2000,
                    prevalence: float | None = None, batch_size: int = 16, workers: int = 2, model=None,
                    conservative: bool = False, selection=None, patient_pattern: str | None = None,
                    progress=None) -> dict:
    """Score a labeled set as ``batch`` would, choose the threshold, write the calibration file and plot.

    ``selection`` (a :class:`cxrscreen.ingest.Selection`) chooses the images as ``batch``'s options do: a site
    that screens with ``--chest-body-part TORAX`` calibrates with it too, or its TORAX studies are skipped here.

    The threshold is the highest whose sensitivity on the data reaches ``target``; ``conservative``: the
    highest whose lower 95% bound of sensitivity does (refused when no threshold's does).

    ``patient_pattern``, a regular expression, finds each file's patient in its path (relative to ``data``,
    or to a CSV's folder): the first of its groups that took part, else the whole match
    (:func:`patient_from_path`). The bootstrap resamples those patients
    (a site's exported JPEGs named by patient, or one folder per patient); see :func:`_labeled_studies`.

    ``progress(done, total, failed)`` is called as the images are scored or fail (as
    :func:`cxrscreen.pipeline.run_batch` calls it).

    Raises :class:`cxrscreen.errors.UsageError` (exit code 2) for every refusal, and
    :class:`cxrscreen.errors.OutputError` (exit code 1) when the calibration cannot be written
    (a folder it may not write, found before scoring; a full disk).
    """
    import datetime as _dt
    import json
    import logging
    import os
    from collections import Counter
    from pathlib import Path

    from . import __version__
    from .errors import OutputError, UsageError
    from .infer import load_model
    from .ingest import Selection
    from .pipeline import score_studies
    from .report import atomic_write

    selection = selection or Selection()
    if not 0 < target <= 1:
        raise UsageError(f"--target-sensitivity {target} is outside (0, 1]", step="calibration")
    if prevalence is not None and not 0 < prevalence < 1:
        raise UsageError(f"--prevalence {prevalence} is outside (0, 1)", step="calibration")
    pattern = compile_patient_pattern(patient_pattern, step="calibration")
    model = model or load_model(model_path)
    folder = Path(out).parent if out else model.path.parent
    folder = next(f for f in (folder, *folder.parents) if f.exists())    # atomic_write makes the rest
    if not os.access(folder, os.W_OK):    # known before scoring the whole set, not after
        raise OutputError(f"cannot write the calibration in {folder}" + ("" if out else " beside the model")
                          + ": permission denied" + ("" if out else "; give --out FILE"),
                          path=folder, step="calibration")
    studies, labels, patients, excluded, digest = _labeled_studies(data, selection, pattern)
    scores, failed, pixels = score_studies(studies, model, batch_size=batch_size, workers=workers, progress=progress)
    excluded = list(excluded) + failed
    uids = [s.study_uid for s in studies if s.study_uid in scores]
    y = np.array([labels[u] for u in uids], dtype=bool)
    s = np.array([scores[u] for u in uids])
    counts = {"NORMAL": int((~y).sum()), "PNEUMONIA": int(y.sum())}
    excluded_note = _excluded_note(excluded)
    if counts["NORMAL"] == 0 or counts["PNEUMONIA"] == 0:
        raise UsageError(("no study" if not len(y) else "only one class") + f" scored: {counts}{excluded_note}",
                         step="calibration")
    keyed_by = dict(sorted(Counter(patients[u].split(":", 1)[0] for u in uids).items()))  # csv, pattern, dicom, study
    together = joined_by_shared_images((digest, patients[u]) for u in uids for _, digest in pixels[u])
    groups = [together.get(patients[u], patients[u]) for u in uids]
    people = group_count(y, groups)
    identical = identical_images((digest, path, patients[u], labels[u]) for u in uids for path, digest in pixels[u])
    for what, found in (("are keyed to different patients: the bootstrap resamples those patients as one",
                         identical["across_patients"]),
                        ("are labelled both NORMAL and PNEUMONIA: check those labels", identical["labelled_both"])):
        if found:
            logging.getLogger(__name__).warning("%d groups of identical images %s, e.g. %s", len(found), what,
                                                " and ".join(found[0][:2]))
    if pattern and len(uids) > keyed_by.get("csv", 0) + keyed_by.get("pattern", 0):
        logging.getLogger(__name__).warning(
            "--patient-pattern %r found no patient in the files of %d of %d studies: their patient is the DICOM "
            "Patient ID (%d) or the study itself (%d)", patient_pattern,
            keyed_by.get("dicom", 0) + keyed_by.get("study", 0), len(uids), keyed_by.get("dicom", 0),
            keyed_by.get("study", 0))
    small = [k for k, v in people.items() if v < MIN_PER_CLASS]
    if small:       # twenty studies of two patients are two patients' evidence
        raise UsageError(f"fewer than {MIN_PER_CLASS} patients of {', '.join(small)}: studies {counts}, patients "
                         f"{people}{excluded_note}; a threshold set on so few cases cannot be trusted",
                         step="calibration")
    if conservative:
        threshold = threshold_for_sensitivity_bound(s, y, target, groups=groups, n_boot=n_boot)
        if threshold is None:
            found = exact_interval(int(y.sum()), int(y.sum()))[0]
            raise UsageError(f"even with every one of the {counts['PNEUMONIA']} PNEUMONIA studies ({people['PNEUMONIA']} "
                             f"patients) called positive, the lower 95% bound of sensitivity is at most {found:.3f}, "
                             f"under the target {target}: calibrate on more positive cases, or without "
                             "--conservative", step="calibration")
    else:
        threshold = threshold_for_sensitivity(s, y, target)
    point = operating_point(s, y, threshold)
    ci = bootstrap_intervals(s, y, threshold, n_boot, groups=groups)
    prev = prevalence if prevalence is not None else counts["PNEUMONIA"] / len(y)
    ppv, npv = predictive_values(point.sensitivity, point.specificity, prev)
    lower = ci["sensitivity"][0]
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result = {
        "format": CALIBRATION_FORMAT, "created": created, "tool_version": __version__,
        "model": model.path.name, "model_sha256": model.sha256, "data": str(data),
        "inputs_sha256": digest, "selection": selection.as_json(), "n": counts,
        "excluded": [{"path": str(o.path), "reason": o.reason} for o in excluded],
        "target_sensitivity": target, "threshold": threshold,
        "threshold_rule": "lower 95% bound of sensitivity reaches the target" if conservative
        else "sensitivity reaches the target", "auc": point.auc, "auc_ci95": ci["auc"],
        "sensitivity": point.sensitivity, "sensitivity_ci95": ci["sensitivity"],
        "specificity": point.specificity, "specificity_ci95": ci["specificity"],
        "prevalence": prev, "ppv": ppv, "npv": npv, "bootstrap": n_boot,
        "bootstrap_unit": "patient", "patients": people, "patient_pattern": patient_pattern or None,
        "patients_from": keyed_by,
        "identical_images": {what: len(found) for what, found in identical.items()},
        "sensitivity_lower_bound_below_target": bool(lower < target),
        "confusion_matrix": point.to_json()["confusion_matrix"],
    }
    stamp = created.replace(":", "").replace("-", "")[:15]
    out = Path(out) if out else model.path.parent / f"{model.path.stem}.calibration.{stamp}.json"
    plot = out.with_suffix(".png")
    try:
        with atomic_write(out, "w") as handle:
            json.dump(result, handle, indent=2)
        _plot_calibration(plot, s, y, point)
    except OSError as exc:
        raise OutputError(f"cannot write the calibration: {exc.strerror or exc}", path=exc.filename or out,
                          step="calibration") from exc
    result["file"], result["plot"] = str(out), str(plot)
    return result


def _excluded_note(excluded) -> str:
    """How a refusal names the files left out: their number and the commonest reason (a site whose every file
    was skipped, say as BodyPartExamined TORAX, is told why and what to pass), '' when there are none."""
    from collections import Counter

    if not excluded:
        return ""
    reason, n = Counter(o.reason for o in excluded).most_common(1)[0]
    return (f" ({len(excluded)} files excluded, " + ("all" if n == len(excluded) else f"{n} of them")
            + f": {reason})")


def _plot_calibration(path, scores, labels, point: OperatingPoint) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, (roc, hist) = plt.subplots(1, 2, figsize=(10, 4.2))
    fpr, tpr, _ = roc_curve(labels, scores)
    roc.plot(fpr, tpr, label=f"ROC (AUC {point.auc:.3f})")
    roc.plot([1 - point.specificity], [point.sensitivity], "o", color="#b00020",
             label=f"threshold {point.threshold:.3f}: sens {point.sensitivity:.3f}, spec {point.specificity:.3f}")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set_xlabel("1 - specificity")
    roc.set_ylabel("sensitivity")
    roc.legend(loc="lower right", fontsize=8)
    bins = np.linspace(0, 1, 41)
    hist.hist(scores[~labels], bins=bins, alpha=0.6, label="NORMAL")
    hist.hist(scores[labels], bins=bins, alpha=0.6, label="PNEUMONIA")
    hist.axvline(point.threshold, color="#b00020", linestyle="--", label="threshold")
    hist.set_xlabel("study score")
    hist.set_ylabel("studies")
    hist.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
