"""The appearance reference: fit, distances, limit, file checks; and the default model's on real pictures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from conftest import pdf_text

from cxrscreen.appearance import AppearanceReference, reference_path
from cxrscreen.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


def features(n: int, rng, off: float = 0.0) -> np.ndarray:
    """n points in 12 dimensions that vary along the first 3 (the 'training population'), plus a little
    noise everywhere; ``off`` moves them along the 12th axis, out of that subspace."""
    x = rng.normal(0, 0.05, (n, 12))
    x[:, :3] += rng.normal(0, [5.0, 3.0, 2.0], (n, 3))
    x[:, 11] += off
    return x + 10.0


def test_distance_is_what_is_left_outside_the_principal_axes():
    rng = np.random.default_rng(0)
    ref = AppearanceReference.fit(features(400, rng), features(100, rng), components=3)
    assert ref.axes.shape == (3, 12)
    np.testing.assert_allclose(ref.axes @ ref.axes.T, np.eye(3), atol=1e-6)
    # a point anywhere in the population's subspace, however far along it, is at distance ~0
    inside = ref.mean + 40.0 * ref.axes[0] - 25.0 * ref.axes[2]
    assert ref.distances(inside[None])[0] == pytest.approx(0.0, abs=1e-5)
    # the part orthogonal to the axes is the distance, exactly
    orthogonal = np.zeros(12)
    orthogonal[11] = 1.0
    orthogonal -= ref.axes.T @ (ref.axes @ orthogonal)
    point = inside + 2.5 * orthogonal / np.linalg.norm(orthogonal)
    assert ref.distances(point[None])[0] == pytest.approx(2.5, rel=1e-4)


def test_the_limit_is_the_largest_validation_distance_and_other_pictures_are_over_it():
    rng = np.random.default_rng(1)
    validation = features(100, rng)
    ref = AppearanceReference.fit(features(400, rng), validation, components=3)
    assert ref.limit == pytest.approx(ref.distances(validation).max())
    assert ref.caution(ref.limit, "a.dcm") == ""                   # no validation image is over the limit
    unlike = ref.distances(features(20, rng, off=2.0))
    assert (unlike > ref.limit).all()
    text = ref.caution(float(unlike[0]), "IM0001.dcm")
    assert text.startswith("image IM0001.dcm is unlike the model's training radiographs (appearance distance ")
    assert f"over the limit {ref.limit:.2f}" in text


def test_a_reference_needs_more_training_images_than_axes():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="more than 64 training images"):
        AppearanceReference.fit(features(30, rng), features(10, rng))


def test_the_file_round_trips_and_a_changed_or_broken_one_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    ref = AppearanceReference.fit(features(200, rng), features(50, rng), components=3)
    data = ref.to_bytes()
    path = tmp_path / "m.appearance.npz"
    path.write_bytes(data)
    loaded = AppearanceReference.load(path, hashlib.sha256(data).hexdigest())
    probe = features(5, rng, off=1.0)
    # the limit was measured with the float32 values the file keeps: the loaded reference agrees exactly
    np.testing.assert_allclose(loaded.distances(probe), ref.distances(probe), rtol=1e-12)
    assert loaded.limit == ref.limit
    with pytest.raises(ModelError, match="does not match the sha256"):
        AppearanceReference.load(path, "0" * 64)
    path.write_bytes(b"not an npz")
    with pytest.raises(ModelError, match="not a valid reference file"):
        AppearanceReference.load(path)
    np.savez(path, mean=np.zeros(5), axes=np.zeros((3, 12)), limit=1.0)
    with pytest.raises(ModelError, match="inconsistent shapes"):
        AppearanceReference.load(path)
    with pytest.raises(ModelError, match="cannot be read"):
        AppearanceReference.load(tmp_path / "missing.npz")


def test_a_card_that_names_a_missing_or_changed_reference_does_not_load(tmp_path):
    from cxrscreen.infer import default_model_path, load_model, model_files

    assert [p.name for p in model_files(default_model_path())] == [
        "cxr-default.keras", "cxr-default.json", "cxr-default.appearance.npz"]

    for suffix in (".keras", ".json"):
        shutil.copy(ROOT / "models" / f"cxr-default{suffix}", tmp_path / f"m{suffix}")
    model = tmp_path / "m.keras"
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(model)
    shutil.copy(ROOT / "models" / "cxr-default.appearance.npz", reference_path(model))
    card = json.loads((tmp_path / "m.json").read_text())
    card["appearance"]["file"] = reference_path(model).name
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert load_model(model).appearance.limit == card["appearance"]["limit"]
    card["appearance"]["layer"] = "some_other_layer"
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="Grad-CAM layer"):
        load_model(model)


def test_the_default_model_cautions_on_test_patterns_and_not_on_the_samples(tmp_path, model):
    from cxrscreen.pipeline import BatchOptions, run_batch

    box = tmp_path / "in"
    shutil.copytree(ROOT / "samples", box, ignore=shutil.ignore_patterns("*.py", "*.md"))
    # two of pydicom's test images: an SMPTE test pattern and a grey-level checkerboard, both secondary
    # captures of modality OT with no body part (so they pass selection) that the model flags
    for name in ("vlut_04.dcm", "image_dfl.dcm"):
        shutil.copy(get_testdata_file(name), box / name)
    summary = run_batch([box], BatchOptions(out=tmp_path / "out", gradcam="flagged"), model=model)
    studies = {Path(r["files"][0]).name if len(r["files"]) == 1 else r["study_uid"]: r
               for r in summary.rows if r["kind"] == "study" and r["report"]}
    assert summary.meta["appearance_limit"] == model.appearance.limit
    unlike = {name for name, r in studies.items() if r["appearance_caution"]}
    assert unlike == {"vlut_04.dcm", "image_dfl.dcm"} and summary.unfamiliar == 2
    for name, row in studies.items():
        assert isinstance(row["appearance"], float)
        assert (row["appearance"] > model.appearance.limit) is (name in unlike)
    pattern = studies["vlut_04.dcm"]
    assert pattern["flag"] == "yes"              # still scored and flagged as the model says, with a caution
    assert "vlut_04.dcm is unlike the model's training radiographs" in pattern["appearance_caution"]
    text = pdf_text(tmp_path / "out" / pattern["report"])
    assert "Caution: image vlut_04.dcm is unlike the model" in text
    worklist = pdf_text(tmp_path / "out" / "worklist.pdf")
    assert "image vlut_04.dcm is unlike the model's training radiographs (appearance distance" in worklist
