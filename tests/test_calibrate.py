"""Site calibration: bootstrap intervals, the calibration file, its use by batch, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cxrscreen.calibrate import (Calibration, bootstrap_intervals, exact_interval, group_count, operating_point,
                                 predictive_values, resamples, select_calibration, threshold_for_sensitivity,
                                 threshold_for_sensitivity_bound)
from cxrscreen.cli import main
from cxrscreen.infer import default_model_path, load_model, model_files
from cxrscreen.pipeline import BatchOptions, run_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    """The bundled model copied to a temporary folder, so calibration files land there."""
    folder = tmp_path_factory.mktemp("model")
    src = default_model_path()
    for part in model_files(src):
        shutil.copy(part, folder / part.name)
    return load_model(folder / src.name)


def make_labeled(root: Path, normal: int, pneumonia: int) -> Path:
    import cv2

    rng = np.random.default_rng(5)
    for label, n in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        folder = root / label / "nested"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.random((128, 128)) * 255).astype(np.uint8)
            img = cv2.GaussianBlur(img, (0, 0), 3 + 4 * rng.random())
            cv2.imwrite(str(folder / f"{label}_{i}.png"), img)
    return root


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(0)

    def sample(n):
        labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        scores = np.r_[rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n)]
        return scores, labels

    widths = []
    for n in (40, 1000):
        scores, labels = sample(n)
        point = operating_point(scores, labels, 0.0)
        ci = bootstrap_intervals(scores, labels, 0.0, n_boot=400)
        for key in ("sensitivity", "specificity", "auc"):
            lo, hi = ci[key]
            assert lo <= getattr(point, key) <= hi
        widths.append(ci["sensitivity"][1] - ci["sensitivity"][0])
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_patients_whose_cases_are_alike():
    """Ten cases of one patient, alike, are one piece of evidence: resampled by patient the intervals are
    about sqrt(10) times wider than resampled as ten independent cases (and those, as before, keep the
    estimate inside)."""
    rng = np.random.default_rng(1)
    per_patient, patients = 10, 30
    labels = np.repeat(np.r_[np.ones(patients, bool), np.zeros(patients, bool)], per_patient)
    patient_scores = np.r_[rng.normal(1.0, 1.0, patients), rng.normal(-1.0, 1.0, patients)]
    scores = np.repeat(patient_scores, per_patient) + rng.normal(0, 0.01, labels.size)
    groups = np.repeat([f"p{i}" for i in range(2 * patients)], per_patient)
    point = operating_point(scores, labels, 0.0)
    by_case = bootstrap_intervals(scores, labels, 0.0, n_boot=400)
    by_patient = bootstrap_intervals(scores, labels, 0.0, n_boot=400, groups=groups)
    for key in ("sensitivity", "specificity", "auc", "accuracy"):
        assert by_patient[key][0] <= getattr(point, key) <= by_patient[key][1]
        assert np.diff(by_patient[key])[0] > 2 * np.diff(by_case[key])[0], key
    # a group of one case each is the case bootstrap
    assert bootstrap_intervals(scores, labels, 0.0, n_boot=200, groups=range(labels.size)) == \
        bootstrap_intervals(scores, labels, 0.0, n_boot=200)
    assert group_count(labels, groups) == {"NORMAL": patients, "PNEUMONIA": patients}
    with pytest.raises(ValueError, match="one value per score"):
        bootstrap_intervals(scores, labels, 0.0, groups=groups[:-1])


def test_a_patient_with_normal_and_pneumonia_studies_is_resampled_whole():
    """A patient's normal studies and pneumonia studies (a follow-up) were drawn as two independent groups,
    one per class. Now the patient is one group, drawn whole: every resample holds all of its cases or none
    (groups stratified by the classes they hold, so that both classes stay in the data's proportion)."""
    mixed = [f"both{i}" for i in range(20)]                  # two pneumonia and two normal studies each
    groups = np.r_[[f"sick{i}" for i in range(10)], np.repeat(mixed, 2), np.repeat(mixed, 2)]
    labels = np.r_[np.ones(10 + 40, bool), np.zeros(40, bool)]
    for idx in resamples(labels, groups, n_boot=200, seed=3):
        drawn, counts = np.unique(groups[idx], return_counts=True)
        assert all(n % 4 == 0 for g, n in zip(drawn, counts) if g.startswith("both"))
        assert sum(n for g, n in zip(drawn, counts) if g.startswith("sick")) == 10
        assert len(idx) == 90


def test_calibration_resamples_the_patients_dicom_and_a_csv_name(tmp_path):
    """The patient key of a study: a CSV's patient column, else the DICOM Patient ID (with its issuer), else
    the study itself (a JPEG or PNG)."""
    import cv2

    from cxrscreen.calibrate import _labeled_studies
    from cxrscreen.testing import make_dicom, save

    rng = np.random.default_rng(3)
    pixels = lambda: (rng.random((64, 64)) * 4000).astype(np.uint16)
    rows = ["path,label,patient"]
    for i in range(4):        # two studies of each of two patients, DICOM; the CSV leaves the patient out
        save(make_dicom(pixels(), seed=f"d{i}", patient_id=f"PAT{i // 2}"), tmp_path / f"d{i}.dcm")
        rows.append(f"d{i}.dcm,PNEUMONIA,")
    save(make_dicom(pixels(), seed="other-issuer", patient_id="PAT0", IssuerOfPatientID="OTHER HOSPITAL"),
         tmp_path / "issuer.dcm")
    rows.append("issuer.dcm,PNEUMONIA,")
    for i in range(3):        # three PNGs: the CSV names one patient for two of them
        cv2.imwrite(str(tmp_path / f"p{i}.png"), (rng.random((64, 64)) * 255).astype(np.uint8))
        rows.append(f"p{i}.png,NORMAL,{'kid-7' if i < 2 else ''}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    studies, labels, patients, excluded, _ = _labeled_studies(csv)
    assert not excluded and len(studies) == 8
    by_file = {s.first.path.name: patients[s.study_uid] for s in studies}
    assert by_file["d0.dcm"] == by_file["d1.dcm"] != by_file["d2.dcm"] == by_file["d3.dcm"]
    assert by_file["issuer.dcm"] not in (by_file["d0.dcm"], by_file["d2.dcm"])
    assert by_file["p0.png"] == by_file["p1.png"] == "csv:kid-7" != by_file["p2.png"]
    uids = [s.study_uid for s in studies]
    assert group_count([labels[u] for u in uids], [patients[u] for u in uids]) == {"NORMAL": 2, "PNEUMONIA": 3}


def test_a_patient_pattern_finds_the_patient_in_a_file_name_or_folder(tmp_path):
    """A folder of exported JPEGs/PNGs was one patient per file, whatever their names said: on the Kermany
    test split 624 "patients" for 427. --patient-pattern reads the patient from the path (relative to DATA,
    or to the CSV's folder); a CSV's patient column still comes first; a DICOM it does not match keeps its
    Patient ID."""
    import re

    import cv2

    from cxrscreen.calibrate import _labeled_studies, patient_from_path
    from cxrscreen.testing import make_dicom, save

    rng = np.random.default_rng(8)
    png = lambda path: (path.parent.mkdir(parents=True, exist_ok=True),
                        cv2.imwrite(str(path), (rng.random((64, 64)) * 255).astype(np.uint8)))
    for name in ("person1_bacteria_1.jpeg", "person1_virus_7.jpeg", "person2_bacteria_3.jpeg"):
        png(tmp_path / "site" / "PNEUMONIA" / name)
    for name in ("IM-0115-0001.jpeg", "NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427-0002.jpeg", "P7/a.png", "P7/b.png"):
        png(tmp_path / "site" / "NORMAL" / name)
    save(make_dicom((rng.random((64, 64)) * 4000).astype(np.uint16), seed="d", patient_id="PAT9"),
         tmp_path / "site" / "NORMAL" / "1.2.3.dcm")
    kermany = re.compile(r"(person\d+(?=_)|NORMAL2-IM-\d+|IM-\d+)|^NORMAL/(P\d+)/")
    studies, labels, patients, excluded, _ = _labeled_studies(tmp_path / "site", patient_pattern=kermany)
    assert not excluded and len(studies) == 9
    by_file = {s.first.path.name: patients[s.study_uid] for s in studies}
    assert by_file["person1_bacteria_1.jpeg"] == by_file["person1_virus_7.jpeg"] == "pattern:person1"
    assert by_file["person2_bacteria_3.jpeg"] == "pattern:person2"
    assert by_file["IM-0115-0001.jpeg"] == "pattern:IM-0115"
    assert by_file["NORMAL2-IM-1427-0001.jpeg"] == by_file["NORMAL2-IM-1427-0002.jpeg"] == "pattern:NORMAL2-IM-1427"
    assert by_file["1.2.3.dcm"].startswith("dicom:") and by_file["1.2.3.dcm"].endswith("PAT9")
    assert by_file["a.png"] == by_file["b.png"] == "pattern:P7"       # the group that took part
    folder = re.compile(r"^NORMAL/(P\d+)/")
    assert patient_from_path(folder, tmp_path / "site" / "NORMAL" / "P7" / "a.png", tmp_path / "site") == "P7"
    assert patient_from_path(re.compile(r"P\d+"), tmp_path / "elsewhere" / "P3.png", tmp_path / "site") == "P3"
    assert patient_from_path(folder, tmp_path / "site" / "NORMAL" / "a.png", tmp_path / "site") == ""

    # a CSV: paths relative to its folder; its patient column comes first
    rows = ["path,label,patient", "site/PNEUMONIA/person1_bacteria_1.jpeg,PNEUMONIA,kid-1",
            "site/PNEUMONIA/person1_virus_7.jpeg,PNEUMONIA,", "site/NORMAL/P7/a.png,NORMAL,",
            "site/NORMAL/P7/b.png,NORMAL,"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    studies, _, patients, _, _ = _labeled_studies(tmp_path / "labels.csv",
                                                  patient_pattern=re.compile(r"^site/[A-Z]+/(person\d+|P\d+)"))
    by_file = {s.first.path.name: patients[s.study_uid] for s in studies}
    assert by_file == {"person1_bacteria_1.jpeg": "csv:kid-1", "person1_virus_7.jpeg": "pattern:person1",
                       "a.png": "pattern:P7", "b.png": "pattern:P7"}
    # a pattern is not run where the CSV names the patient, nor refused for finding nobody there
    (tmp_path / "named.csv").write_text("path,label,patient\nsite/NORMAL/P7/a.png,NORMAL,kid-2\n")
    studies, _, patients, _, _ = _labeled_studies(tmp_path / "named.csv", patient_pattern=re.compile(r"^nowhere"))
    assert list(patients.values()) == ["csv:kid-2"]
    from cxrscreen.errors import UsageError

    with pytest.raises(UsageError, match="in any of the 3 files' paths"):     # the 3 rows that name nobody
        _labeled_studies(tmp_path / "labels.csv", patient_pattern=re.compile(r"^nowhere"))


def test_a_patient_pattern_that_is_wrong_or_finds_nothing_is_refused(tmp_path, model_copy):
    data = make_labeled(tmp_path / "d", 21, 21)
    run = lambda pattern: CliRunner().invoke(main, ["calibrate", str(data), "--model", str(model_copy.path),
                                                    "--bootstrap", "50", "--patient-pattern", pattern])
    result = run("person(\\d+")
    assert result.exit_code == 2 and "--patient-pattern 'person(\\\\d+' is not a regular expression: missing )" \
        in result.output, result.output
    result = run("^person\\d+")
    assert result.exit_code == 2, result.output
    assert "finds no patient in any of the 42 files' paths (one is 'NORMAL/nested/NORMAL_0.png')" in result.output


def test_calibrate_with_a_patient_pattern_resamples_its_patients(tmp_path, model_copy, caplog):
    """Twenty-one patients of each class, two images each, the patient in the name: the file counts the
    patients the pattern found and where each study's came from; one file it does not match is warned of."""
    import cv2

    rng = np.random.default_rng(12)
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(42):
            img = cv2.GaussianBlur((rng.random((96, 96)) * 255).astype(np.uint8), (0, 0), 2 + 4 * rng.random())
            name = f"{label.lower()}-{i // 2:02d}_{i % 2}.png" if i < 41 else "unnamed.png"
            cv2.imwrite(str(tmp_path / "d" / label / name), img)
    with caplog.at_level("WARNING", logger="cxrscreen"):
        result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "d"), "--model", str(model_copy.path),
                                           "--bootstrap", "50", "--patient-pattern", r"/([a-z]+-\d+)_",
                                           "--out", str(tmp_path / "cal.json")])
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "cal.json").read_text())
    assert out["n"] == {"NORMAL": 42, "PNEUMONIA": 42} and out["patients"] == {"NORMAL": 22, "PNEUMONIA": 22}
    lines = result.stdout.splitlines()          # what a person reads
    assert lines[0] == "42 NORMAL and 42 PNEUMONIA studies (of 22 and 22 patients: the intervals resample patients)"
    assert lines[1] == f"ROC AUC {out['auc']:.3f} (95% CI {out['auc_ci95'][0]:.3f}-{out['auc_ci95'][1]:.3f})"
    assert lines[2].startswith(f"threshold {out['threshold']:.4f}: the highest at which the sensitivity reaches")
    assert lines[-1] == f"wrote {tmp_path / 'cal.json'} and {tmp_path / 'cal.png'}"
    assert out["patients_from"] == {"pattern": 82, "study": 2} and out["patient_pattern"] == r"/([a-z]+-\d+)_"
    assert "found no patient in the files of 2 of 84 studies: their patient is the DICOM Patient ID (0) or the " \
           "study itself (2)" in caplog.text


def test_an_interval_holds_the_exact_binomial_one_where_the_bootstrap_collapses():
    """Every positive above the threshold: the percentile bootstrap says sensitivity [1, 1]; 60 of 60 are as
    consistent with 0.95 (Clopper-Pearson lower bound 0.9404)."""
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(1.5, 1, 60), rng.normal(-1, 1, 60)]
    labels = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    threshold = threshold_for_sensitivity(scores, labels, 0.99)
    assert operating_point(scores, labels, threshold).sensitivity == 1.0
    ci = bootstrap_intervals(scores, labels, threshold, n_boot=300)
    assert ci["sensitivity"][0] == pytest.approx(0.940370, abs=1e-6)
    assert ci["sensitivity"][1] == 1.0
    assert exact_interval(60, 60)[0] == pytest.approx(0.025 ** (1 / 60))     # (alpha/2)^(1/n) when all hit


def test_calibrate_warns_when_every_positive_is_found_on_too_few(tmp_path, model_copy):
    data = make_labeled(tmp_path / "site", 22, 24)
    result = CliRunner().invoke(main, ["calibrate", str(data), "--model", str(model_copy.path),
                                       "--target-sensitivity", "1.0", "--bootstrap", "100", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["sensitivity"] == 1.0 and out["sensitivity_ci95"][0] == pytest.approx(0.025 ** (1 / 24))
    assert out["sensitivity_lower_bound_below_target"] and "WARNING: the lower 95% bound" in result.stderr


def test_the_conservative_threshold_is_the_highest_whose_lower_bound_reaches_the_target():
    rng = np.random.default_rng(2)
    scores = np.r_[rng.normal(1.5, 1, 500), rng.normal(-1, 1, 300)]
    labels = np.r_[np.ones(500, bool), np.zeros(300, bool)]
    groups = np.r_[np.arange(500) // 2, 1000 + np.arange(300)]       # two studies per positive patient
    chosen = threshold_for_sensitivity_bound(scores, labels, 0.95, groups=groups, n_boot=300)
    assert chosen < threshold_for_sensitivity(scores, labels, 0.95)
    assert bootstrap_intervals(scores, labels, chosen, n_boot=300, groups=groups)["sensitivity"][0] >= 0.95
    higher = np.unique(scores[labels])
    higher = higher[higher > chosen][0]            # the next positive score up falls short
    assert bootstrap_intervals(scores, labels, higher, n_boot=300, groups=groups)["sensitivity"][0] < 0.95
    # 20 of 20 found: the exact lower bound is 0.832, so no threshold shows 0.95
    assert threshold_for_sensitivity_bound(scores[:40], np.r_[np.ones(20, bool), np.zeros(20, bool)], 0.95) is None


@pytest.mark.parametrize("target, refused", [(0.8, False), (0.9, True)])
def test_calibrate_conservative(tmp_path, model_copy, target, refused):
    """24 positive studies, all found, bound 0.858: enough to show 0.8, too few to show 0.9."""
    data = make_labeled(tmp_path / "site", 22, 24)
    result = CliRunner().invoke(main, ["calibrate", str(data), "--model", str(model_copy.path), "--conservative",
                                       "--target-sensitivity", str(target), "--bootstrap", "100", "--json"])
    if refused:
        assert result.exit_code == 2, result.output
        assert "lower 95% bound of sensitivity is at most 0.858, under the target 0.9" in result.output
        return
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["threshold_rule"] == "lower 95% bound of sensitivity reaches the target"
    assert out["sensitivity_ci95"][0] >= target and not out["sensitivity_lower_bound_below_target"]
    source = Calibration.load(out["file"]).operating_point["source"]
    assert "threshold where the lower 95% bound of sensitivity reaches 0.8 (" in source


def test_predictive_values_by_bayes():
    ppv, npv = predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18))
    assert npv == pytest.approx(0.72 / (0.72 + 0.01))


def test_calibrate_writes_a_file_that_batch_uses(tmp_path, model_copy):
    data = make_labeled(tmp_path / "site", 22, 24)
    (data / "PNEUMONIA" / "broken.dcm").write_text("not dicom")
    result = CliRunner().invoke(main, ["calibrate", str(data), "--model", str(model_copy.path),
                                       "--target-sensitivity", "0.9", "--bootstrap", "200", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == {"NORMAL": 22, "PNEUMONIA": 24}
    assert out["bootstrap_unit"] == "patient" and out["patients"] == {"NORMAL": 22, "PNEUMONIA": 24}   # PNGs
    assert out["threshold_rule"] == "sensitivity reaches the target"
    assert [Path(e["path"]).name for e in out["excluded"]] == ["broken.dcm"]
    assert out["model_sha256"] == model_copy.sha256 and len(out["inputs_sha256"]) == 64
    assert out["sensitivity"] >= 0.9 and out["sensitivity_ci95"][0] <= out["sensitivity"] <= out["sensitivity_ci95"][1]
    assert Path(out["file"]).parent == model_copy.path.parent and Path(out["plot"]).is_file()

    chosen = select_calibration(model_copy.path, model_copy.sha256)
    assert chosen is not None and chosen.threshold == out["threshold"]
    summary = run_batch([ROOT / "samples" / "study6_plain_jpeg"], BatchOptions(out=tmp_path / "r", gradcam="none"),
                        model=model_copy)
    assert summary.meta["threshold"] == out["threshold"] and summary.meta["calibration"] == out["file"]
    assert "site calibration" in summary.meta["operating_point"]["source"]


def test_a_calibration_for_another_model_is_refused(tmp_path, model_copy):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"format": "cxrscreen-calibration/1", "threshold": 0.1, "target_sensitivity": 0.95,
                                   "model_sha256": "0" * 64, "created": "2026-01-01T00:00:00+00:00"}))
    result = CliRunner().invoke(main, ["batch", str(ROOT / "samples" / "study6_plain_jpeg"), "--out",
                                       str(tmp_path / "o"), "--model", str(model_copy.path),
                                       "--calibration", str(foreign)])
    assert result.exit_code == 2 and "another model" in result.output
    # and one lying beside the model is ignored, not used
    shutil.copy(foreign, model_copy.path.parent / f"{model_copy.path.stem}.calibration.99999999T999999.json")
    chosen = select_calibration(model_copy.path, model_copy.sha256)
    assert chosen is None or chosen.model_sha256 == model_copy.sha256
    assert isinstance(Calibration.load(foreign), Calibration)


@pytest.mark.parametrize("normal, pneumonia, args, message", [
    (0, 25, [], "only one class"),
    (25, 10, [], "fewer than 20"),
    (25, 25, ["--target-sensitivity", "1.5"], "outside (0, 1]"),
    (25, 25, ["--target-sensitivity", "0"], "outside (0, 1]"),
])
def test_refusals_exit_2(tmp_path, model_copy, normal, pneumonia, args, message):
    data = make_labeled(tmp_path / "d", normal, pneumonia)
    (data / "NORMAL").mkdir(exist_ok=True)
    result = CliRunner().invoke(main, ["calibrate", str(data), "--model", str(model_copy.path),
                                       "--bootstrap", "50", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_calibrate_chooses_images_as_batch_does(tmp_path, model_copy, caplog):
    """A site whose modality writes BodyPartExamined TORAX screens with --chest-body-part TORAX; calibrate
    skipped all its studies as not chest, and its refusal did not say why."""
    import cv2

    from cxrscreen.testing import make_dicom, save

    rng = np.random.default_rng(11)
    for label, n in (("NORMAL", 21), ("PNEUMONIA", 21)):
        (tmp_path / "site" / label).mkdir(parents=True)
        for i in range(n):
            img = cv2.GaussianBlur((rng.random((96, 96)) * 4000).astype(np.float32), (0, 0), 2 + 4 * rng.random())
            save(make_dicom(img.astype(np.uint16), seed=f"{label}{i}", patient_id=f"{label}-{i}",
                            body_part="TORAX"), tmp_path / "site" / label / f"{i}.dcm")
    args = ["calibrate", str(tmp_path / "site"), "--model", str(model_copy.path), "--bootstrap", "50",
            "--out", str(tmp_path / "cal.json")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert "no study scored" in refused.output and "42 files excluded, all: body part 'TORAX' is not chest " \
                                                     "(--chest-body-part adds" in refused.output
    result = CliRunner().invoke(main, [*args, "--chest-body-part", "torax", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == {"NORMAL": 21, "PNEUMONIA": 21} and not out["excluded"]
    assert out["selection"] == {"include_lateral": False, "any_body_part": False, "chest_body_parts": ["TORAX"],
                                "frontal_views": []}
    # a run with other options uses it, and says its threshold was set on other images
    from cxrscreen.ingest import Selection
    from cxrscreen.pipeline import resolve_threshold

    with caplog.at_level("WARNING", logger="cxrscreen"):
        assert resolve_threshold(model_copy, None, tmp_path / "cal.json", Selection())[0] == out["threshold"]
        assert "calibrated with other selection options (--chest-body-part 'TORAX') than this run's (none)" \
            in caplog.text
        caplog.clear()
        resolve_threshold(model_copy, None, tmp_path / "cal.json", Selection(chest_body_parts={"TORAX"}))
        assert not caplog.text


def test_twenty_studies_of_two_patients_are_refused(tmp_path, model_copy):
    data = make_labeled(tmp_path / "d", 22, 22)
    csv = tmp_path / "labels.csv"
    rows = [f"{p.relative_to(tmp_path)},{p.parent.parent.name},{p.parent.parent.name}-{i % 2 if 'PNEU' in str(p) else i}"
            for i, p in enumerate(sorted(data.rglob("*.png")))]
    csv.write_text("path,label,patient\n" + "\n".join(rows) + "\n")
    result = CliRunner().invoke(main, ["calibrate", str(csv), "--model", str(model_copy.path), "--bootstrap", "50"])
    assert result.exit_code == 2, result.output
    assert "fewer than 20 patients of PNEUMONIA: studies {'NORMAL': 22, 'PNEUMONIA': 22}, patients " \
           "{'NORMAL': 22, 'PNEUMONIA': 2}" in result.output


def test_a_csv_label_that_is_neither_class_is_refused_with_its_line(tmp_path):
    from cxrscreen.calibrate import read_labeled_csv
    from cxrscreen.errors import UsageError

    good = tmp_path / "good.csv"
    good.write_text("path,label\na.jpg,PNEUMONIA\nb.jpg,normal\nc.jpg,1\nd.jpg,0\n")
    assert [label for _, label, _ in read_labeled_csv(good)] == [1, 0, 1, 0]
    typo = tmp_path / "typo.csv"
    typo.write_text("path,label\na.jpg,PNEUMONIA\nb.jpg,NROMAL\n")
    with pytest.raises(UsageError, match="line 3: label 'NROMAL'"):
        read_labeled_csv(typo)
    headless = tmp_path / "headless.csv"
    headless.write_text("a.jpg,1\n")
    with pytest.raises(UsageError, match="'path' and 'label'"):
        read_labeled_csv(headless)




@pytest.mark.parametrize("saved_as, data", [
    ("CSV UTF-8 (Excel: a byte-order mark, CRLF)", b"\xef\xbb\xbfPath,Label,Patient\r\nM\xc3\xbcller.jpg,Pneumonia,p1\r\n"
                                                  b"b.jpg,NORMAL,p2\r\n,,\r\n"),
    ("CSV (Excel, Windows-1252)", b"path,label,patient\r\nM\xfcller.jpg,PNEUMONIA,p1\r\nb.jpg,normal,p2\r\n"),
    ("CSV (Excel, German: semicolons)", b"\xef\xbb\xbfpath;label;patient\r\nM\xc3\xbcller.jpg;1;p1\r\nb.jpg;0;p2\r\n;;\r\n"),
    ("tab-separated", b"path\tlabel\tpatient\nM\xc3\xbcller.jpg\tPNEUMONIA\tp1\nb.jpg\tNORMAL\tp2\n"),
])
def test_a_csv_saved_by_a_spreadsheet_is_read(tmp_path, saved_as, data):
    """A CSV from Excel was refused or crashed: its byte-order mark made the first column '\\ufeffpath', a
    German Excel's semicolons made one column 'path;label', 'Path' was not 'path', and Windows-1252 text
    (Excel's plain CSV) raised UnicodeDecodeError with a traceback."""
    from cxrscreen.calibrate import read_labeled_csv

    (tmp_path / "labels.csv").write_bytes(data)
    assert read_labeled_csv(tmp_path / "labels.csv") == [(tmp_path / "Müller.jpg", 1, "p1"), (tmp_path / "b.jpg", 0, "p2")]


def test_a_csv_row_without_a_path_or_labelled_both_ways_or_in_no_text_encoding_is_refused(tmp_path):
    from cxrscreen.calibrate import read_labeled_csv
    from cxrscreen.errors import UsageError

    (tmp_path / "a.csv").write_text("path,label\na.jpg,1\n,NORMAL\n")
    with pytest.raises(UsageError, match="line 3: no path"):
        read_labeled_csv(tmp_path / "a.csv")
    (tmp_path / "c.csv").write_text("path,label\na.jpg,1\nb.jpg,0\n./a.jpg,NORMAL\n")
    with pytest.raises(UsageError, match=r"line 4: ./a.jpg is labelled NORMAL here and PNEUMONIA on line 2"):
        read_labeled_csv(tmp_path / "c.csv")
    (tmp_path / "c.csv").write_text("path,label\na.jpg,1\nb.jpg,0\n./a.jpg,PNEUMONIA\n")      # alike: read once
    assert [p.name for p, _, _ in read_labeled_csv(tmp_path / "c.csv")] == ["a.jpg", "b.jpg"]
    (tmp_path / "b.csv").write_bytes(b"path,label\n\x81\x8d.jpg,1\n")     # bytes Windows-1252 leaves undefined
    with pytest.raises(UsageError, match="neither UTF-8 nor Windows-1252"):
        read_labeled_csv(tmp_path / "b.csv")

def test_a_calibration_that_cannot_be_written_is_an_error_naming_it_not_a_traceback(tmp_path, model_copy,
                                                                                     monkeypatch):
    """Beside a model installed read-only (site-packages), the write failed after scoring the whole set,
    with a traceback. Now a folder that cannot be written is refused before scoring; a write that fails
    anyway (here: --out under a plain file) is one line naming it; both exit 1."""
    import os

    from cxrscreen import pipeline

    data = make_labeled(tmp_path / "site", 20, 20)
    scored = []
    real_score, real_access = pipeline.score_studies, os.access
    monkeypatch.setattr(pipeline, "score_studies", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    # root may write anywhere, so the read-only folder is the model's folder made unwritable to os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: (Path(path) != model_copy.path.parent or mode != os.W_OK)
                        and real_access(path, mode, **k))
    args = ["calibrate", str(data), "--model", str(model_copy.path), "--bootstrap", "50"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and not scored, result.output
    assert result.stderr.strip() == (f"cxrscreen: error: {model_copy.path.parent} [calibration]: cannot write the "
                                     f"calibration in {model_copy.path.parent} beside the model: permission denied; "
                                     "give --out FILE")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, [*args, "--out", str(blocker / "cal.json")])
    assert result.exit_code == 1 and scored and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"cxrscreen: error: {blocker}") and "cannot write the calibration" in result.stderr


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_calibrate_stopped_by_ctrl_c_or_sigterm_says_nothing_was_written(tmp_path, model_copy, monkeypatch, signame):
    """Ctrl-C ended calibrate with click's bare "Aborted!" (exit 1), SIGTERM without a word. Now either is a line
    saying what was written, and exit 128 + the signal's number. The signal arrives once every study is scored."""
    import os
    import signal

    from cxrscreen import calibrate

    data = make_labeled(tmp_path / "site", 20, 20)
    real = calibrate.bootstrap_intervals

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signame))
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "bootstrap_intervals", signalled)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "cal.json"
    result = CliRunner().invoke(main, ["calibrate", str(data), "--model", str(model_copy.path), "--bootstrap", "50",
                                       "--out", str(out)])
    assert result.exit_code == 128 + getattr(signal, signame), result.output
    said = "Ctrl-C (SIGINT)" if signame == "SIGINT" else "SIGTERM"
    assert result.stderr.strip().endswith(f"cxrscreen calibrate: stopped by {said}; no calibration written (it is "
                                          "written whole, once every study is scored)"), result.stderr
    assert "Aborted" not in result.output and not out.exists() and not list(tmp_path.glob(".cal.json.*"))
    assert signal.getsignal(signal.SIGTERM) is before       # put back for whoever called the command


def test_patients_that_share_an_identical_image_are_resampled_as_one_and_warned_of(tmp_path, model_copy, caplog):
    """The same picture under two patients (a study sent again under another ID, a copy in another folder) was
    two patients' evidence to the bootstrap, and a picture labelled both NORMAL and PNEUMONIA went unsaid. Now
    such patients are one group, the calibration counts them, and both are warned of, naming the files."""
    data = make_labeled(tmp_path / "site", 22, 22)
    shutil.copy(data / "NORMAL" / "nested" / "NORMAL_0.png", data / "NORMAL" / "nested" / "again.png")
    shutil.copy(data / "NORMAL" / "nested" / "NORMAL_1.png", data / "NORMAL" / "nested" / "and-again.png")
    shutil.copy(data / "PNEUMONIA" / "nested" / "PNEUMONIA_0.png", data / "NORMAL" / "nested" / "mislabelled.png")
    args = ["calibrate", str(data), "--model", str(model_copy.path), "--bootstrap", "50", "--json",
            "--out", str(tmp_path / "cal.json")]
    with caplog.at_level("WARNING", logger="cxrscreen.calibrate"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == {"NORMAL": 25, "PNEUMONIA": 22}       # every study is scored, as before
    # 47 studies, each its own patient until now; the three copies join their originals' patients. The
    # mislabelled copy's patient holds both classes: one patient counted in each, drawn whole
    assert out["patients"] == {"NORMAL": 23, "PNEUMONIA": 22}
    assert out["identical_images"] == {"across_patients": 3, "labelled_both": 1}
    assert "3 groups of identical images are keyed to different patients" in caplog.text
    assert ("1 groups of identical images are labelled both NORMAL and PNEUMONIA: check those labels, e.g. "
            in caplog.text and "mislabelled.png" in caplog.text and "PNEUMONIA_0.png" in caplog.text)


def test_calibrate_says_how_far_its_scoring_has_come(tmp_path, model_copy, caplog):
    """A site's calibration set of thousands of studies takes minutes on a CPU, and calibrate said nothing until
    it was done. It now says as batch does (a bar on a terminal; else a line each hundred images and at the end);
    nothing with --json."""
    data = make_labeled(tmp_path / "site", 60, 60)
    args = ["calibrate", str(data), "--model", str(model_copy.path), "--bootstrap", "20", "--out",
            str(tmp_path / "cal.json")]
    with caplog.at_level("INFO", logger="cxrscreen"):
        assert CliRunner().invoke(main, args).exit_code == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scored ")]
    assert said[0].startswith("scored 1") and said[-1] == "scored 120/120 images", said
    caplog.clear()
    with caplog.at_level("INFO", logger="cxrscreen"):
        assert CliRunner().invoke(main, [*args, "--json"]).exit_code == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("scored ")]
