"""The model and its card; batched prediction.

A model is a ``NAME.keras`` file with its card ``NAME.json`` beside it. The
card says what the screening side must do and never guesses: the input size
and preprocessing (:class:`cxrscreen.normalise.PreprocessSpec`), the default
threshold and the operating point it was chosen for, the Grad-CAM layer, and
the population the training images came from (:class:`Population`), and the
appearance reference that tells whether an image looks like the training images
(:mod:`cxrscreen.appearance`; optional).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .appearance import AppearanceReference
from .errors import ModelError
from .normalise import PreprocessSpec

CARD_FORMAT = "cxrscreen-model-card/1"
DEFAULT_NAME = "cxr-default.keras"


def default_model_path() -> Path:
    """The bundled default model: ``$CXRSCREEN_MODEL``, else ``models/`` of the source checkout this
    package runs from (``pip install -e .``), else the copy a plain ``pip install .`` puts in
    ``<prefix>/share/cxrscreen/models`` (setup.cfg ``data_files``)."""
    env = os.environ.get("CXRSCREEN_MODEL")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[1] / "models" / DEFAULT_NAME
    installed = Path(sys.prefix) / "share" / "cxrscreen" / "models" / DEFAULT_NAME
    return checkout if checkout.is_file() or not installed.is_file() else installed


def card_path(model_path: Path | str) -> Path:
    return Path(model_path).with_suffix(".json")


def model_files(model_path: Path | str) -> list[Path]:
    """The files a model is made of, to copy or ship together: ``NAME.keras``, its card ``NAME.json``
    and the appearance reference the card names (when it names one)."""
    model_path = Path(model_path)
    files = [model_path, card_path(model_path)]
    try:
        named = (json.loads(files[1].read_text()).get("appearance") or {}).get("file")
    except (OSError, ValueError):
        named = None
    return files + ([model_path.parent / named] if named else [])


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_card_is_for(card: dict, model_path: Path | str, sha256: str | None = None) -> None:
    """Refuse a model file that is not the one its card was written for.

    A card gives the SHA-256 of its model file (``model_sha256``; training writes it). Its threshold,
    operating point and appearance limit were measured on that file, and on no other: a ``fit`` stopped
    between saving a new model and writing its card (the validation and test scoring, minutes on a CPU)
    left the new weights beside the previous model's card, and a model file copied or replaced without
    its card does the same; either screened every study at another model's threshold, silently. Cards
    without the field (written by hand) are taken as they are."""
    expected = str(card.get("model_sha256") or "").lower()
    if not expected:
        return
    sha256 = sha256 or sha256_file(model_path)
    if sha256 != expected:
        raise ModelError(f"{model_path} is not the model file its card {card_path(model_path).name} was written for "
                         f"(the card names sha256 {expected[:16]}..., this file is {sha256[:16]}...): its threshold "
                         "and figures belong to another model. A training run stopped before it wrote the card, or "
                         "the file was replaced without its card: train it again, or put the matching pair back",
                         step="load-model")


@dataclass(frozen=True)
class Population:
    """Whom the model's training images came from (card field ``population``): what a report says of
    every score, and the ages outside of which a score carries a caution."""

    description: str
    age_years: tuple[int, int] | None = None    # completed years, both ends included

    def __post_init__(self) -> None:
        if self.age_years is not None and not 0 <= self.age_years[0] <= self.age_years[1]:
            raise ValueError(f"population age_years {list(self.age_years)} is not a range [min, max]")

    def to_json(self) -> dict:
        return {"description": self.description,
                "age_years": list(self.age_years) if self.age_years is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> "Population":
        ages = data.get("age_years")
        return cls(description=str(data["description"]),
                   age_years=(int(ages[0]), int(ages[1])) if ages is not None else None)

    def age_warning(self, age: float | None) -> str:
        """Why a score may not hold for a patient of ``age`` years; '' inside the range or when the
        age (or the range) is unknown. (A site's own ``calibrate`` run sets the threshold on its
        patients, but the model still learned from this population only.)"""
        if age is None or self.age_years is None:
            return ""
        low, high = self.age_years
        if low <= int(age) <= high:
            return ""
        said = f"{int(age * 12)} months" if age < 2 else f"{int(age)} years"
        return (f"patient aged {said}, outside the model's training population ({low}-{high} years): "
                f"its performance was not measured on such patients; read the score with caution")


def _measured_at(threshold: float, metrics) -> dict:
    """A card's test metrics when they were measured at ``threshold`` and hold the figures a report quotes,
    else {} (a card fitted with --no-test, or metrics of an earlier threshold)."""
    try:
        usable = abs(float(metrics["threshold"]) - threshold) < 1e-9 and all(
            isinstance(metrics[k], (int, float)) for k in ("sensitivity", "specificity", "n_positive", "n_negative"))
    except (KeyError, TypeError, ValueError):
        return {}
    return dict(metrics) if usable else {}


@dataclass(frozen=True)
class ModelCard:
    """What the screening side reads from a model's JSON card."""

    name: str
    backbone: str
    preprocessing: PreprocessSpec
    threshold: float
    operating_point: dict = field(default_factory=dict)   # sensitivity/specificity where the threshold was set
    target_sensitivity: float | None = None               # what the threshold was chosen for, where the card says
    test_point: dict = field(default_factory=dict)        # the held-out test split's figures at this threshold, or {}
    gradcam_layer: str = ""
    population: Population | None = None
    appearance: dict = field(default_factory=dict)   # the card's appearance section: file, sha256, layer, limit
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def trained_on(self) -> str:
        """The card's population in words, for reports; '' when the card does not say."""
        return self.population.description if self.population else ""

    @classmethod
    def from_json(cls, data: dict, source: Path | str = "") -> "ModelCard":
        if data.get("format") != CARD_FORMAT:
            raise ModelError(f"{source}: not a cxrscreen model card (format {data.get('format')!r}, "
                             f"expected {CARD_FORMAT!r})", step="load-model")
        try:
            threshold = data["threshold"]
            value = float(threshold["value"])
            target = threshold.get("target_sensitivity")
            return cls(name=str(data["name"]), backbone=str(data["backbone"]),
                       preprocessing=PreprocessSpec.from_json(data["preprocessing"]),
                       threshold=value, operating_point=dict(threshold.get("validation", {})),
                       target_sensitivity=float(target) if isinstance(target, (int, float)) else None,
                       test_point=_measured_at(value, (data.get("metrics") or {}).get("test")),
                       gradcam_layer=str(data.get("gradcam_layer", "")),
                       population=Population.from_json(data["population"]) if data.get("population") else None,
                       appearance=dict(data.get("appearance") or {}), raw=data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: model card is missing or has a bad field: {exc}", step="load-model") from None

    @classmethod
    def load(cls, path: Path | str) -> "ModelCard":
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model card {path} not found: a model is never used without its card",
                             step="load-model")
        try:
            return cls.from_json(json.loads(path.read_text()), path)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: model card is not valid JSON: {exc}", step="load-model") from None


@dataclass
class LoadedModel:
    path: Path
    card: ModelCard
    sha256: str
    keras_model: object = None  # None until :meth:`load_keras` (``load_model(..., keras=False)``)
    compute: str = ""          # the Keras backend and its device, see compute_device()
    appearance: AppearanceReference | None = None    # when the card names one
    # what screening runs: keras_model with its batch normalisations folded (fold_batch_norm), else keras_model
    screening_model: object = None

    def load_keras(self) -> LoadedModel:
        """The Keras model loaded (its backend started: 4-5 s on a CPU server, most of a run that finds
        every study reported already) and checked against the card, once; returns ``self``."""
        if self.keras_model is not None:
            return self
        self.compute = start_backend()
        import keras

        try:
            model = keras.saving.load_model(self.path, compile=False)
        except Exception as exc:
            raise ModelError(f"{self.path}: cannot load the Keras model: {exc}", step="load-model") from None
        shape = tuple(model.input_shape[1:])
        expected = (*self.card.preprocessing.input_size, 1)
        if shape != expected:
            raise ModelError(f"{self.path}: model input {shape} does not match its card {expected}",
                             step="load-model")
        self.keras_model = model
        self.screening_model = for_screening(model, self.card.gradcam_layer)
        return self

    @property
    def input_size(self) -> tuple[int, int]:
        return self.card.preprocessing.input_size

    def predict(self, batch: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """P(pneumonia) for a batch of model inputs (N, H, W, 1), through Keras' compiled predict step
        (an eager call runs layer by layer in Python and is several times slower). The batch is padded
        to :func:`bucket_size` (``batch_size``: the run's full batch)."""
        batch = np.asarray(batch, dtype=np.float32)
        out = self.screening_model.predict_on_batch(pad_batch(batch, batch_size))
        return np.asarray(out, dtype=np.float64).reshape(-1)[: len(batch)]


def for_screening(model, gradcam_layer: str = ""):
    """The Keras model as cxrscreen screens it: :func:`fold_batch_norm`, the Grad-CAM layer kept (the card's,
    else :func:`cxrscreen.explain.find_gradcam_layer`'s). Training chooses a threshold, and measures a model,
    on the scores of this model, the one screened."""
    from .explain import find_gradcam_layer

    if not gradcam_layer:
        try:
            gradcam_layer = find_gradcam_layer(model)
        except ValueError:
            pass
    return fold_batch_norm(model, keep={gradcam_layer} - {""})


# A folded model's scores differ from the model's as saved by rounding (float32: at most 4.8e-6 over the default
# model's 624 test images; its Grad-CAM features, 0-6, by 3e-5 on the probe); a larger difference, relative to
# 1 + the largest value, means the fold is wrong, and the model is screened as saved.
FOLD_TOLERANCE = 1e-4


def fold_batch_norm(model, keep: set[str] = frozenset()):
    """``model`` for inference with every batch normalisation that follows a convolution folded into it.

    At inference a BatchNormalization after a Conv2D or DepthwiseConv2D is an affine map per channel, which the
    convolution's kernel and bias can apply themselves: y = (k * x + b - mean) * gamma / sqrt(var + eps) + beta.
    Folded, the backend also fuses each convolution with its bias and activation; the default model (49 such
    pairs) screens 1.2x faster on a CPU (``benchmarks/folded_model.py``). A convolution is folded only where its
    output goes to the normalisation alone, it has no activation of its own and is not in ``keep`` (the Grad-CAM
    layer, whose output is read). Models nested in ``model`` (an ensemble's members) are folded alike.

    Returns a new model (``model`` is untouched: training saves and ensembles the model as it was saved), or
    ``model`` itself where nothing can be folded, the model cannot be cloned (a subclassed model), or the folded
    model's scores or kept layers' outputs on a probe batch differ from the model's by more than FOLD_TOLERANCE."""
    import keras
    from keras import layers

    def all_layers(m):
        for layer in m.layers:
            yield layer
            if isinstance(layer, keras.Model):
                yield from all_layers(layer)

    try:
        pairs = {}      # id(conv) -> its batch normalisation
        for bn in all_layers(model):
            if type(bn) is not layers.BatchNormalization or len(bn._inbound_nodes) != 1 or bn.axis not in (-1, 3):
                continue
            conv = bn._inbound_nodes[0].input_tensors[0]._keras_history.operation
            if (type(conv) in (layers.Conv2D, layers.DepthwiseConv2D) and conv.data_format == "channels_last"
                    and conv.get_config().get("activation") == "linear" and conv.name not in keep
                    and len(conv._inbound_nodes) == 1 and len(conv._outbound_nodes) == 1
                    and conv.dtype_policy.compute_dtype == bn.dtype_policy.compute_dtype == "float32"):
                pairs[id(conv)] = bn
        if not pairs:
            return model
        folded_bns = {id(bn) for bn in pairs.values()}
        made = []       # (new layer, original layer)

        def clone(layer):
            config = layer.get_config()
            if id(layer) in folded_bns:       # its dtype: the process's policy may be mixed (training, on a GPU)
                return _unchanged_layer()(name=layer.name, dtype=layer.dtype_policy)
            if id(layer) in pairs:
                config["use_bias"] = True
            made.append((layer.__class__.from_config(config), layer))
            return made[-1][0]

        folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
        for new, old in made:
            weights = old.get_weights()
            if id(old) in pairs:
                weights = _folded_weights(old, pairs[id(old)])
            if weights:
                new.set_weights(weights)
        # the probe: the outputs and the kept layers' (the Grad-CAM features: a sigmoid near 1 hides much)
        probe = np.random.default_rng(0).random((2, *model.input_shape[1:])).astype(np.float32)
        taps = sorted(keep & {layer.name for layer in model.layers})

        def outputs(m):
            tap = keras.Model(m.input, [*(m.get_layer(name).output for name in taps), *m.outputs])
            return [np.asarray(t, dtype=np.float64) for t in tap(probe, training=False)]

        difference = max(float(np.max(np.abs(a - b)) / (1 + np.max(np.abs(a))))
                         for a, b in zip(outputs(model), outputs(folded)))
    except Exception as exc:     # a model of layers this does not know how to clone: screened as saved
        logging.getLogger("cxrscreen").debug("batch normalisation not folded (%s: %s)", type(exc).__name__, exc)
        return model
    if not difference <= FOLD_TOLERANCE:
        logging.getLogger("cxrscreen").warning(
            "batch normalisation folded into the convolutions changed the model's scores or Grad-CAM features by "
            "%.2g (of their range): screened as saved", difference)
        return model
    return folded


def _folded_weights(conv, bn) -> list[np.ndarray]:
    """The kernel and bias of ``conv`` followed by the batch normalisation ``bn`` at inference."""
    from keras import layers

    weights = {w.path.split("/")[-1]: np.asarray(w, dtype=np.float64) for w in bn.weights}
    var, mean = weights["moving_variance"], weights["moving_mean"]
    scale = weights.get("gamma", 1.0) / np.sqrt(var + bn.epsilon)
    shift = weights.get("beta", 0.0) - mean * scale
    kernel = np.asarray(conv.kernel, dtype=np.float64)
    bias = np.asarray(conv.bias, dtype=np.float64) if conv.use_bias else np.zeros_like(mean)
    if isinstance(conv, layers.DepthwiseConv2D):                           # (h, w, channels in, multiplier)
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:                                                                  # (h, w, channels in, channels out)
        kernel = kernel * scale
    return [kernel.astype(np.float32), (bias * scale + shift).astype(np.float32)]


@functools.cache
def _unchanged_layer():
    """A layer that returns its input: a folded batch normalisation's place in the model (keeping its name)."""
    import keras

    class Unchanged(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True

        def call(self, inputs, mask=None, training=None):
            return inputs

        def compute_output_shape(self, input_shape):
            return input_shape

    return Unchanged


def bucket_size(n: int, batch_size: int | None = None) -> int:
    """The size a batch of ``n`` images is padded to: the next power of two, but at most the run's
    ``batch_size`` when ``n`` fits in it.

    A compiled backend compiles once per batch shape: XLA under JAX (on a GPU with autotuning, seconds
    each), TensorFlow's traces too. Unpadded, every run's last batch and every watch round of another
    size was a new shape; padded, a run sees at most log2(batch size) + 1 shapes, for at most twice
    the work on a batch that is not full."""
    size = 1 << max(0, n - 1).bit_length()
    return min(size, batch_size) if batch_size and n <= batch_size else size


def pad_batch(batch: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """``batch`` followed by blank images up to :func:`bucket_size` (each image is scored on its own:
    the padding changes no other image's result; callers keep the first ``len(batch)`` outputs)."""
    size = bucket_size(len(batch), batch_size)
    if size == len(batch):
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


def load_model(path: Path | str | None = None, *, keras: bool = True) -> LoadedModel:
    """Load a ``.keras`` model and its card, checking that they fit together (the file's SHA-256 against the
    card's). ``keras=False``: the card, the file's digest and the appearance reference only, the Keras model
    left to :meth:`LoadedModel.load_keras` (a batch that finds nothing to score never starts the backend)."""
    path = Path(path) if path else default_model_path()
    if not path.is_file():
        raise ModelError(f"model {path} not found (train one with `python -m training fit`, or pass --model)",
                         step="load-model")
    card = ModelCard.load(card_path(path))
    sha256 = sha256_file(path)
    check_card_is_for(card.raw, path, sha256)
    appearance = None
    if card.appearance:
        section = card.appearance
        if section.get("layer") != card.gradcam_layer or not section.get("file"):
            raise ModelError(f"{card_path(path)}: the appearance section must name its file and the Grad-CAM "
                             f"layer {card.gradcam_layer!r} its features come from", step="load-model")
        appearance = AppearanceReference.load(path.parent / section["file"], section.get("sha256", ""))
    loaded = LoadedModel(path=path, card=card, sha256=sha256, appearance=appearance)
    return loaded.load_keras() if keras else loaded


def start_backend() -> str:
    """Import Keras, set it to compute in full precision (:func:`full_precision`) and find its device; returns
    :func:`compute_device`. What its backend writes to stderr meanwhile is shown as :func:`start_up_lines`
    keeps it. Idempotent: call it before anything else imports Keras, or the noise is out already."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_kept(start_up_lines):
        importlib.import_module("keras")      # where the backend starts, and writes its start-up lines
        full_precision()
        return compute_device()


# What TensorFlow (2.21, measured here) writes to stderr as it starts, whatever TF_CPP_MIN_LOG_LEVEL says: its
# C++ log lines come from two copies of absl logging not yet set up, each first warning that it is not, so
# every run began with seven lines on a CPU server (two sets of I lines, then "E ... failed call to cuInit"),
# which a daemon's journal shows as errors at every start.
_CPP_LOG_LINE = re.compile(r"([IWEF])\d{4} \d+:\d+:\d+\.\d+ +\d+ \S+:\d+\] ")
_ABSL_NOT_SET_UP = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_CUDA_DRIVER = "Could not find cuda drivers on your machine"
_CONTINUED = re.compile(r"(\s|To enable the following instructions: )")    # a record's next line


def start_up_lines(text: str, min_level: int | None = None) -> str:
    """Of what the Keras backend wrote to stderr as it started, what to show. Left out: its C++ log lines (and
    the lines that continue them: indented, or the second of TensorFlow's CPU-features message) below
    ``TF_CPP_MIN_LOG_LEVEL`` (I 0, W 1, E 2, F 3; default 2, as cxrscreen sets it), as TensorFlow leaves them
    out once its logging is set up; and at level 1 or more, absl's warning that it is not, and the failure to
    initialise CUDA where no CUDA driver was found at all (a CPU server: it follows from that). Everything else
    is kept: an error, the CUDA failure of a server whose driver is there, Python's warnings. At level 0, every
    line is kept."""
    if min_level is None:
        try:
            min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        except ValueError:
            min_level = 0
    no_driver = _NO_CUDA_DRIVER in text
    kept, leaving_out = [], False
    for line in text.splitlines(keepends=True):
        record = _CPP_LOG_LINE.match(line)
        if record:
            leaving_out = "IWEF".index(record.group(1)) < min_level or (
                min_level >= 1 and no_driver and "failed call to cuInit" in line)
        elif line.rstrip("\r\n") == _ABSL_NOT_SET_UP:
            leaving_out = min_level >= 1
        elif not _CONTINUED.match(line):     # not one of ours (Python's warnings, a library's own lines): shown
            leaving_out = False
        if not leaving_out:
            kept.append(line)
    return "".join(kept)


@contextmanager
def _stderr_kept(keep):
    """While in it, what is written to the process's stderr (file descriptor 2, so the C++ libraries' writes
    too) goes to a temporary file; after, ``keep(text)`` of it is written to stderr. Where stderr is not a
    file descriptor (an embedding application's stream), nothing is caught."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                except (AttributeError, OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                caught.seek(0)
                shown = keep(caught.read().decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
                try:
                    while shown:
                        shown = shown[os.write(2, shown):]
                except OSError:      # stderr closed or a broken pipe: what it would show is lost, not the run
                    pass
    finally:
        os.close(saved)


def full_precision() -> None:
    """Make float32 convolutions and matrix products of the Keras backend compute in full float32 on
    every device.

    NVIDIA GPUs since Ampere compute them in TF32 (a 10-bit mantissa) by default under JAX,
    PyTorch's cuDNN convolutions and TensorFlow. Measured on an H100 (``benchmarks/screening_devices.py``,
    629 studies): JAX and PyTorch scores moved by up to 4.2e-3 (mean 3.5e-4) from TensorFlow's on the
    CPU, and by 2e-6 with full precision, at no visible cost (the model is small: the GPU is not
    where screening waits). The threshold was chosen on float32 scores, so in TF32 a study near it
    could be flagged on one server and not on another. Idempotent; without effect on a CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "ieee"       # torch >= 2.9
            torch.backends.cudnn.conv.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)


def accelerators() -> list[str]:
    """The names of the GPUs the Keras backend computes on (it uses the first); [] on a CPU. Hide
    them with ``CUDA_VISIBLE_DEVICES=""`` (and ``JAX_PLATFORMS=cpu``) to compute on the CPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
                    for gpu in tf.config.list_physical_devices("GPU")]
        if backend == "jax":
            import jax

            return [str(device.device_kind) for device in jax.devices() if device.platform != "cpu"]
        if backend == "torch":
            import torch

            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:      # a device query must never stop screening or training
        pass
    return []


def compute_device() -> str:
    """The Keras backend and the device it computes on, as a run's summary records it:
    ``"jax on GPU (NVIDIA H100 80GB HBM3)"``, ``"tensorflow on CPU"``."""
    import keras

    gpus = accelerators()
    return f"{keras.backend.backend()} on " + (f"GPU ({gpus[0]})" if gpus else "CPU")
