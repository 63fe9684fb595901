"""Training: patient-level split, a smoke fit that writes a loadable model + card, the Lite0 port."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from cxrscreen.calibrate import operating_point, roc_auc, threshold_for_sensitivity
from cxrscreen.infer import Population, card_path, default_model_path, load_model
from cxrscreen.normalise import (PreprocessSpec, equalize_input, load_model_input, load_unit_image,
                                 resize_to_input)
from training import data as D
from training.lite import DEFAULT_WEIGHTS


@pytest.fixture
def labeled_folder(tmp_path):
    """A tiny dataset in the Kermany layout: bright blobs for PNEUMONIA, none for NORMAL, 2 images a patient."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(10 if split == "train" else 4):
                img = (rng.random((96, 96)) * 60 + 60).astype(np.uint8)
                if label == "PNEUMONIA":
                    cv2.circle(img, (int(rng.integers(20, 76)), int(rng.integers(20, 76))), 15, 230, -1)
                    name = f"person{i // 2 + (100 if split == 'test' else 0)}_bacteria_{i}.jpeg"
                else:
                    name = f"IM-{i // 2 + (100 if split == 'test' else 0):04d}-000{i % 2}.jpeg"
                cv2.imwrite(str(folder / name), img)
    return tmp_path


def test_patient_ids_from_kermany_names():
    assert D.patient_id("person123_bacteria_4.jpeg") == "person123"
    assert D.patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert D.patient_id("NORMAL2-IM-0468-0001.jpeg") == "NORMAL2-IM-0468"
    assert D.patient_id("2026-01-03.png") == ""      # no patient in the name: list_examples keys the file itself


def test_files_that_are_not_images_or_cannot_be_decoded_are_left_out_and_listed(labeled_folder):
    """A non-image vanished from the data without a word, and a corrupt JPEG stopped a training run when
    its batch came. Now both are left out before training, each with its reason."""
    folder = labeled_folder / "train"
    before = D.list_examples(folder)
    good = next((folder / "PNEUMONIA").iterdir()).read_bytes()
    (folder / "NORMAL" / "notes.txt").write_text("scanned at 300 dpi")
    (folder / "PNEUMONIA" / "person90_virus_cut.jpeg").write_bytes(good[:300])                  # header cut
    (folder / "PNEUMONIA" / "person91_virus_body.jpeg").write_bytes(good[:len(good) * 2 // 3])  # scan cut
    excluded: list[dict] = []
    assert D.list_examples(folder, excluded, workers=2) == before
    reasons = {Path(item["path"]).name: item["reason"] for item in excluded}
    assert reasons["notes.txt"] == "not a DICOM, JPEG or PNG file"
    assert sorted(reasons) == ["notes.txt", "person90_virus_cut.jpeg", "person91_virus_body.jpeg"]
    assert all(reasons.values())


def test_class_folders_are_found_in_any_case_as_calibrate_finds_them(labeled_folder, tmp_path):
    """calibrate took `normal/` and `Pneumonia/`; training stopped with 'NORMAL not found', and passed over
    a `Test/` split."""
    import shutil

    before = [(Path(e.path).name, e.label) for e in D.list_examples(labeled_folder / "train")]
    shutil.copytree(labeled_folder / "train" / "NORMAL", tmp_path / "data" / "normal")
    shutil.copytree(labeled_folder / "train" / "PNEUMONIA", tmp_path / "data" / "Pneumonia")
    assert [(Path(e.path).name, e.label) for e in D.list_examples(tmp_path / "data")] == before
    shutil.rmtree(tmp_path / "data" / "normal")
    with pytest.raises(SystemExit, match="must hold NORMAL/ and PNEUMONIA/ folders"):
        D.list_examples(tmp_path / "data")
    # and the split folders: a `Test/` was not found, and the card then had no test metrics, without a word
    splits = tmp_path / "splits"
    (splits / "Test").mkdir(parents=True)
    (splits / "training.txt").write_text("notes")
    assert D.split_folder(splits, "test") == splits / "Test"
    assert D.split_folder(splits, "train") is None and D.split_folder(splits / "training.txt", "test") is None


def test_patient_split_never_leaks_and_is_seeded(labeled_folder):
    examples = D.list_examples(labeled_folder / "train")
    train, val = D.patient_split(examples, 0.3, seed=7)
    assert {e.patient for e in train}.isdisjoint({e.patient for e in val})
    assert len(train) + len(val) == len(examples)
    assert {e.label for e in val} == {0, 1}
    again_train, again_val = D.patient_split(examples, 0.3, seed=7)
    assert [e.path for e in again_val] == [e.path for e in val]


def test_a_dicom_patient_is_the_one_its_header_names_on_one_side_of_the_split(tmp_path):
    """A site's DICOM training data: each file was its own patient (its file name), so a patient's images
    went to both sides of the validation split. Now the DICOM Patient ID (with its issuer) keys them, as
    calibration does; a CSV's patient column still comes first, and a JPEG keeps its name's patient."""
    import cv2

    from cxrscreen.testing import make_dicom, save, uid_from

    rng = np.random.default_rng(4)
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(24):       # twelve patients of each class, two images each, named by their UIDs
            img = cv2.GaussianBlur((rng.random((80, 80)) * 4000).astype(np.float32), (0, 0), 3).astype(np.uint16)
            save(make_dicom(img, seed=f"{label}{i}", patient_id=f"{label[:2]}{i // 2:02d}"),
                 tmp_path / "train" / label / f"{uid_from(label + str(i))}.dcm")
    cv2.imwrite(str(tmp_path / "train" / "NORMAL" / "person7_x.png"), (rng.random((80, 80)) * 255).astype(np.uint8))
    examples = D.list_examples(tmp_path / "train")
    by_name = {e.path.name: e.patient for e in examples}
    assert len(examples) == 49 and by_name.pop("person7_x.png") == "person7"
    assert sorted(set(by_name.values())) == sorted(f"dicom:\\{c}{n:02d}" for c in ("NO", "PN") for n in range(12))
    for seed in range(5):
        train, val = D.patient_split(examples, 0.3, seed=seed)
        assert {e.patient for e in train}.isdisjoint({e.patient for e in val})
        assert all(sum(e.patient == p for e in val) == 2 for p in {e.patient for e in val} if p != "person7")
    # a CSV: its patient column first, else the header
    dicoms = sorted((tmp_path / "train" / "PNEUMONIA").glob("*.dcm"))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,patient\n" + f"{dicoms[0]},PNEUMONIA,kid-1\n{dicoms[1]},PNEUMONIA,\n")
    assert [e.patient for e in D.list_examples(csv)] == ["kid-1", by_name[dicoms[1].name]]


def test_a_patient_pattern_finds_each_patient_in_the_paths_for_the_split(tmp_path, caplog):
    """A site's exported images, one folder per patient and named by date: without a pattern each name was a
    "patient" (the same date in two folders, one patient), and a patient's images went to both sides of the
    split. ``--patient-pattern`` reads the patient from the path as calibration does: after a CSV's patient
    column, before the DICOM Patient ID and the file name; files it misses are warned of, and a pattern that
    finds nobody is refused."""
    import re

    import cv2

    from cxrscreen.errors import UsageError
    from cxrscreen.testing import make_dicom, save

    rng = np.random.default_rng(5)
    for label in ("NORMAL", "PNEUMONIA"):
        for n in range(12):
            folder = tmp_path / "train" / label / f"P{label[0]}{n:03d}"
            folder.mkdir(parents=True)
            for day in (3, 4):
                cv2.imwrite(str(folder / f"2026-01-0{day}.png"), (rng.random((64, 64)) * 255).astype(np.uint8))
    unsorted = tmp_path / "train" / "PNEUMONIA" / "unsorted"
    unsorted.mkdir()
    save(make_dicom((rng.random((64, 64)) * 4000).astype(np.uint16), seed="u", patient_id="H77"), unsorted / "a.dcm")
    cv2.imwrite(str(unsorted / "person9_virus_1.png"), (rng.random((64, 64)) * 255).astype(np.uint8))
    pattern = re.compile(r"^[A-Z]+/(P[NP]\d+)/")

    with caplog.at_level("WARNING", logger="training"):
        without = D.list_examples(tmp_path / "train")
    # without a pattern each of those files is its own patient, said so (it was its name: two dates, for 48
    # files of 24 patients); the DICOM keeps its header's, the Kermany name its patient
    assert len({e.patient for e in without}) == 50
    assert D.patients_from(without) == {"dicom": 1, "file": 48, "name": 1}
    assert "48 of 50 files name no patient" in caplog.text and "give --patient-pattern" in caplog.text
    assert {e.patient for e in without if e.path.name == "2026-01-03.png" and e.path.parent.name == "PN000"} == \
        {"file:NORMAL/PN000/2026-01-03.png"}
    caplog.clear()
    with caplog.at_level("WARNING", logger="training"):
        examples = D.list_examples(tmp_path / "train", patient_pattern=pattern)
    by_path = {e.path.relative_to(tmp_path / "train").as_posix(): e for e in examples}
    assert by_path["NORMAL/PN003/2026-01-04.png"].patient == "PN003"
    assert by_path["PNEUMONIA/PP011/2026-01-03.png"].patient_from == "pattern"
    assert (by_path["PNEUMONIA/unsorted/a.dcm"].patient, by_path["PNEUMONIA/unsorted/a.dcm"].patient_from) == \
        ("dicom:\\H77", "dicom")
    assert by_path["PNEUMONIA/unsorted/person9_virus_1.png"].patient == "person9"
    assert D.patients_from(examples) == {"dicom": 1, "name": 1, "pattern": 48}
    assert "found no patient in the paths of 2 of 50 files" in caplog.text and "name no patient" not in caplog.text
    for seed in range(5):
        train, val = D.patient_split(examples, 0.3, seed=seed)
        assert {e.patient for e in train}.isdisjoint({e.patient for e in val})
        assert sum(e.patient_from == "pattern" for e in val) % 2 == 0 and val     # both of a patient's days

    # a CSV: paths relative to its folder, its patient column first
    rows = [("train/NORMAL/PN001/2026-01-03.png", "NORMAL", "kid-1"),
            ("train/NORMAL/PN001/2026-01-04.png", "NORMAL", ""),
            ("train/PNEUMONIA/PP002/2026-01-03.png", "PNEUMONIA", "")]
    (tmp_path / "labels.csv").write_text("path,label,patient\n" + "".join(f"{r[0]},{r[1]},{r[2]}\n" for r in rows))
    listed = D.list_examples(tmp_path / "labels.csv", patient_pattern=re.compile(r"/(P[NP]\d+)/"))
    assert [(e.patient, e.patient_from) for e in listed] == [("kid-1", "csv"), ("PN001", "pattern"),
                                                             ("PP002", "pattern")]
    with pytest.raises(UsageError, match=r"finds no patient in any of the 50 files' paths \(one is 'NORMAL/"):
        D.list_examples(tmp_path / "train", patient_pattern=re.compile(r"^patients/(\d+)/"))


def test_training_commands_refuse_a_patient_pattern_that_is_not_one_or_finds_nobody(labeled_folder, tmp_path):
    from click.testing import CliRunner

    from training.__main__ import cli

    runner = CliRunner()
    bad = runner.invoke(cli, ["fit", "--data", str(labeled_folder), "--out", str(tmp_path / "m.keras"),
                              "--patient-pattern", "person(\\d+"])
    assert bad.exit_code == 2 and "is not a regular expression" in bad.output
    nobody = runner.invoke(cli, ["fit", "--data", str(labeled_folder), "--out", str(tmp_path / "m.keras"),
                                 "--patient-pattern", "^P\\d+/", "--weights", "none", "--no-test"])
    assert nobody.exit_code == 2 and "finds no patient in any of the 20 files' paths" in nobody.output
    assert not (tmp_path / "m.keras").exists()
    evaluate = ["evaluate", "--model", str(default_model_path()), "--data", str(labeled_folder / "test")]
    both = runner.invoke(cli, [*evaluate, "--record", "--patient-pattern", "person"])
    assert both.exit_code == 2 and "not taken with it" in both.output
    scored = runner.invoke(cli, [*evaluate, "--patient-pattern", "^P\\d+/"])
    assert scored.exit_code == 2 and "finds no patient in any of the 8 files' paths" in scored.output


def test_patients_that_share_an_identical_image_stay_on_one_side_of_the_split(tmp_path, caplog):
    """The same radiograph exported twice, under two patient IDs (a merged record, a re-sent study with new
    UIDs): split by patient, one copy could be trained on and the other validated on. Patients that share a
    decoded image are kept together; identical images labelled both classes are warned of."""
    import cv2

    from cxrscreen.testing import make_dicom, save

    rng = np.random.default_rng(6)

    def image():
        return cv2.GaussianBlur((rng.random((72, 72)) * 4000).astype(np.float32), (0, 0), 2).astype(np.uint16)

    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for n in range(24):
            for k in range(2):
                save(make_dicom(image(), seed=f"{label}{n}-{k}", patient_id=f"{label[:2]}{n:02d}"),
                     tmp_path / "train" / label / f"{label}{n}-{k}.dcm")
    shared = image()        # one picture, sent again under another patient's ID
    save(make_dicom(shared, seed="twice-a", patient_id="NO03"), tmp_path / "train" / "NORMAL" / "twice-a.dcm")
    save(make_dicom(shared, seed="twice-b", patient_id="NO17"), tmp_path / "train" / "NORMAL" / "twice-b.dcm")
    contradicted = image()
    save(make_dicom(contradicted, seed="both-a", patient_id="NO05"), tmp_path / "train" / "NORMAL" / "both-a.dcm")
    save(make_dicom(contradicted, seed="both-b", patient_id="PN05"), tmp_path / "train" / "PNEUMONIA" / "both-b.dcm")
    with caplog.at_level("WARNING", logger="training"):
        examples = D.list_examples(tmp_path / "train")
    assert "2 groups of identical images are keyed to different patients" in caplog.text
    assert "1 groups of identical images are labelled both NORMAL and PNEUMONIA" in caplog.text
    apart = 0
    for seed in range(20):
        train, val = D.patient_split(examples, 0.3, seed=seed)
        validated = {e.patient for e in val}
        assert {e.patient for e in train}.isdisjoint(validated)
        assert ("dicom:\\NO03" in validated) == ("dicom:\\NO17" in validated)
        assert ("dicom:\\NO05" in validated) == ("dicom:\\PN05" in validated)
        apart += ("dicom:\\NO04" in validated) != ("dicom:\\NO03" in validated)
    assert apart        # patients that share nothing are still split apart
    # a bootstrap by patient (evaluate's) resamples them as one: 24 + 24 patients named, 46 groups
    joined = D.joined_patients(examples)
    assert len(set(joined)) == len({e.patient for e in examples}) - 2 == 46
    assert joined[[e.path.name for e in examples].index("twice-b.dcm")] == "dicom:\\NO03"
    # examples read back from a split file carry no digest: each patient on its own, as written
    plain = [D.Example(e.path, e.label, e.patient) for e in examples]
    assert len({e.patient for e in D.patient_split(plain, 0.3, seed=1)[1]}) > 0


def test_class_weights_balance_the_classes():
    examples = [D.Example(Path(f"{i}"), int(i >= 25), str(i)) for i in range(100)]
    weights = D.class_weights(examples)
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(100 / 150)


@pytest.mark.parametrize("level", sorted(D.AUGMENT_LEVELS))
def test_augmentation_keeps_range_and_never_flips(level):
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 1), np.float32)
    img[:, :20] = 1.0   # bright band on the left
    changed = 0
    for _ in range(20):
        out = D.augment(img, rng, level)
        assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert out[:, :16].mean() > out[:, -16:].mean()
        changed += not np.allclose(out, img)
    assert changed == 20


def test_batches_equalize_after_augmenting_and_match_screening_input(labeled_folder):
    """Training: resize, augment, then the card's CLAHE; validation: exactly what screening computes."""
    examples = D.list_examples(labeled_folder / "train")[:3]
    spec = PreprocessSpec(input_size=(48, 48), equalize="clahe")
    val_x, val_y = D.make_sequence(examples, spec, batch_size=3, train=False, workers=1)[0]
    expected = np.stack([load_model_input(e.path, spec) for e in examples])
    np.testing.assert_array_equal(val_x, expected)
    assert list(val_y) == [e.label for e in examples]

    seq = D.make_sequence(examples, spec, batch_size=3, train=True, seed=5, workers=1)
    train_x, _ = seq[0]
    rng = np.random.default_rng((5, 0, 0))
    augmented = [D.augment(resize_to_input(load_unit_image(examples[i].path), spec), rng, "standard")
                 for i in seq.order[:3]]
    np.testing.assert_array_equal(train_x, np.stack([equalize_input(img, spec) for img in augmented]))
    assert not np.allclose(train_x, np.stack(augmented), atol=0.02)   # the equalisation did happen


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="converted Lite0 weights not in models/")
def test_smoke_fit_writes_a_loadable_model_and_card(labeled_folder, tmp_path, caplog):
    from training.train import FitConfig, fit

    import shutil

    out = tmp_path / "models" / "smoke.keras"
    config = FitConfig(input_size=64, batch_size=8, head_epochs=1, finetune_epochs=1, val_fraction=0.3,
                       workers=1, equalize="clahe")
    # a training image in the test split too, under another name: its test figures count it as unseen, said so
    shutil.copy(labeled_folder / "train" / "PNEUMONIA" / "person0_bacteria_0.jpeg",
                labeled_folder / "test" / "PNEUMONIA" / "person300_bacteria_9.jpeg")
    with caplog.at_level("WARNING", logger="training"):
        card = fit(labeled_folder, out, config, population=Population("synthetic phantoms", (1, 5)))
    assert card["data"]["test"]["identical_to_training"] == 1 and card["data"]["test"]["PNEUMONIA"] == 5
    assert "1 test images are identical to training or validation images" in caplog.text
    for suffix in (".json", ".split.csv", ".roc.png", ".training_curves.png"):
        assert (out.parent / f"smoke{suffix}").is_file() or out.with_suffix(suffix).is_file()
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["preprocessing"]["input_size"] == [64, 64] and written["preprocessing"]["equalize"] == "clahe"
    assert written["threshold"]["chosen_on"] == "validation"
    assert written["metrics"]["test"]["n_positive"] == 5 and written["data"]["horizontal_flips"] is False
    assert written["data"]["excluded"] == []
    with zipfile.ZipFile(out) as archive:      # saved for inference: no optimizer state
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        assert "optimizer" not in weights
    split = (out.parent / "smoke.split.csv").read_text().splitlines()[1:]
    sides = {}
    for line in split:
        side, _, _, patient = line.split(",")
        sides.setdefault(patient, set()).add(side)
    assert all(len(s) == 1 for s in sides.values())
    # the screening side reads input size, preprocessing and threshold from the card
    loaded = load_model(out)
    assert loaded.input_size == (64, 64) and loaded.card.threshold == card["threshold"]["value"]
    assert loaded.card.preprocessing == PreprocessSpec(input_size=(64, 64), equalize="clahe")
    assert written["population"] == {"description": "synthetic phantoms", "age_years": [1, 5]}
    assert loaded.card.population == Population("synthetic phantoms", (1, 5))
    image = load_model_input(next((labeled_folder / "test" / "NORMAL").iterdir()), loaded.card.preprocessing)
    assert image.shape == (64, 64, 1)
    score = loaded.predict(image[None])
    assert score.shape == (1,) and 0 <= score[0] <= 1


def test_a_test_split_or_output_folder_that_cannot_be_used_is_refused_before_training(labeled_folder, tmp_path):
    """The test split is listed after training: a --test folder without NORMAL/ and PNEUMONIA/ (or a CSV with a
    bad row) stopped the run there, the training done and the model saved without its card. An output folder
    it may not write stopped it at the first checkpoint; an unknown backbone once every image was
    decoded."""
    from cxrscreen.errors import UsageError
    from training.ensemble import make_ensemble
    from training.train import FitConfig, fit

    (tmp_path / "elsewhere" / "images").mkdir(parents=True)
    bad_csv = tmp_path / "test.csv"
    bad_csv.write_text("path,label\nx.png,MAYBE\n")
    out = tmp_path / "m" / "m.keras"
    config = FitConfig(input_size=32, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3, workers=1)
    with pytest.raises(SystemExit, match="must hold NORMAL/ and PNEUMONIA/"):
        fit(labeled_folder, out, config, test_dir=tmp_path / "elsewhere")
    assert not any(out.parent.iterdir())       # nothing trained, nothing written
    with pytest.raises(UsageError, match="line 2: label 'MAYBE'"):
        fit(labeled_folder, out, config, test_dir=bad_csv)
    assert not any(out.parent.iterdir())
    with pytest.raises(SystemExit, match="must hold NORMAL/ and PNEUMONIA/"):
        make_ensemble([default_model_path(), default_model_path()], labeled_folder, tmp_path / "e" / "e.keras",
                      test_dir=tmp_path / "elsewhere")
    assert not any((tmp_path / "e").iterdir())
    # an unknown backbone (or weights that cannot be had) is said before the images are listed and decoded
    from training import train as T

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T.D, "list_examples", lambda *args, **kwargs: pytest.fail("listed the images first"))
        with pytest.raises(KeyError, match="unknown backbone 'resnet9000'"):
            fit(labeled_folder, out, FitConfig(backbone="resnet9000", input_size=32, workers=1))
    locked = tmp_path / "locked"      # a folder it may not write (os.access: root may write anywhere)
    real_access = os.access
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
        with pytest.raises(SystemExit, match=f"cannot write in {locked}: permission denied"):
            fit(labeled_folder, locked / "m.keras", config)
        with pytest.raises(SystemExit, match="permission denied"):
            make_ensemble([default_model_path(), default_model_path()], labeled_folder, locked / "e.keras")


def test_card_population_round_trips_and_warns_outside_its_ages():
    from cxrscreen.errors import ModelError
    from cxrscreen.infer import ModelCard

    card = json.loads(card_path(default_model_path()).read_text())
    population = ModelCard.from_json(card).population
    assert population.age_years == (1, 5) and "Kermany" in population.description
    assert Population.from_json(population.to_json()) == population
    assert [bool(population.age_warning(a)) for a in (None, 0.9, 1.0, 3.5, 5.99, 6.0, 40.0)] == \
        [False, True, False, False, False, True, True]
    assert population.age_warning(0.75).startswith("patient aged 9 months, outside")
    with pytest.raises(ModelError, match="population age_years"):
        ModelCard.from_json({**card, "population": {"description": "x", "age_years": [9, 2]}})


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="converted Lite0 weights not in models/")
def test_gpu_path_trains_in_mixed_precision_and_saves_a_float32_model(labeled_folder, tmp_path, monkeypatch):
    """What fit does when a GPU is present, run on the CPU: mixed_float16 and a batch of 64 while
    training; the saved model computes in float32 (screening runs on CPU servers) and the process's
    policy is float32 again afterwards."""
    import keras

    from training import train as T

    monkeypatch.setattr(T, "has_gpu", lambda: True)
    out = tmp_path / "gpu" / "mixed.keras"
    config = T.FitConfig(input_size=64, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3,
                         workers=1)
    card = T.fit(labeled_folder, out, config, test_dir=False)
    assert card["training"]["precision"] == "mixed_float16" and card["training"]["batch_size"] == 64
    assert keras.mixed_precision.global_policy().name == "float32"
    loaded = load_model(out)
    policies = {layer.dtype_policy.name for layer in loaded.keras_model.layers}
    assert policies == {"float32"}, policies
    assert loaded.card.population is None and loaded.card.trained_on == ""   # a card that does not say whom
    score = loaded.predict(np.zeros((1, 64, 64, 1), np.float32))
    assert score.dtype == np.float64 and 0 <= score[0] <= 1
    # the threshold and the validation figures are those of the saved float32 model, the one screened,
    # not of the float16 model training left in memory
    val = D.split_examples(out.parent / card["data"]["split_file"], "validation")
    scores = loaded.predict(np.stack([load_model_input(e.path, loaded.card.preprocessing) for e in val]))
    labels = np.array([e.label for e in val])
    assert card["threshold"]["value"] == threshold_for_sensitivity(scores, labels, 0.95)
    assert card["metrics"]["validation"] == operating_point(scores, labels, card["threshold"]["value"]).to_json()


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="converted Lite0 weights not in models/")
def test_record_test_scores_the_test_split_once_into_the_card(labeled_folder, tmp_path):
    from training.train import FitConfig, evaluate, fit, record_test

    out = tmp_path / "nt" / "no-test.keras"
    pattern = r"(?:person|IM-)(\d+)"     # the card keeps it; the test split's patients are found with it too
    config = FitConfig(input_size=32, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3, workers=1,
                       patient_pattern=pattern)
    card = fit(labeled_folder, out, config, test_dir=False)
    assert card["metrics"]["test"] is None and card["data"]["test"] is None
    assert card["data"]["patient_pattern"] == pattern and card["data"]["train"]["patients_from"] == {
        "pattern": card["data"]["train"]["NORMAL"] + card["data"]["train"]["PNEUMONIA"]}
    assert {row.split(",")[3] for row in out.with_suffix(".split.csv").read_text().split()[1:]} == \
        {str(n) for n in range(5)} | {f"{n:04d}" for n in range(5)}
    recorded = record_test(out, labeled_folder / "test")
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["metrics"]["test"] == recorded["metrics"]["test"]
    assert on_disk["data"]["test"]["NORMAL"] == 4 and on_disk["data"]["test"]["PNEUMONIA"] == 4
    assert on_disk["data"]["test"]["patients"] == 4 and on_disk["data"]["test"]["patients_from"] == {"pattern": 8}
    assert on_disk["metrics"]["validation"] == card["metrics"]["validation"]     # nothing else moves
    again = evaluate(out, labeled_folder / "test")
    assert again["auc"] == pytest.approx(on_disk["metrics"]["test"]["auc"])
    assert len(again["patients"]) == len(again["scores"]) and all(again["patients"])   # for the bootstrap
    assert again["patients_from"] == {"name": 8}
    assert sorted(set(evaluate(out, labeled_folder / "test", patient_pattern=pattern)["patients"])) == \
        ["0100", "0101", "100", "101"]
    with pytest.raises(SystemExit, match="scored once"):
        record_test(out, labeled_folder / "test")


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="converted Lite0 weights not in models/")
def test_rethreshold_chooses_the_threshold_again_from_the_saved_model(labeled_folder, tmp_path):
    """A card whose threshold is not the one its saved model's validation scores give (a GPU fit before
    12338ea took it from float16 scores) is corrected; its test figures are measured at the new one."""
    from training.train import FitConfig, evaluate, fit, rethreshold

    out = tmp_path / "rt" / "rt.keras"
    only_train = r"(?:person|IM-0*)([0-4])(?!\d)"     # finds the training patients, no test patient (100, 101)
    config = FitConfig(input_size=32, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3, workers=1,
                       patient_pattern=only_train)
    fit(labeled_folder, out, config, test_dir=labeled_folder / "test")    # not refused once trained: counted
    right = json.loads(card_path(out).read_text())
    train = right["data"]["train"]
    assert train["patients_from"] == {"pattern": train["NORMAL"] + train["PNEUMONIA"]}
    assert right["data"]["test"]["patients_from"] == {"name": 8} and right["data"]["test"]["patients"] == 4
    assert rethreshold(out, labeled_folder / "test") == right            # already right: unchanged, on disk too
    assert json.loads(card_path(out).read_text()) == right
    wrong = json.loads(json.dumps(right))
    wrong["threshold"]["value"] = right["threshold"]["value"] - 1e-3     # as a float16 score would put it
    wrong["metrics"]["test"]["sensitivity"] = 0.123
    card_path(out).write_text(json.dumps(wrong))
    with pytest.raises(SystemExit, match="--test"):
        rethreshold(out)
    card = rethreshold(out, labeled_folder / "test")
    assert json.loads(card_path(out).read_text()) == card
    assert card["threshold"]["value"] == right["threshold"]["value"]
    assert card["metrics"]["validation"] == right["metrics"]["validation"] == card["threshold"]["validation"]
    assert card["metrics"]["test"] == right["metrics"]["test"]
    assert card["metrics"]["test"]["threshold"] == evaluate(out, labeled_folder / "test")["threshold"]
    corrected = card["threshold"]["corrected"]
    assert corrected["previous"] == wrong["threshold"]["value"]
    assert corrected["previous_test"]["sensitivity"] == 0.123 and "rescored" in card["data"]["test"]
    assert load_model(out).card.threshold == right["threshold"]["value"]


def test_a_model_file_is_refused_beside_a_card_written_for_another(labeled_folder, tmp_path, monkeypatch):
    """The card names its model file's SHA-256: a file replaced without its card is refused by screening and by
    the commands that rewrite the card. A fit to a taken name that stops while it trains or scores leaves the
    previous model's files as they were (it left the new weights without a card when it stopped while scoring);
    one stopped while its files are moved into place leaves no card of the previous model beside the new
    weights (its threshold would have been used, silently)."""
    import shutil

    from cxrscreen.errors import ModelError
    from training import train as T

    def config(seed):
        return T.FitConfig(input_size=32, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3,
                           workers=1, seed=seed)

    first, second = tmp_path / "m" / "first.keras", tmp_path / "m" / "second.keras"
    T.fit(labeled_folder, first, config(1), test_dir=False)
    T.fit(labeled_folder, second, config(2), test_dir=False)
    assert first.read_bytes() != second.read_bytes()
    shutil.copy(second, first)
    with pytest.raises(ModelError, match="not the model file its card first.json was written for"):
        load_model(first)
    for rewrite in (lambda: T.rethreshold(first), lambda: T.record_appearance(first),
                    lambda: T.record_test(first, labeled_folder / "test")):
        with pytest.raises(SystemExit, match="not the model file its card"):
            rewrite()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    split = Path(f"{second.with_suffix('')}.split.csv")
    before = split.read_text(), card_path(second).read_text(), second.read_bytes()
    with monkeypatch.context() as m:                # stopped while training: the previous model is all there
        m.setattr(T, "finish", stopped)
        with pytest.raises(KeyboardInterrupt):
            T.fit(labeled_folder, second, config(3), test_dir=False)
    assert (split.read_text(), card_path(second).read_text(), second.read_bytes()) == before
    load_model(second)
    with monkeypatch.context() as m:                # stopped while the new model is scored: likewise
        m.setattr(T, "score_examples", stopped)
        with pytest.raises(KeyboardInterrupt):
            T.fit(labeled_folder, second, config(3), test_dir=False)
    assert (split.read_text(), card_path(second).read_text(), second.read_bytes()) == before
    assert sorted(p.name for p in second.parent.iterdir() if p.name.startswith(".")) == []    # no staging left
    load_model(second)
    moves, real = [], os.replace

    def replace(source, target):
        if Path(target).parent == second.parent:     # moved into place (not written in the staging folder)
            moves.append(Path(target).name)
            if len(moves) == 2:         # the model is in place, its split file not
                raise KeyboardInterrupt
        real(source, target)
    with monkeypatch.context() as m:
        m.setattr(T.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            T.fit(labeled_folder, second, config(3), test_dir=False)
    assert moves == ["second.keras", "second.split.csv"] and second.read_bytes() != before[2]
    assert not card_path(second).exists() and split.read_text() == before[0]
    with pytest.raises(ModelError, match="never used without its card"):
        load_model(second)
    # a run killed outright left its folder; a previous model had an appearance reference this one has not
    stale = second.parent / ".second.999999999.partial"
    stale.mkdir()
    (stale / "second.keras").write_bytes(b"half a model")
    reference = second.parent / "second.appearance.npz"
    reference.write_bytes(b"the previous model's")
    T.fit(labeled_folder, second, config(3), test_dir=False)
    load_model(second)
    assert not stale.exists() and not reference.exists()
    assert sorted(p.name for p in second.parent.iterdir() if p.name.startswith("second")) == [
        "second.json", "second.keras", "second.roc.png", "second.split.csv", "second.training_curves.png"]


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="converted Lite0 weights not in models/")
def test_the_appearance_reference_is_fitted_on_the_split_and_screening_measures_the_same(labeled_folder, tmp_path):
    from cxrscreen.pipeline import Screener
    from cxrscreen.ingest import group_studies, scan
    from training.train import FitConfig, fit, record_appearance

    out = tmp_path / "ap" / "ap.keras"     # 64 px: the top feature map is 2x2, and Grad-CAM's layer the top one
    config = FitConfig(input_size=64, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3, workers=1)
    card = fit(labeled_folder, out, config, test_dir=False)
    assert "appearance" not in card                 # 14 training images cannot say what the population looks like
    with pytest.raises(ValueError, match="more than 64 training images"):
        record_appearance(out)
    section = record_appearance(out, components=3)["appearance"]
    assert section["file"] == "ap.appearance.npz" and section["components"] == 3
    assert json.loads(out.with_suffix(".json").read_text())["appearance"] == section
    loaded = load_model(out)
    # screening measures the validation images exactly as the fit did: the largest of them is the limit
    val = D.split_examples(out.parent / "ap.split.csv", "validation")
    studies, _ = group_studies(scan([e.path for e in val]))
    results = list(Screener(loaded, gradcam="none", thumbnails=False).screen(studies))
    distances = [image.appearance for r in results for image in r.images]
    assert len(distances) == len(val) and max(distances) == pytest.approx(section["limit"], rel=1e-4)
    assert not any(image.appearance_caution for r in results for image in r.images if image.appearance
                   < section["limit"] * (1 - 1e-4))


def test_float32_config_rewrites_nested_mixed_policies():
    from training.train import float32_config

    mixed = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"}}
    config = {"layers": [{"config": {"dtype": mixed, "layer": {"config": {"dtype": dict(mixed)}}}},
                         {"config": {"dtype": {**mixed, "config": {"name": "float32"}}}}]}
    out = float32_config(config)
    assert out["layers"][0]["config"]["dtype"]["config"]["name"] == "float32"
    assert out["layers"][0]["config"]["layer"]["config"]["dtype"]["config"]["name"] == "float32"
    assert config["layers"][0]["config"]["dtype"]["config"]["name"] == "mixed_float16"   # input untouched


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="converted Lite0 weights not in models/")
def test_ensemble_of_members_on_one_split(labeled_folder, tmp_path):
    from cxrscreen.errors import ModelError
    from cxrscreen.explain import GradCam, _gradient_cam, members
    from training.ensemble import make_ensemble
    from training.train import FitConfig, fit

    pattern = r"(?:person|IM-)(\d+)"      # other keys than the name rule's: another split unless applied

    def member(name, seed, split_seed):
        config = FitConfig(input_size=64, batch_size=8, head_epochs=1, finetune_epochs=0, val_fraction=0.3,
                           workers=1, seed=seed, split_seed=split_seed, patient_pattern=pattern)
        fit(labeled_folder, tmp_path / name / f"{name}.keras", config, test_dir=False)
        return tmp_path / name / f"{name}.keras"

    first, second, other_split = member("a", 1, 7), member("b", 2, 7), member("c", 3, 8)
    out = tmp_path / "models" / "ens.keras"
    card = make_ensemble([first, second], labeled_folder, out, workers=1)
    assert [m["file"] for m in card["ensemble"]["members"]] == ["a.keras", "b.keras"]
    assert card["threshold"]["chosen_on"] == "validation" and card["metrics"]["test"]["n_positive"] == 4
    assert card["training"]["split_seed"] == 7
    assert D.read_split(out.with_suffix(".split.csv")) == D.read_split(first.with_suffix(".split.csv"))
    assert out.with_suffix(".split.csv").read_text() == first.with_suffix(".split.csv").read_text()  # patients too
    assert card["data"]["patient_pattern"] == pattern and card["data"]["test"]["patients_from"] == {"pattern": 8}
    for suffix in (".json", ".roc.png", ".training_curves.png"):
        assert out.with_suffix(suffix).is_file()

    # the screening side loads it like any model: the mean of the members, and Grad-CAM agrees with it
    ensemble, a, b = load_model(out), load_model(first), load_model(second)
    assert ensemble.card.threshold == card["threshold"]["value"]
    images = np.stack([load_model_input(p, ensemble.card.preprocessing)
                       for p in sorted((labeled_folder / "test" / "PNEUMONIA").iterdir())])
    mean = (a.predict(images) + b.predict(images)) / 2
    np.testing.assert_allclose(ensemble.predict(images), mean, atol=1e-5)
    cam = GradCam(ensemble.keras_model, ensemble.card.gradcam_layer)
    scores, cams = cam(images)
    np.testing.assert_allclose(scores, mean, atol=1e-5)
    by_gradient = _gradient_cam(ensemble.keras_model, members(ensemble.keras_model), cam.layer_name)
    assert cam.method == "forward" and len(members(ensemble.keras_model)) == 2
    np.testing.assert_allclose(cams, np.asarray(by_gradient(images)[1]), atol=1e-4)
    assert cams.shape[0] == len(images) and 0 <= cams.min() and cams.max() <= 1

    with pytest.raises(ModelError, match="another train/validation split"):
        make_ensemble([first, other_split], labeled_folder, tmp_path / "bad" / "bad.keras", workers=1)
    unlike = json.loads(card_path(second).read_text())
    unlike["data"]["patient_pattern"] = r"person(\d+)"
    card_path(second).write_text(json.dumps(unlike))
    with pytest.raises(ModelError, match="different --patient-pattern"):
        make_ensemble([first, second], labeled_folder, tmp_path / "bad" / "bad.keras", workers=1)


def test_lite2_classifier_gets_the_converted_imagenet_weights():
    """build_classifier('efficientnet_lite2') copies every trunk layer from the committed weights
    file (no torch), and the unit-grey input is scaled to (255u - 127) / 128 inside the model."""
    from training.backbones import build_classifier
    from training.lite import VARIANTS, block_specs, build_imagenet_classifier

    weights = VARIANTS["lite2"].default_weights
    if not weights.is_file():
        pytest.skip("converted Lite2 weights not in models/")
    assert len(block_specs("lite2")) == 21 and len(block_specs("lite0")) == 16
    model, names = build_classifier("efficientnet_lite2", (64, 64))
    reference = build_imagenet_classifier("lite2")
    reference.load_weights(weights)
    assert names and all(name.startswith("lite2_") for name in names)
    for name in ("lite2_stem_conv", "lite2_block20_project_conv", "lite2_top_bn"):
        for got, expected in zip(model.get_layer(name).get_weights(), reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, expected)
    scale = model.get_layer("input_scale")
    np.testing.assert_allclose(np.asarray(scale(np.array([[0.0, 1.0]], np.float32))),
                               [[-127 / 128, 128 / 128]], atol=1e-6)
    assert model.predict(np.zeros((1, 64, 64, 1), np.float32), verbose=0).shape == (1, 1)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_lite_port_matches_a_pytorch_reference(variant, tmp_path):
    """The Keras Lite0/Lite2 with converted weights and geffnet's tf_efficientnet_liteN agree on logits."""
    torch = pytest.importorskip("torch")
    geffnet = pytest.importorskip("geffnet")
    from training.lite import VARIANTS, build_imagenet_classifier, convert, load_checkpoint

    spec = VARIANTS[variant]
    pytest.importorskip(spec.module)
    state = load_checkpoint(variant=variant)
    reference = geffnet.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    keys = [k for k in reference.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == len(state) == spec.tensors
    # same tensors, same order
    reference.load_state_dict({k: torch.from_numpy(t) for k, t in zip(keys, state.values())}, strict=False)
    reference.eval()

    weights = spec.default_weights if spec.default_weights.is_file() else \
        convert(tmp_path / "w.weights.h5", variant=variant)
    model = build_imagenet_classifier(variant)
    model.load_weights(weights)
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(((rgb - 127.0) / 128.0).transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model(rgb, training=False))
    assert np.abs(got - expected).max() < 1e-3
    assert np.array_equal(got.argmax(1), expected.argmax(1))


# ---------------------------------------------------------------- threshold selection

def test_threshold_for_sensitivity_with_ties_and_perfect_separation():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.8, 0.3, 0.5, 0.2, 0.1, 0.05]
    assert threshold_for_sensitivity(scores, labels, 0.75) == 0.8      # 3 of 4 positives >= 0.8 (a tie)
    assert threshold_for_sensitivity(scores, labels, 1.0) == 0.3
    assert threshold_for_sensitivity(scores, labels, 0.5) == 0.8
    point = operating_point(scores, labels, 0.3)
    assert (point.tp, point.fp, point.tn, point.fn) == (4, 1, 3, 0)
    perfect = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]
    assert roc_auc(perfect, labels) == 1.0
    assert operating_point(perfect, labels, threshold_for_sensitivity(perfect, labels, 1.0)).specificity == 1.0
    with pytest.raises(ValueError):
        threshold_for_sensitivity(scores, labels, 0.0)


def test_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + labels * 0.3, 2)   # rounded: many ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_fit_stopped_by_ctrl_c_or_sigterm_leaves_no_checkpoint_and_says_what_it_wrote(labeled_folder, tmp_path,
                                                                                         monkeypatch, signame):
    """Ctrl-C in ``fit`` ended in click's "Aborted!" and left NAME.best.weights.h5 beside the model; SIGTERM (a
    job scheduler) killed it with that file left. Now both stop it with a line saying what it wrote, exit 128 +
    the signal's number, and no checkpoint. The signal comes just after the first checkpoint is saved."""
    import os
    import signal

    import keras
    from click.testing import CliRunner

    from training.__main__ import cli

    real = keras.callbacks.ModelCheckpoint.on_epoch_end

    def then_signal(self, epoch, logs=None):
        real(self, epoch, logs)
        assert Path(self.filepath).is_file()        # the checkpoint a stop used to leave
        os.kill(os.getpid(), getattr(signal, signame))

    monkeypatch.setattr(keras.callbacks.ModelCheckpoint, "on_epoch_end", then_signal)
    out = tmp_path / "models" / "stopped.keras"
    previous = {}
    if signame == "SIGTERM":       # a model of that name trained before: left as it was
        out.parent.mkdir()
        previous = {out: b"an earlier model", out.with_suffix(".json"): b"{}"}
        for path, data in previous.items():
            path.write_bytes(data)
    result = CliRunner().invoke(cli, ["fit", "--data", str(labeled_folder), "--out", str(out), "--input-size", "64",
                                      "--batch-size", "8", "--head-epochs", "5", "--finetune-epochs", "1",
                                      "--val-fraction", "0.3", "--workers", "1", "--no-test"])
    assert result.exit_code == 128 + getattr(signal, signame), result.output
    said = "Ctrl-C (SIGINT)" if signame == "SIGINT" else "SIGTERM"
    assert (f"python -m training fit: stopped by {said}; no model written"
            + (f"; {out} and its card are as they were" if previous else "")) in result.stderr, result.stderr
    assert "Aborted" not in result.output
    assert sorted(p.name for p in out.parent.glob("*")) == sorted(p.name for p in previous)   # no checkpoint
    assert all(path.read_bytes() == data for path, data in previous.items())


def test_a_card_rewrite_that_fails_half_way_keeps_the_card_it_had(tmp_path):
    """``evaluate --record``, ``rethreshold`` and ``appearance`` rewrote the card in place: a full disk half-way
    left it cut short and the model unusable. Here the process may write no file over 100 bytes (RLIMIT_FSIZE:
    what a full disk does to the write); the card it had is kept whole, and no temporary file is left."""
    import subprocess
    import sys

    model = tmp_path / "m.keras"
    card = tmp_path / "m.json"
    card.write_text('{"threshold": 0.5}')
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
              "from training.train import write_card\n"
              "try:\n"
              f"    write_card({str(model)!r}, {{'threshold': 0.6, 'notes': 'x' * 1000}})\n"
              "except OSError as exc:\n"
              "    print('refused', exc.errno)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.stdout.strip() == "refused 27", done.stdout + done.stderr       # EFBIG
    assert card.read_text() == '{"threshold": 0.5}' and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_training_says_how_far_it_has_come_while_it_reads_and_scores(labeled_folder, tmp_path, caplog):
    """fit read (decoded) every image, then scored validation and test, without a word: minutes of silence on a
    site's set before the first epoch and after the last. Its logger now says each tenth read (at most ten lines)
    and each stage, and python -m training shows it."""
    import logging

    from training.train import FitConfig, fit

    with caplog.at_level("INFO", logger="training"):
        fit(labeled_folder, tmp_path / "m" / "x.keras", FitConfig(input_size=64, batch_size=8, head_epochs=1,
                                                                 finetune_epochs=0, val_fraction=0.3, workers=1))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said[0] == f"read 20/20 images of {labeled_folder / 'train'}"
    assert "scoring the 8 validation images with the saved model, for the threshold" in said
    assert f"read 8/8 images of {labeled_folder / 'test'}" in said and "scoring the 8 test images, once" in said
