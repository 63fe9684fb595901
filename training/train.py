"""Two-phase transfer learning, threshold choice on validation, and the model card.

Phase 1 trains the head on a frozen backbone; phase 2 unfreezes the top of the
backbone (BatchNorm kept frozen) with a 10x lower learning rate. Both phases
keep the weights of the epoch with the best validation ROC AUC. The threshold
is the highest one reaching the target sensitivity **on validation**; the test
split, when given, is only scored at the end, with that threshold.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxrscreen import __version__
from cxrscreen.calibrate import compile_patient_pattern, operating_point, threshold_for_sensitivity
from cxrscreen.infer import CARD_FORMAT, Population, accelerators, card_path, sha256_file
from cxrscreen.normalise import PreprocessSpec

from . import data as D
from .backbones import BACKBONES, build_classifier, set_trainable

log = logging.getLogger("training")


@dataclass
class FitConfig:
    backbone: str = "efficientnet_lite0"
    input_size: int = 224
    batch_size: int = 32
    head_epochs: int = 3
    finetune_epochs: int = 8
    head_lr: float = 1e-3
    finetune_lr: float = 1e-4
    top_fraction: float | None = None     # default: the backbone's own
    dropout: float = 0.3
    label_smoothing: float = 0.05
    augment: str = "standard"             # see training.data.AUGMENT_LEVELS
    equalize: str = "none"                # the card's preprocessing: none or clahe (cxrscreen.normalise)
    val_fraction: float = 0.15
    target_sensitivity: float = 0.95
    patience: int = 3
    seed: int = 1337
    split_seed: int | None = None         # default: seed; fix it to train ensemble members on one split
    weights: str | None = "imagenet"
    max_examples: int | None = None       # smoke runs
    patient_pattern: str | None = None    # finds the patient in a file's path (training.data.list_examples)
    workers: int = 2
    extra: dict = field(default_factory=dict)


def device_description() -> str:
    """What the card's ``device`` says: the Keras version and backend, and the GPUs or the CPU."""
    import keras

    gpus = accelerators()
    cpu = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"keras {keras.__version__} on {keras.backend.backend()}: " + (", ".join(gpus) if gpus else cpu)


def has_gpu() -> bool:
    return bool(accelerators())


def use_gpu_settings(batch_size: int) -> int:
    """With a GPU: set the global mixed_float16 policy and return a batch of at least 64; else ``batch_size``."""
    import keras

    if not has_gpu():
        return batch_size
    keras.mixed_precision.set_global_policy("mixed_float16")
    return max(batch_size, 64)


def seed_everything(seed: int) -> None:
    import keras

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def score_examples(model, examples, spec: PreprocessSpec, batch_size: int,
                   workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The model's scores for labeled examples, and their labels (1 = PNEUMONIA), in the same order."""
    seq = D.make_sequence(examples, spec, batch_size=batch_size, train=False, workers=workers)
    scores = np.asarray(model.predict(seq, verbose=0), dtype=np.float64).reshape(-1)
    return scores, np.array([e.label for e in examples])


def _compile(model, lr: float, smoothing: float):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.BinaryCrossentropy(label_smoothing=smoothing),
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")])


def fit(data_dir: Path | str, out: Path | str, config: FitConfig,
        test_dir: Path | str | None | bool = None, population: Population | None = None) -> dict:
    """Train, choose the threshold on validation, evaluate on test, write model + card + plots.
    ``population`` (whom the training images came from) goes into the card for screening to report."""
    import keras

    out = writable_out(out)
    seed_everything(config.seed)
    policy = keras.mixed_precision.global_policy()
    config.batch_size = use_gpu_settings(config.batch_size)
    try:
        return _fit(data_dir, out, config, test_dir, population)
    finally:
        keras.mixed_precision.set_global_policy(policy)   # a later model in this process is float32 again


def _fit(data_dir: Path, out: Path, config: FitConfig, test_dir, population: Population | None) -> dict:
    import keras

    spec = PreprocessSpec(input_size=(config.input_size, config.input_size), equalize=config.equalize)
    data_dir = Path(data_dir)
    test_dir = test_source(data_dir, test_dir)      # refused now if it cannot be read, not after training
    # built before the images are listed (every one decoded: minutes), so that an unknown backbone or weights
    # that cannot be had are said at once; the listing uses no Keras random state, so the model is the same
    model, backbone_layers = build_classifier(config.backbone, spec.input_size, weights=config.weights,
                                              dropout=config.dropout, seed=config.seed)
    train_source = D.split_folder(data_dir, "train") or data_dir
    excluded: list[dict] = []
    pattern = compile_patient_pattern(config.patient_pattern, step="training")
    examples = D.list_examples(train_source, excluded, workers=config.workers, patient_pattern=pattern)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    if config.max_examples:
        rng = random.Random(split_seed)
        rng.shuffle(examples)
        examples = examples[: config.max_examples]
    train, val = D.patient_split(examples, config.val_fraction, split_seed)
    if not val or not train:
        raise SystemExit("not enough patients to split train/validation")
    stem = out.with_suffix("")

    weights = D.class_weights(train)
    train_seq = D.make_sequence(train, spec, batch_size=config.batch_size, train=True, seed=config.seed,
                                workers=config.workers, augment_level=config.augment)
    val_seq = D.make_sequence(val, spec, batch_size=config.batch_size, train=False, workers=config.workers)
    history: dict[str, list[float]] = {}
    started = time.time()

    def run_phase(epochs: int, lr: float, top_fraction: float) -> None:
        if epochs <= 0:
            return
        set_trainable(model, backbone_layers, top_fraction)
        _compile(model, lr, config.label_smoothing)
        checkpoint = Path(f"{stem}.best.weights.h5")
        callbacks = [
            keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_auc", mode="max", save_best_only=True,
                                            save_weights_only=True),
            keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=config.patience,
                                          restore_best_weights=True),
        ]
        try:
            h = model.fit(train_seq, validation_data=val_seq, epochs=epochs, class_weight=weights,
                          callbacks=callbacks, verbose=2)
        except BaseException:       # Ctrl-C, SIGTERM (python -m training), an error: no stray checkpoint left
            checkpoint.unlink(missing_ok=True)
            raise
        for key, values in h.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if checkpoint.exists():
            model.load_weights(checkpoint)
            checkpoint.unlink()

    run_phase(config.head_epochs, config.head_lr, 0.0)
    top = config.top_fraction if config.top_fraction is not None else BACKBONES[config.backbone].top_fraction
    run_phase(config.finetune_epochs, config.finetune_lr, top)
    train_seconds = time.time() - started

    card = {
        "format": CARD_FORMAT,
        "name": out.stem,
        "backbone": config.backbone,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "device": device_description(),
        "train_seconds": round(train_seconds, 1),
        "training": {**asdict(config), "precision": keras.mixed_precision.global_policy().name,
                     "class_weights": weights, "history": history},
        "population": population.to_json() if population else None,
    }
    return finish(model, out, card, spec=spec, data_dir=data_dir, train=train, val=val,
                  test_dir=test_dir, target_sensitivity=config.target_sensitivity, batch_size=config.batch_size,
                  workers=config.workers, curves={"": history}, excluded=excluded, patient_pattern=pattern)


def writable_out(out: Path | str) -> Path:
    """``out`` as a Path, its folder made; refused (SystemExit) when that folder cannot be written: known
    before training, not when the first checkpoint or the model is saved."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise SystemExit(f"cannot write in {out.parent}: permission denied")
    return out


def test_source(data_dir: Path, test_dir: Path | str | None | bool) -> Path | bool:
    """The labeled test split: ``test_dir``, or ``data_dir``'s ``test`` folder when None and it has one; False
    for none. One that :func:`training.data.list_examples` could not read is refused here
    (:func:`training.data.check_labeled`): fit and ensemble ask before training, as it is scored after."""
    if test_dir is None:
        test_dir = D.split_folder(data_dir, "test")
    if not test_dir:
        return False
    D.check_labeled(test_dir)
    return Path(test_dir)


def finish(model, out: Path, card: dict, *, spec: PreprocessSpec, data_dir: Path, train, val,
           test_dir: Path | bool, target_sensitivity: float, batch_size: int, workers: int,
           curves: dict[str, dict], excluded: list[dict] = (), patient_pattern=None) -> dict:
    """Threshold on validation, score test (if any), save the model and write card and plots.

    Shared by a single fit and an ensemble; ``card`` holds what only the caller knows. ``test_dir``: the
    test split as :func:`test_source` gave it before training (checked then), or False for none. ``excluded``: the
    training folder's files that :func:`training.data.list_examples` left out; the card lists them
    with the test folder's. ``patient_pattern`` (compiled) finds the test images' patients as it found the
    training images' (``--patient-pattern``). The model's files (:func:`_companions`) are written whole or not
    at all.
    """
    # Everything is written into a folder of its own beside ``out`` and moved into place once the card is
    # written: a run stopped while it scores (minutes on a CPU) or failing leaves a previous model of this name,
    # its card, split file, plots and appearance reference as they were (:func:`_move_into_place`).
    for left in out.parent.glob(f".{out.stem}.*.partial"):      # by a run killed outright (kill -9, power cut)
        if not _running(left.suffixes[-2].lstrip(".")):
            shutil.rmtree(left, ignore_errors=True)
    stage = out.parent / f".{out.stem}.{os.getpid()}.partial"
    shutil.rmtree(stage, ignore_errors=True)        # left by an earlier process of this id
    stage.mkdir()
    try:
        card = _finish(model, stage / out.name, card, spec=spec, data_dir=data_dir, train=train, val=val,
                       test_dir=test_dir, target_sensitivity=target_sensitivity, batch_size=batch_size,
                       workers=workers, curves=curves, excluded=excluded, patient_pattern=patient_pattern)
        _move_into_place(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return card


def _move_into_place(stage: Path, out: Path) -> None:
    """Move a finished model's files from ``stage`` to ``out``'s folder, the card last; a previous model's files
    of the same name that this one has not (an appearance reference) are removed. The previous card goes first:
    a stop in these few renames leaves a model without a card, which screening refuses, never a card beside
    another model's files (load_model() also refuses a card whose model_sha256 is not its file's)."""
    card = card_path(out)
    card.unlink(missing_ok=True)
    for name in _companions(out):
        if (stage / name).exists():
            os.replace(stage / name, out.parent / name)
        else:
            (out.parent / name).unlink(missing_ok=True)
    os.replace(stage / card.name, card)


def _running(pid: str) -> bool:
    """Whether the process of this id (text) is running (on this machine); True when that cannot be told."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    return True


def _companions(out: Path) -> list[str]:
    """The names of the files :func:`finish` writes beside its card for ``out`` (the model first)."""
    from cxrscreen.appearance import reference_path

    return [out.name, f"{out.stem}.split.csv", f"{out.stem}.roc.png", f"{out.stem}.training_curves.png",
            reference_path(out).name]


def _finish(model, out: Path, card: dict, *, spec: PreprocessSpec, data_dir: Path, train, val,
            test_dir: Path | bool, target_sensitivity: float, batch_size: int, workers: int,
            curves: dict[str, dict], excluded: list[dict], patient_pattern) -> dict:
    """:func:`finish` in its staging folder (``out`` is there)."""
    split_file = out.parent / _companions(out)[1]
    excluded = [{"split": "train", **item} for item in excluded]
    D.write_split(split_file, train=train, validation=val)
    save_for_inference(model, out)
    # Threshold and metrics come from the saved float32 model as screening loads and runs it: the model in
    # memory computes in float16 after a mixed-precision (GPU) fit, and its scores are not the ones screened.
    saved = load_for_scoring(out)
    log.info("scoring the %d validation images with the saved model, for the threshold", len(val))
    val_scores, val_labels = score_examples(saved, val, spec, batch_size, workers)
    threshold = threshold_for_sensitivity(val_scores, val_labels, target_sensitivity)
    val_point = operating_point(val_scores, val_labels, threshold)
    test_point, test_counts, test_scores, test_labels = None, None, None, None
    if test_dir:
        left_out: list[dict] = []
        test = D.list_examples(test_dir, left_out, workers=workers, patient_pattern=patient_pattern,
                               refuse_unmatched=False)     # the model is trained: its test patients are counted
        excluded += [{"split": "test", **item} for item in left_out]
        log.info("scoring the %d test images, once", len(test))
        test_scores, test_labels = score_examples(saved, test, spec, batch_size, workers)
        test_point = operating_point(test_scores, test_labels, threshold)
        test_counts = {**_counts(test), **_identical_to_training(test, [*train, *val])}
    _plot_roc(out.parent / f"{out.stem}.roc.png", val_scores, val_labels, test_scores, test_labels, threshold)
    _plot_curves(out.parent / f"{out.stem}.training_curves.png", curves)

    card = {
        **card,
        "model_sha256": sha256_file(out),
        "preprocessing": spec.to_json(),
        "output": {"activation": "sigmoid", "positive_class": "PNEUMONIA"},
        "gradcam_layer": _last_conv_layer(model),
        "threshold": {"value": threshold, "target_sensitivity": target_sensitivity,
                      "chosen_on": "validation", "validation": val_point.to_json()},
        "data": {"source": str(data_dir), "split": "patient-level, seeded, stratified by class; test split "
                 "never used for training, selection or threshold", "split_file": split_file.name,
                 "patient_pattern": patient_pattern.pattern if patient_pattern else None,
                 "train": _counts(train), "validation": _counts(val), "test": test_counts,
                 # files of the folders that are not images or could not be decoded: not in any count
                 "excluded": excluded, "horizontal_flips": False},
        "metrics": {"validation": val_point.to_json(), "test": test_point.to_json() if test_point else None},
    }
    from cxrscreen.appearance import COMPONENTS

    if len(train) >= 4 * COMPONENTS:     # a smaller training set cannot say what its images look like
        log.info("fitting the appearance reference on the %d training and %d validation images", len(train),
                 len(val))
        card["appearance"] = write_appearance(out, card, train, val, batch_size=batch_size, workers=workers)
    write_card(out, card)
    return card


def write_card(model_path: Path | str, card: dict) -> None:
    """Write ``card`` as the card of ``model_path``, whole or not at all: a rewrite (``evaluate --record``,
    ``rethreshold``, ``appearance``) stopped or failing half-way (Ctrl-C, a full disk) keeps the card it had."""
    from cxrscreen.report import atomic_write

    with atomic_write(card_path(model_path), "w") as handle:
        handle.write(json.dumps(card, indent=2, default=str))


def pooled_features(model, examples, spec: PreprocessSpec, batch_size: int = 32, workers: int = 2,
                    layer: str | None = None) -> np.ndarray:
    """(N, channels): the global average of the Grad-CAM layer's feature map for each example, from the
    same forward pass screening uses (what :mod:`cxrscreen.appearance` measures)."""
    from cxrscreen.explain import GradCam

    cam = GradCam(model, layer)
    if cam.method != "forward":
        raise ValueError("the appearance reference needs a model whose head is global pooling and one Dense unit")
    seq = D.make_sequence(examples, spec, batch_size=batch_size, train=False, workers=workers)
    return np.concatenate([cam.run(seq[i][0])[2] for i in range(len(seq))])


def write_appearance(model_path: Path | str, card: dict, train, val, *, batch_size: int = 32, workers: int = 2,
                     components: int | None = None) -> dict:
    """Fit the appearance reference of a saved model whose card is ``card`` (mean and principal axes of
    the training images' pooled features, limit = the largest distance of a validation image), write
    ``NAME.appearance.npz`` beside it and return the card section that names it. The saved float32
    model is measured, as screening will use it."""
    import hashlib

    from cxrscreen.appearance import COMPONENTS, AppearanceReference, reference_path
    from cxrscreen.report import atomic_write

    model_path = Path(model_path)
    spec, layer = PreprocessSpec.from_json(card["preprocessing"]), card["gradcam_layer"]
    model = load_for_scoring(model_path, layer)
    components = components or COMPONENTS
    reference = AppearanceReference.fit(pooled_features(model, train, spec, batch_size, workers, layer),
                                        pooled_features(model, val, spec, batch_size, workers, layer), components)
    data = reference.to_bytes()
    path = reference_path(model_path)
    with atomic_write(path) as handle:
        handle.write(data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "layer": layer,
            "components": components, "limit": reference.limit,
            "fitted_on": f"pooled {layer} features of the {len(train)} training images",
            "limit_rule": f"the largest appearance distance of the {len(val)} validation images",
            "method": "norm of the centred pooled features outside their top principal axes (cxrscreen.appearance)"}


def record_appearance(model_path: Path | str, batch_size: int = 32, workers: int = 2,
                      components: int | None = None) -> dict:
    """Add (or refit) the appearance reference of a trained model from the split file its card names, and
    write it into the card. Run from the folder training ran in (the split file's paths are relative)."""
    model_path = Path(model_path)
    card = read_card(model_path)
    train, val = _split_here(model_path.parent / card["data"]["split_file"], "train", "validation")
    card["appearance"] = write_appearance(model_path, card, train, val, batch_size=batch_size, workers=workers,
                                          components=components)
    write_card(model_path, card)
    return card


def save_for_inference(model, out: Path) -> None:
    """Save the model without optimizer state (a third of the size; screening never trains), in float32.

    A model trained under mixed precision (GPU) would otherwise keep ``mixed_float16`` layer
    policies and compute in float16 on the CPU servers that screen; its variables are float32
    anyway, so the weights carry over unchanged.
    """
    import keras

    # Keras >= 3.1x clone_model also clones the compile state (optimizer included); from_config does not.
    fresh = keras.Model.from_config(float32_config(model.get_config()))
    fresh.set_weights(model.get_weights())
    fresh.save(out)


def load_for_scoring(path: Path | str, gradcam_layer: str = ""):
    """A saved model as screening runs it: float32 layers, full float32 precision on a GPU
    (:func:`cxrscreen.infer.full_precision`; TF32 moves scores by up to a few thousandths), and its batch
    normalisations folded into its convolutions (:func:`cxrscreen.infer.for_screening`, ``gradcam_layer`` kept:
    scores a few millionths from the model's as saved, enough to move a threshold that is one image's score)."""
    import keras

    from cxrscreen.infer import for_screening, full_precision

    full_precision()
    return for_screening(keras.saving.load_model(path, compile=False), gradcam_layer)


def float32_config(config):
    """A copy of a Keras config with every mixed-precision dtype policy replaced by float32."""
    if isinstance(config, list):
        return [float32_config(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {k: float32_config(v) for k, v in config.items()}
    name = out.get("config", {}).get("name") if isinstance(out.get("config"), dict) else None
    if out.get("class_name") == "DTypePolicy" and isinstance(name, str) and name.startswith("mixed_"):
        out["config"] = {**out["config"], "name": "float32"}
    return out


def _counts(examples) -> dict:
    """Images of each class and patients; for examples just listed, where their patients came from."""
    labels = [e.label for e in examples]
    counts = {"NORMAL": labels.count(0), "PNEUMONIA": labels.count(1), "patients": len({e.patient for e in examples})}
    found = D.patients_from(examples)
    return {**counts, "patients_from": found} if found else counts


def _identical_to_training(test, seen) -> dict:
    """``{"identical_to_training": n}``: test images whose decoded picture is a training or validation image's
    (the test figures count them, as if unseen), warned of; {} when the training images carry no digest."""
    trained = {e.pixels for e in seen if e.pixels}
    if not trained:
        return {}
    shared = [e for e in test if e.pixels in trained]
    if shared:
        log.warning("%d test images are identical to training or validation images (e.g. %s): the test figures "
                    "count them as unseen", len(shared), shared[0].path)
    return {"identical_to_training": len(shared)}


def _last_conv_layer(model) -> str:
    from cxrscreen.explain import find_gradcam_layer

    return find_gradcam_layer(model)


def _plot_curves(path: Path, curves: dict[str, dict]) -> None:
    """Loss and AUC per epoch; ``curves`` maps a run label ("" for a single model) to its Keras history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", axes[0]), ("auc", axes[1])):
        for run, history in curves.items():
            for prefix, style in (("", "-"), ("val_", "--")):
                if prefix + key in history:
                    ax.plot(range(1, len(history[prefix + key]) + 1), history[prefix + key], style,
                            label=f"{run} " * bool(run) + ("validation " if prefix else "train ") + key)
        ax.set_xlabel("epoch (head phase, then fine-tuning)")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_roc(path: Path, val_scores, val_labels, test_scores, test_labels, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, scores, labels in (("validation", val_scores, val_labels), ("test", test_scores, test_labels)):
        if scores is None:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f})")
        point = operating_point(scores, labels, threshold)
        ax.plot(1 - point.specificity, point.sensitivity, "o")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC; dots: threshold {threshold:.3f} (chosen on validation)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def card_patient_pattern(card: dict):
    """The ``--patient-pattern`` a card's model was trained with, compiled; None for none."""
    return compile_patient_pattern((card.get("data") or {}).get("patient_pattern"), step="training")


def read_card(model_path: Path) -> dict:
    """The card of a saved model, for the commands that rewrite it (``appearance``, ``evaluate --record``,
    ``rethreshold``); refused when the model file is not the one the card was written for."""
    from cxrscreen.errors import ModelError
    from cxrscreen.infer import check_card_is_for

    card = json.loads(card_path(model_path).read_text())
    try:
        check_card_is_for(card, model_path)
    except ModelError as exc:
        raise SystemExit(exc.cause) from None
    return card


def _split_here(split_file: Path, *sides: str) -> list[list]:
    """The examples of each side of a split file, refusing (naming one) when any image is not found here:
    the file's paths are relative to the folder training ran in."""
    examples = [D.split_examples(split_file, side) for side in sides]
    missing = [str(e.path) for group in examples for e in group if not e.path.is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} {' and '.join(sides)} images of {split_file.name} not found "
                         f"(e.g. {missing[0]}); run from the folder training ran in")
    return examples


def record_test(model_path: Path | str, test_dir: Path | str, batch_size: int = 32, workers: int = 2) -> dict:
    """Score the test split once for a model trained with ``--no-test`` and write it into its card.

    For decide-on-validation-first: train (or ensemble) with ``--no-test``, decide, then record.
    Refuses a card that already has test metrics (the test split is scored once). The validation
    images are re-scored from the split file to check that model, card and data still belong
    together, and ``NAME.roc.png`` is redrawn with both curves.
    """
    from cxrscreen.infer import load_model

    model_path = Path(model_path)
    card = read_card(model_path)
    if (card.get("metrics") or {}).get("test"):
        raise SystemExit(f"{card_path(model_path)} already has test metrics: the test split is scored once")
    loaded = load_model(model_path)
    spec, threshold = loaded.card.preprocessing, loaded.card.threshold
    val_scores, val_labels = _validation_scores(loaded.screening_model, model_path, card, spec, batch_size, workers)
    left_out: list[dict] = []
    test = D.list_examples(test_dir, left_out, workers=workers, patient_pattern=card_patient_pattern(card),
                           refuse_unmatched=False)
    test_scores, test_labels = score_examples(loaded.screening_model, test, spec, batch_size, workers)
    point = operating_point(test_scores, test_labels, threshold)
    card["metrics"]["test"] = point.to_json()
    card["data"]["excluded"] = [*(item for item in card["data"].get("excluded") or [] if item["split"] != "test"),
                                *({"split": "test", **item} for item in left_out)]
    card["data"]["test"] = {**_counts(test), "source": str(test_dir),
                            "scored": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _plot_roc(model_path.parent / f"{model_path.stem}.roc.png", val_scores, val_labels, test_scores, test_labels,
              threshold)
    write_card(model_path, card)
    return card


def _validation_scores(model, model_path: Path, card: dict, spec: PreprocessSpec, batch_size: int, workers: int,
                       tolerance: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s scores and the labels of the validation images of the card's split file; refuses when
    their AUC is not the card's within ``tolerance`` (other data, or a changed model)."""
    (val,) = _split_here(model_path.parent / card["data"]["split_file"], "validation")
    scores, labels = score_examples(model, val, spec, batch_size, workers)
    auc = operating_point(scores, labels, card["threshold"]["value"]).auc
    if abs(auc - card["metrics"]["validation"]["auc"]) > tolerance:
        raise SystemExit(f"validation AUC {auc:.5f} does not reproduce the card's "
                         f"{card['metrics']['validation']['auc']:.5f}: model, card or data changed")
    return scores, labels


def rethreshold(model_path: Path | str, test_dir: Path | str | None = None, batch_size: int = 32,
                workers: int = 2) -> dict:
    """Choose a card's threshold again from the saved model's own validation scores, and write it.

    For cards written before the fix of 12338ea: a mixed-precision (GPU) fit took the threshold from
    the float16 scores of the model in memory, while screening runs the saved float32 model, whose
    validation sensitivity at that threshold can miss the card's target. The validation images are
    re-scored from the split file as screening runs the model (:func:`load_for_scoring`) and the
    threshold chosen by the card's rule (its target sensitivity). A card with test metrics measured them
    at the old threshold: they are measured again at the new one (``test_dir`` is required then; nothing
    is chosen on it), and the old threshold and figures are kept under ``threshold.corrected``. A card
    whose threshold is already right is left as it is. Returns the card.
    """
    model_path = Path(model_path)
    card = read_card(model_path)
    old = card["threshold"]
    if (card.get("metrics") or {}).get("test") and test_dir is None:
        raise SystemExit(f"{card_path(model_path)} has test metrics measured at the old threshold: give the test "
                         "folder (--test) to measure them again at the new one")
    model = load_for_scoring(model_path, card.get("gradcam_layer", ""))
    spec = PreprocessSpec.from_json(card["preprocessing"])
    # looser than record_test's check: the old card's figures may come from float16 scores
    val_scores, val_labels = _validation_scores(model, model_path, card, spec, batch_size, workers, tolerance=1e-3)
    threshold = threshold_for_sensitivity(val_scores, val_labels, old["target_sensitivity"])
    if threshold == old["value"]:
        return card
    val_point = operating_point(val_scores, val_labels, threshold)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    corrected = {"previous": old["value"], "date": now,
                 "reason": "the previous threshold came from the float16 scores of a mixed-precision fit's model "
                           "in memory; chosen again on the saved float32 model's validation scores",
                 "previous_on_saved_model": operating_point(val_scores, val_labels, old["value"]).to_json()}
    test_scores = test_labels = None
    if card["metrics"].get("test"):         # measured again at the new threshold (test_dir checked above)
        test = D.list_examples(test_dir, [], workers=workers, patient_pattern=card_patient_pattern(card),
                               refuse_unmatched=False)
        test_scores, test_labels = score_examples(model, test, spec, batch_size, workers)
        corrected["previous_test"] = card["metrics"]["test"]
        card["data"]["test"] = {**(card["data"].get("test") or {}), **_counts(test), "source": str(test_dir),
                                "rescored": f"{now}: at the corrected threshold (nothing chosen on it)"}
        card["metrics"]["test"] = operating_point(test_scores, test_labels, threshold).to_json()
    card["threshold"] = {**old, "value": threshold, "validation": val_point.to_json(), "corrected": corrected}
    card["metrics"]["validation"] = val_point.to_json()
    _plot_roc(model_path.parent / f"{model_path.stem}.roc.png", val_scores, val_labels, test_scores, test_labels,
              threshold)
    write_card(model_path, card)
    return card


def evaluate(model_path: Path | str, data_dir: Path | str, batch_size: int = 32,
             patient_pattern: str | None = None) -> dict:
    """Score a labeled folder with a saved model at its card's threshold; ``patients`` (for a bootstrap)
    as :func:`training.data.list_examples` finds them, with ``patient_pattern`` (``--patient-pattern``), those
    that share an identical image joined (as the validation split and ``cxrscreen calibrate`` join them)."""
    from cxrscreen.infer import load_model

    loaded = load_model(model_path)
    excluded: list[dict] = []
    pattern = compile_patient_pattern(patient_pattern, step="evaluate")
    examples = D.list_examples(data_dir, excluded, patient_pattern=pattern)
    scores, labels = score_examples(loaded.screening_model, examples, loaded.card.preprocessing, batch_size)
    point = operating_point(scores, labels, loaded.card.threshold)
    return {"model": str(model_path), "data": str(data_dir), **point.to_json(), "excluded": excluded,
            "patients_from": D.patients_from(examples), "scores": scores.tolist(), "labels": labels.tolist(),
            "patients": D.joined_patients(examples)}
