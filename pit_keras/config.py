"""The configuration of a training run: `RunConfig`, one typed field per setting, written as the run folder's
`run.json` (`to_json`, `from_json`; the keys are the field names).

`train.parse_config` builds one from the flags; tests and tools build one directly (every field but the dataset
roots defaults to its train flag's default) and derive variants with `dataclasses.replace`. Every value is
checked when a `RunConfig` is made, so a bad setting fails in one sentence naming its flag, before TensorFlow is
imported. A `run.json` written before a setting was recorded is read with the value that run was trained with
(`MIGRATIONS`). This module imports no TensorFlow.
"""

import dataclasses
import math
import typing
from typing import Optional

from pit_keras.data import classes
from pit_keras.errors import UserError

# Choices of the enum settings (the train flags take theirs from here).
SOURCES = ("gta5", "synthia", "synthetic", "folder")
TARGETS = ("cityscapes", "synthetic", "folder")
METHODS = ("pit", "source_only", "minent")
# The built-in backbones (models/backbones.py's BACKBONES, which a test keeps equal): the train command's
# --backbone takes one of them, checked with the flags, before TensorFlow loads. Code that registers a backbone
# of its own builds RunConfig and runs the library itself.
BACKBONE_NAMES = ("tiny", "mobilenetv3_small", "mobilenetv3_large", "deeplabv2_resnet101", "fcn8s_vgg16")
DOMAINS = ("source", "target")
LOSS_RESOLUTIONS = ("feature", "input")
RECON_STOP_GRADIENTS = ("none", "fine", "coarse")
RECON_SPACES = ("logits", "probabilities")
IMAGE_LOSS_REDUCTIONS = ("sum", "mean")
IMAGE_LABEL_CONFIDENCES = ("none", "entropy", "agreement")
IMAGE_LABEL_KINDS = ("shares", "presence")
TEACHER_BNS = ("target_batch", "running")
STRATEGIES = ("default", "mirrored", "multi_worker")
MIXED_PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
ASPP_IMPLEMENTATIONS = ("matmul", "conv")

TEACHER_LABELS = "teacher"  # --image_labels value: PIT's target image labels from the self-training teacher
GROUND_TRUTH_LABELS = "ground_truth"  # --image_labels value: the target's own labels (weakly supervised)

Size = tuple[int, int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every setting of a training run. See `python -m pit_keras.train --help` for what each one does."""

    # --- Data ---
    source: str = "gta5"
    source_root: str
    label_map: Optional[str] = None
    source_size: Size = (1280, 640)
    target: str = "cityscapes"
    target_root: str
    target_size: Size = (1024, 512)
    benchmark_seed: Optional[int] = None
    cache_images: bool = False
    # --- Network ---
    backbone: str = "tiny"
    backbone_weights: str = "none"
    num_classes: Optional[int] = None  # None: the source's (16 for SYNTHIA, else 19)
    class_set: Optional[str] = None  # None: the source's (`classes.CLASS_SETS`)
    aspp_implementation: str = "matmul"
    # --- Method ---
    method: str = "pit"
    lse_r: tuple[float, ...] = (0.5, 1.0, 1.5)
    lse_normalize: bool = True
    lambda_c: float = 0.5
    lambda_r: float = 0.5
    lambda_ent: float = 0.001
    recon_domains: tuple[str, ...] = DOMAINS
    loss_resolution: str = "feature"
    recon_stop_gradient: str = "none"
    recon_space: str = "logits"
    interaction_lr_multiplier: float = 1.0
    head_lr_multiplier: float = 1.0
    image_loss_reduction: str = "mean"
    image_labels: Optional[str] = None
    image_labels_prior: Optional[str] = None
    image_label_confidence: str = "none"
    image_label_kind: str = "shares"
    # --- Self-training ---
    self_training: bool = False
    lambda_st: float = 1.0
    st_ema: float = 0.99
    st_threshold: float = 0.968
    st_teacher_bn: str = "target_batch"
    st_classmix: bool = True
    st_start: int = 0
    st_ramp: int = 0
    st_flip: bool = False
    st_class_portion: float = 0.0
    # --- Optimisation ---
    batch_size: int = 4
    num_steps: int = 200000
    learning_rate: float = 2.5e-5
    momentum: float = 0.9
    weight_decay: float = 0.0
    poly_power: float = 0.9
    seed: int = 0
    # --- Execution (how, not what, the run computes) ---
    strategy: str = "default"
    cpu_replicas: int = 1
    mixed_precision: str = "float32"
    jit_compile: bool = False
    deterministic: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _typed(field.name, getattr(self, field.name), field.type))
        synthia = self.source == "synthia"
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", 16 if synthia else 19)
        if self.class_set is None:
            object.__setattr__(self, "class_set", classes.SYNTHIA16.name if synthia else classes.CITYSCAPES19.name)
        _check(self)

    # --- Derived settings ---

    @property
    def num_units(self):
        """K, the coarse region-expansion units of the network: one per `lse_r` for PIT, none otherwise."""
        return len(self.lse_r) if self.method == "pit" else 0

    @property
    def classes(self):
        """The `classes.ClassSet` of the run's train ids."""
        return classes.CLASS_SETS[self.class_set]

    @property
    def teacher_image_labels(self):
        """PIT's target image labels come from the self-training teacher (`--image_labels=teacher`)."""
        return self.image_labels == TEACHER_LABELS

    @property
    def uses_target(self):
        """The run reads target training images (every method but source-only, or self-training)."""
        return self.method != "source_only" or self.self_training

    # --- run.json ---

    def to_json(self):
        """The `run.json` payload: a dict of plain JSON values, one key per field."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, payload, path="run.json"):
        """The configuration of a `run.json` payload read from `path` (named in errors). A key the file lacks
        takes the value runs were trained with before it was recorded (`MIGRATIONS`); an unknown key, a
        missing one that always was recorded, or a bad value is refused in one sentence."""
        if not isinstance(payload, dict):
            raise UserError(f"{path}: expected a JSON object of run settings, not {type(payload).__name__}.")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = [key for key in payload if key not in names]
        if unknown:
            raise UserError(f"{path}: unknown setting {unknown[0]!r} (not one this version of pit_keras knows; "
                            "was the run made by another version?).")
        values = {**MIGRATIONS, **payload}
        missing = [name for name in names if name not in values]
        if missing:
            raise UserError(f"{path} lacks the setting {missing[0]!r}, which every run records; not a training "
                            "run of pit_keras?")
        try:
            return cls(**values)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None


# The value of each setting that an older run.json lacks: what runs were trained with before it was recorded
# (the defaults of their day). Settings not listed here were recorded from the first run on.
MIGRATIONS = {
    "label_map": None, "benchmark_seed": None, "cache_images": False,
    # The same function and weights either way; older runs load as the loaders always did.
    "aspp_implementation": "matmul",
    "lse_normalize": False, "interaction_lr_multiplier": 0.01, "image_loss_reduction": "sum",
    "head_lr_multiplier": 1.0, "recon_stop_gradient": "none", "recon_space": "logits",
    "image_labels_prior": None, "image_label_confidence": "none", "image_label_kind": "shares",
    "self_training": False, "lambda_st": 1.0, "st_ema": 0.99, "st_threshold": 0.968,
    "st_teacher_bn": "target_batch", "st_classmix": True, "st_start": 0, "st_ramp": 0, "st_flip": False,
    "st_class_portion": 0.0,
    "strategy": "default", "cpu_replicas": 1, "mixed_precision": "float32", "jit_compile": False,
    "deterministic": False,
}

CHOICES = {
    "source": SOURCES, "target": TARGETS, "method": METHODS, "loss_resolution": LOSS_RESOLUTIONS,
    "recon_stop_gradient": RECON_STOP_GRADIENTS, "recon_space": RECON_SPACES,
    "image_loss_reduction": IMAGE_LOSS_REDUCTIONS, "image_label_confidence": IMAGE_LABEL_CONFIDENCES,
    "image_label_kind": IMAGE_LABEL_KINDS, "st_teacher_bn": TEACHER_BNS, "strategy": STRATEGIES,
    "mixed_precision": MIXED_PRECISIONS, "aspp_implementation": ASPP_IMPLEMENTATIONS,
}
UNIT_INTERVAL = ("st_ema", "st_threshold", "st_class_portion")
NON_NEGATIVE_INTS = ("st_start", "st_ramp")
POSITIVE_INTS = ("batch_size", "num_steps", "cpu_replicas", "num_classes")
NON_NEGATIVE_FLOATS = ("learning_rate", "momentum", "weight_decay", "poly_power", "lambda_c", "lambda_r",
                       "lambda_ent", "lambda_st", "head_lr_multiplier", "interaction_lr_multiplier")


def _show(value):
    """A value as it is written on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _typed(name, value, kind):
    """`value` as the field's type (JSON lists as tuples, ints as floats where floats are meant)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _typed(name, value, args[0])
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise UserError(f"--{name}={_show(value)}: expected a list of values.")
        if args[-1] is Ellipsis:
            return tuple(_typed(name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise UserError(f"--{name}={_show(value)}: expected W,H (two integers).")
        return tuple(_typed(name, v, a) for v, a in zip(value, args))
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"--{name}={_show(value)}: expected true or false.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"--{name}={_show(value)}: expected an integer.")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"--{name}={_show(value)}: expected a number.")
        return float(value)
    if not isinstance(value, str):
        raise UserError(f"--{name}={_show(value)}: expected a string.")
    return value


def _check(config):
    """Refuses values and combinations no run can train with, in the order the train flags are read."""
    for name, choices in CHOICES.items():
        value = getattr(config, name)
        if value not in choices:
            raise UserError(f"--{name}={value}: expected one of {', '.join(choices)}.")
    unknown = [d for d in config.recon_domains if d not in DOMAINS]
    if unknown:
        raise UserError(f"--recon_domains={_show(config.recon_domains)}: {unknown[0]} is not one of "
                        f"{', '.join(DOMAINS)}.")
    for name in ("source_size", "target_size"):
        if min(getattr(config, name)) <= 0:
            raise UserError(f"--{name}={_show(getattr(config, name))}: width and height must be positive.")
    if config.class_set not in classes.CLASS_SETS:
        raise UserError(f"class_set={config.class_set}: expected one of {', '.join(classes.CLASS_SETS)}.")
    if config.method == "pit" and not config.image_labels:
        raise UserError("--method=pit needs --image_labels (teacher with --self_training, a JSON file of target "
                        "image labels, or ground_truth).")
    if config.method != "pit" and config.image_labels:
        raise UserError(f"--image_labels is only used by --method=pit, not --method={config.method}.")
    if config.image_labels == TEACHER_LABELS and not config.self_training:
        raise UserError("--image_labels=teacher needs --self_training (the teacher estimates the labels).")
    if (config.image_labels_prior or config.image_label_confidence != "none") and not config.teacher_image_labels:
        name = "image_labels_prior" if config.image_labels_prior else "image_label_confidence"
        raise UserError(f"--{name} only applies with --image_labels=teacher, not --image_labels="
                        f"{config.image_labels}.")
    if config.image_label_confidence == "agreement" and not config.image_labels_prior:
        raise UserError("--image_label_confidence=agreement needs --image_labels_prior (the estimate the teacher "
                        "is compared with).")
    for name in UNIT_INTERVAL:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise UserError(f"--{name}={getattr(config, name)}: must be between 0.0 and 1.0.")
    for name in NON_NEGATIVE_INTS:
        if getattr(config, name) < 0:
            raise UserError(f"--{name}={getattr(config, name)}: must be 0 or more.")
    for name in POSITIVE_INTS:
        if getattr(config, name) <= 0:
            raise UserError(f"--{name}={getattr(config, name)}: must be positive.")
    for name in NON_NEGATIVE_FLOATS:
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name}={value}: must be a finite number, 0 or more.")
    if config.learning_rate == 0:
        raise UserError("--learning_rate=0: nothing would train; give a positive learning rate.")
    if config.label_map and config.source != "folder":
        raise UserError(f"--label_map applies to --source=folder only, not --source={config.source}.")
    if config.target == "folder" and config.image_labels == GROUND_TRUTH_LABELS:
        raise UserError("--image_labels=ground_truth reads target training labels, which --target=folder does not "
                        "have; use --image_labels=teacher (with --self_training) or a JSON file.")
    if config.method == "pit" and (not config.lse_r or any(r <= 0 for r in config.lse_r)):
        raise UserError(f"--lse_r={_show(config.lse_r)}: pit needs one or more positive values.")
