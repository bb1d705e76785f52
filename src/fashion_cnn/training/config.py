"""Run configuration: recipes in, one fully resolved `config.toml` out.

A recipe is a TOML file naming a model (zoo name, spec path, or an inline [model] table) with
[data], [augment], [train] and [checkpoint] settings. Command-line options override it; the
resolved result is written with every run so the run can be repeated from it alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..data.augment import AugmentConfig
from ..errors import SpecError
from ..fileio import toml_value
from ..models.spec import ModelSpec, parse_spec


@dataclass
class DataConfig:
    subset: int = 0                 # keep the first N training images (0 = all 60,000)
    validation_split: float = 0.2   # fraction held out for validation: the LAST part, as Keras
    pad: int = -1                   # pixels of padding per side (-1 = inferred from the model's input)
    pad_value: float = -0.5         # value of padded pixels (-0.5 is the scaled background)
    data_dir: str = ""              # directory of the IDX files ("" = search the usual places)


@dataclass
class TrainConfig:
    epochs: int = 10                # passes over the training split
    batch_size: int = 32            # images per optimizer step (Keras' default is 32)
    steps_fraction: float = 1.0     # fraction of an epoch's steps run per epoch (seed model4: 0.75)
    optimizer: str = "adam"         # adam (Keras' form) | adamw | sgd
    lr: float = 1e-3                # learning rate (peak rate with a schedule)
    beta_1: float = 0.9             # Adam first-moment decay
    beta_2: float = 0.999           # Adam second-moment decay
    epsilon: float = 1e-7           # Adam epsilon, added to sqrt(v) as Keras does
    momentum: float = 0.9           # SGD momentum
    nesterov: bool = True           # SGD Nesterov momentum
    weight_decay: float = 0.0       # decoupled decay per step (times lr); not a Keras regularizer
    schedule: str = "constant"      # constant | onecycle (linear up, linear down) | cosine
    warmup: float = 0.0             # fraction of all steps spent warming up (onecycle/cosine)
    final_lr_fraction: float = 0.0  # lr at the last step, as a fraction of lr (onecycle/cosine)
    label_smoothing: float = 0.0    # cross-entropy label smoothing
    seed: int = 0                   # seeds init, shuffling, dropout and augmentation
    precision: str = "fp32"         # fp32 | bf16 (autocast; loss and BatchNorm stay fp32)
    threads: int = 0                # CPU threads (0 = PyTorch's default: one per core)
    compile: bool = False           # torch.compile the model (compile time reported apart)
    eval_batch_size: int = 256      # images per evaluation batch (small batches stay in cache)
    tta: str = "none"               # test-time augmentation of the final evaluation: none | shift | flip


@dataclass
class CheckpointConfig:
    every: int = 1                  # write a checkpoint every N epochs (0 = never)
    filename: str = "epoch_{epoch}"  # checkpoint name; {epoch} counts from 1 (seed: "model1_{epoch}")
    save_best_only: bool = False    # write only when `monitor` improves
    monitor: str = "val_loss"       # val_loss | val_accuracy | loss | accuracy (mode inferred)
    keep_last: int = 0              # keep the newest K epoch checkpoints (0 = all); best is kept apart
    early_stopping: int = 0         # patience in epochs without improvement (0 = off)
    min_delta: float = 0.0          # smallest change of `monitor` that counts as improvement
    restore_best: bool = False      # at the end, restore the weights of the best epoch


SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "train": TrainConfig,
            "checkpoint": CheckpointConfig}
CHOICES = {("augment", "fill_mode"): ("nearest", "constant", "reflect"),
           ("train", "optimizer"): ("adam", "adamw", "sgd"),
           ("train", "schedule"): ("constant", "onecycle", "cosine"),
           ("train", "precision"): ("fp32", "bf16"),
           ("train", "tta"): ("none", "shift", "flip"),
           ("checkpoint", "monitor"): ("val_loss", "val_accuracy", "loss", "accuracy")}


@dataclass
class RunConfig:
    model: ModelSpec
    recipe: str = ""                # the recipe or model name this run came from
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def pad(self) -> int:
        """Resolved padding: explicit, or what makes 28x28 images fit the model's input."""
        if self.data.pad >= 0:
            return self.data.pad
        return max(0, (self.model.input_shape[0] - 28) // 2)

    def to_data(self) -> dict:
        out = {"recipe": self.recipe, "description": self.description}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["model"] = self.model.to_data()
        return out

    def fingerprint(self, ignore=(("train", "epochs"), ("train", "threads"),
                                  ("train", "tta"))) -> str:
        """Hash of everything that determines the run's weights (epochs may be extended)."""
        data = self.to_data()
        data.pop("description", None)
        for section, key in ignore:
            data[section].pop(key, None)
        data["data"].pop("data_dir", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _check_value(section: str, key: str, value: Any, template: Any) -> Any:
    where = f"[{section}] {key}"
    if isinstance(template, bool):
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(template, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(template, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise SpecError(f"{where}: must be finite, got {value!r}")
    elif isinstance(template, str):
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        choices = CHOICES.get((section, key))
        if choices and value not in choices:
            raise SpecError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    elif isinstance(template, list):
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise SpecError(f"{where}: expected a pair of numbers, got {value!r}")
        value = [float(v) for v in value]
    return value


def _range_checks(cfg: RunConfig) -> None:
    t, d, a, c = cfg.train, cfg.data, cfg.augment, cfg.checkpoint
    rules = [
        (t.epochs >= 1, "[train] epochs must be at least 1"),
        (t.batch_size >= 1, "[train] batch_size must be at least 1"),
        (0 < t.steps_fraction <= 1, "[train] steps_fraction must be in (0, 1]"),
        (t.lr > 0, "[train] lr must be positive"),
        (0 <= t.label_smoothing < 1, "[train] label_smoothing must be in [0, 1)"),
        (0 <= t.warmup < 1, "[train] warmup must be in [0, 1)"),
        (t.weight_decay >= 0, "[train] weight_decay must be >= 0"),
        (t.threads >= 0, "[train] threads must be >= 0"),
        (t.eval_batch_size >= 1, "[train] eval_batch_size must be at least 1"),
        (0 <= d.validation_split < 1, "[data] validation_split must be in [0, 1)"),
        (d.subset == 0 or d.subset >= 2, "[data] subset must be 0 (all) or at least 2"),
        (d.pad >= -1, "[data] pad must be >= 0, or -1 for automatic"),
        (a.rotation_range >= 0 and a.zoom_range >= 0 and a.width_shift_range >= 0
         and a.height_shift_range >= 0, "[augment] ranges must be >= 0"),
        (a.zoom_range < 1, "[augment] zoom_range must be < 1"),
        (a.interpolation_order in (0, 1), "[augment] interpolation_order must be 0 (nearest) or 1 (bilinear)"),
        (0 <= a.random_erasing <= 1, "[augment] random_erasing is a probability in [0, 1]"),
        (c.every >= 0 and c.keep_last >= 0 and c.early_stopping >= 0,
         "[checkpoint] every, keep_last and early_stopping must be >= 0"),
        ("{epoch}" in c.filename or c.save_best_only or c.every == 0,
         "[checkpoint] filename must contain {epoch} (e.g. \"model1_{epoch}\")"),
        ("/" not in c.filename and "\\" not in c.filename and not c.filename.startswith("."),
         "[checkpoint] filename must be a plain name, not a path"),
    ]
    for ok, message in rules:
        if not ok:
            raise SpecError(message)
    side = cfg.model.input_shape[0]
    if cfg.model.input_shape[0] != cfg.model.input_shape[1] or side != 28 + 2 * cfg.pad:
        raise SpecError(f"model {cfg.model.name!r} expects {side}x{cfg.model.input_shape[1]} "
                        f"input but the data is {28 + 2 * cfg.pad}x{28 + 2 * cfg.pad} "
                        f"(28 + 2 x pad {cfg.pad}); fix [data] pad or the model's input_shape")
    if cfg.model.input_shape[2] != 1:
        raise SpecError(f"model {cfg.model.name!r}: Fashion-MNIST has 1 channel, "
                        f"input_shape has {cfg.model.input_shape[2]}")


def apply_section(cfg: RunConfig, section: str, values: dict, source: str) -> None:
    if not isinstance(values, dict):
        raise SpecError(f"{source}: [{section}] must be a table")
    target = getattr(cfg, section)
    known = {f.name for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise SpecError(f"{source}: [{section}] unknown setting {key!r}; "
                            f"known: {', '.join(sorted(known))}")
        setattr(target, key, _check_value(section, key, value, getattr(target, key)))


def config_from_data(raw: dict, source: str, resolve_model) -> RunConfig:
    """Build a RunConfig from recipe/config data; `resolve_model(value)` turns `model` into a spec."""
    unknown = set(raw) - {"recipe", "description", "model", *SECTIONS}
    if unknown:
        raise SpecError(f"{source}: unknown key {sorted(unknown)[0]!r}; expected model, "
                        f"description, {', '.join(SECTIONS)}")
    if "model" not in raw:
        raise SpecError(f"{source}: missing 'model' (a zoo name, a spec file, or a [model] table)")
    model = raw["model"]
    spec = parse_spec(model, "model") if isinstance(model, dict) else resolve_model(model)
    cfg = RunConfig(model=spec, recipe=str(raw.get("recipe", "")),
                    description=str(raw.get("description", "")))
    for section in SECTIONS:
        if section in raw:
            apply_section(cfg, section, raw[section], source)
    _range_checks(cfg)
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    _range_checks(cfg)
    return cfg




def _field_comments(cls) -> dict[str, str]:
    """The one-line comment beside each field in this file's dataclasses."""
    import inspect

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def to_toml(cfg: RunConfig) -> str:
    """The resolved configuration as TOML, each setting with its comment and unit."""
    lines = ["# fashion-cnn run configuration, fully resolved: `fashion-cnn train config.toml`",
             "# repeats this run.",
             f"recipe = {toml_value(cfg.recipe)}",
             f"description = {toml_value(cfg.description)}", ""]
    for name, cls in SECTIONS.items():
        comments = _field_comments(cls)
        lines.append(f"[{name}]")
        for key, value in dataclasses.asdict(getattr(cfg, name)).items():
            lines.append(f"{key} = {toml_value(value)}".ljust(40) + f"  # {comments.get(key, '')}")
        lines.append("")
    spec = cfg.model.to_data()
    lines += ["[model]", f"name = {toml_value(spec['name'])}",
              f"description = {toml_value(spec['description'])}",
              f"input_shape = {toml_value(spec['input_shape'])}", ""]
    for layer in spec["layers"]:
        lines.append("[[model.layers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in layer.items()]
        lines.append("")
    return "\n".join(lines)


def overrides_to_sections(overrides: dict[str, Any]) -> dict[str, dict]:
    """{"train.epochs": 3} -> {"train": {"epochs": 3}}, skipping None."""
    out: dict[str, dict] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out
