"""Ensembles: the mean of several trained members' probabilities, saved as one Keras model.

An ensemble is built from members that were trained on the **same** patient-level
train/validation split (``fit --split-seed``), so that its validation figures
contain no image any member trained on; :func:`make_ensemble` recomputes the split
and refuses members whose split files differ from it. The threshold is then
chosen on validation exactly as for a single model, and the card says which
members it holds. The screening side needs nothing new: the ensemble is a
functional model with one input and one sigmoid output, and Grad-CAM averages
the members' heatmaps (:class:`cxrscreen.explain.GradCam`).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from cxrscreen import __version__
from cxrscreen.errors import ModelError
from cxrscreen.infer import CARD_FORMAT, load_model

from . import data as D
from .train import card_patient_pattern, device_description, finish, test_source, writable_out


def build_ensemble(members: list, name: str = "cxr_ensemble"):
    """One model averaging the members' probabilities; members are copied and renamed ``member_<i>``."""
    import keras

    inputs = keras.Input(members[0].input_shape[1:], name="unit_gray")
    outputs = []
    for index, member in enumerate(members):
        config = member.get_config()
        config["name"] = f"member_{index}"
        copy = keras.Model.from_config(config)
        copy.set_weights(member.get_weights())
        outputs.append(copy(inputs))
    output = keras.layers.Average(name="pneumonia_mean", dtype="float32")(outputs)
    return keras.Model(inputs, output, name=name)


def make_ensemble(member_paths: list[Path | str], data_dir: Path | str, out: Path | str, *,
                  test_dir: Path | str | None = None, target_sensitivity: float = 0.95, batch_size: int = 32,
                  workers: int = 2) -> dict:
    """Build, threshold on validation, and write ``out`` + card + plots + split, as ``fit`` does."""
    if len(member_paths) < 2:
        raise ModelError("an ensemble needs at least two --member models", step="ensemble")
    out = writable_out(out)
    loaded = [load_model(path) for path in member_paths]
    spec = loaded[0].card.preprocessing
    cards = [m.card.raw for m in loaded]
    for member in loaded[1:]:
        if member.card.preprocessing != spec:
            raise ModelError(f"{member.path}: preprocessing {member.card.preprocessing} differs from "
                             f"{loaded[0].path}'s {spec}", step="ensemble")
    training = cards[0].get("training") or {}
    split_seed = training.get("split_seed")
    split_seed = training.get("seed") if split_seed is None else split_seed
    val_fraction = training.get("val_fraction")
    if split_seed is None or val_fraction is None:
        raise ModelError(f"{loaded[0].path}: card has no training split seed / validation fraction",
                         step="ensemble")
    patterns = {(card.get("data") or {}).get("patient_pattern") for card in cards}
    if len(patterns) > 1:
        raise ModelError(f"the members found patients with different --patient-pattern: {sorted(map(str, patterns))}",
                         step="ensemble")
    pattern = card_patient_pattern(cards[0])
    data_dir = Path(data_dir)
    test_dir = test_source(data_dir, test_dir)      # refused now if it cannot be read, not at the end
    train_source = D.split_folder(data_dir, "train") or data_dir
    excluded: list[dict] = []
    examples = D.list_examples(train_source, excluded, workers=workers, patient_pattern=pattern)
    train, val = D.patient_split(examples, float(val_fraction), int(split_seed))
    expected = D.split_names(train=train, validation=val)
    for member, card in zip(loaded, cards):
        split_file = member.path.parent / str((card.get("data") or {}).get("split_file", ""))
        if not split_file.is_file():
            raise ModelError(f"{member.path}: split file {split_file} not found", step="ensemble")
        if D.read_split(split_file) != expected:
            raise ModelError(f"{member.path}: trained on another train/validation split than split seed "
                             f"{split_seed} of {train_source} (train members with the same --split-seed)",
                             step="ensemble")
    model = build_ensemble([m.keras_model for m in loaded])
    backbones = sorted({card["backbone"] for card in cards})
    card = {
        "format": CARD_FORMAT,
        "name": out.stem,
        "backbone": "+".join(backbones),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "device": device_description(),
        "train_seconds": round(sum(float(card.get("train_seconds") or 0) for card in cards), 1),
        "ensemble": {
            "combine": "mean of the members' probabilities; threshold chosen on validation for the mean",
            "members": [{"file": m.path.name, "sha256": m.sha256, "backbone": card["backbone"],
                         "device": card.get("device"), "train_seconds": card.get("train_seconds"),
                         "validation": (card.get("metrics") or {}).get("validation")}
                        for m, card in zip(loaded, cards)],
        },
        "training": {"split_seed": int(split_seed), "val_fraction": float(val_fraction),
                     "members": [dict(card.get("training") or {}) for card in cards]},
        # the members were trained on the same images, so they share their population when their cards say it
        "population": cards[0].get("population") if all(c.get("population") == cards[0].get("population")
                                                         for c in cards) else None,
    }
    curves = {f"member {i}": (card.get("training") or {}).get("history") or {} for i, card in enumerate(cards)}
    return finish(model, out, card, spec=spec, data_dir=data_dir, train=train, val=val,
                  test_dir=test_dir, target_sensitivity=target_sensitivity, batch_size=batch_size,
                  workers=workers, curves=curves, excluded=excluded, patient_pattern=pattern)
