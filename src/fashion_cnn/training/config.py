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
from .. import devices
from ..errors import SpecError
from ..fileio import toml_value
from ..models.spec import ModelSpec, parse_spec


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | a folder of images by class | a folder of IDX files | an .npz
    subset: int = 0                 # keep the first N training images (0 = all)
    validation_split: float = 0.2   # fraction held out for validation: the LAST part, as Keras
    pad: int = -1                   # pixels of padding per side (-1 = inferred from the model's input)
    pad_value: float = -0.5         # value of padded pixels (-0.5 is the scaled background)
    data_dir: str = ""              # directory of Fashion-MNIST's IDX files ("" = search the usual places)
    image_size: int = 0             # side the images are brought to (0 = the data's own; filled in by a run)
    channels: int = 0               # 1 (grayscale) or 3 (colour) (0 = the data's own; filled in by a run)
    fit: str = "letterbox"          # letterbox | crop | stretch: how an image of another size is brought to image_size
    order: str = "auto"             # auto | shuffle | stored: training images' order before the validation split (auto: shuffle image folders)
    test_fraction: float = 0.2      # share of each class held out as the test set when the data has none
    split_seed: int = 0             # seeds that hold-out and the shuffle of `order`
    strict: bool = False            # refuse an image folder with an unreadable file (else skip it, warning)
    normalize: str = "fixed"        # fixed (x/128 - 0.5, the seed's) | mean_std (per channel, from the training split)
    mean: list = field(default_factory=list)   # per-channel mean of x/255 (mean_std; filled in by a run)
    std: list = field(default_factory=list)    # per-channel std of x/255 (mean_std; filled in by a run)
    class_names: list = field(default_factory=list)  # the classes in label order; an image folder's subfolders in this order (default sorted; filled in by a run)


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
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast; loss, optimizer and BatchNorm stay fp32)
    device: str = "auto"            # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    cpu_kernels: bool = True        # on the CPU, the C kernels and CPU speed paths (models.cpu_pass)
    deterministic: bool = False     # on CUDA, deterministic algorithms (cuDNN benchmark off)
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
           ("data", "fit"): ("letterbox", "crop", "stretch"),
           ("data", "order"): ("auto", "shuffle", "stored"),
           ("data", "normalize"): ("fixed", "mean_std"),
           ("train", "optimizer"): ("adam", "adamw", "sgd"),
           ("train", "schedule"): ("constant", "onecycle", "cosine"),
           ("train", "precision"): ("fp32", "bf16", "fp16"),
           ("train", "tta"): ("none", "shift", "flip"),
           ("checkpoint", "monitor"): ("val_loss", "val_accuracy", "loss", "accuracy")}


@dataclass
class ModuleInfo:
    """What config.toml records of a plain PyTorch module trained in place of a spec
    (fashion_cnn.train(..., model=net)). The module is code, not data: resuming, evaluating
    or reloading the run needs it passed again (model=)."""

    qualname: str                   # the module's class, as module.QualName ("mypkg.nets.Net")
    params: int                     # its parameter count (all parameters, trainable or not)

    @property
    def short_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]


@dataclass
class RunConfig:
    model: ModelSpec | None         # None for a plain PyTorch module (then `module` is set)
    recipe: str = ""                # the recipe or model name this run came from
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    module: ModuleInfo | None = None

    @property
    def pad(self) -> int:
        """Resolved padding: explicit, or what makes the images (28x28 until a run fills in
        data.image_size) fit the model's input."""
        if self.data.pad >= 0:
            return self.data.pad
        if self.model is None:  # a plain module: the images as they are
            return 0
        return max(0, (self.model.input_shape[0] - self.image_size) // 2)

    @property
    def stats(self) -> tuple[list | None, list | None]:
        """(mean, std) per channel when data.normalize is mean_std, else (None, None)."""
        if self.data.normalize == "mean_std" and self.data.mean:
            return list(self.data.mean), list(self.data.std)
        return None, None

    @property
    def image_size(self) -> int:
        return self.data.image_size or 28

    @property
    def channels(self) -> int:
        """The images' channels; Fashion-MNIST's one until a run fills in data.channels."""
        return self.data.channels or 1

    @property
    def class_names(self) -> list[str]:
        """The classes in label order; Fashion-MNIST's until a run fills in data.class_names."""
        from ..data.fashion_mnist import CLASS_NAMES

        return list(self.data.class_names) or list(CLASS_NAMES)

    def to_data(self) -> dict:
        out = {"recipe": self.recipe, "description": self.description}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        if self.model is not None:
            out["model"] = self.model.to_data()
        if self.module is not None:
            out["module"] = {"class": self.module.qualname, "params": self.module.params}
        return out

    def fingerprint(self, ignore=(("train", "epochs"), ("train", "threads"),
                                  ("train", "tta"), ("train", "device"),
                                  ("train", "cpu_kernels"), ("train", "deterministic"))) -> str:
        """Hash of everything that determines the run's weights (epochs may be extended)."""
        data = self.to_data()
        data.pop("description", None)
        for section, key in ignore:
            data[section].pop(key, None)
        data["data"].pop("data_dir", None)
        data["data"].pop("strict", None)
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
    elif (section, key) == ("data", "class_names"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SpecError(f"{where}: expected a list of names, got {value!r}")
        if len(set(value)) != len(value):
            raise SpecError(f"{where}: a class name appears twice")
    elif (section, key) in (("data", "mean"), ("data", "std")):
        if (not isinstance(value, list) or len(value) not in (0, 1, 3) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value)):
            raise SpecError(f"{where}: expected one number per channel (1 or 3), got {value!r}")
        value = [float(v) for v in value]
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
        (devices.is_device_name(t.device),
         f"[train] device {t.device!r} is not a device: {', '.join(devices.DEVICE_CHOICES)}"),
        (t.eval_batch_size >= 1, "[train] eval_batch_size must be at least 1"),
        (0 <= d.validation_split < 1, "[data] validation_split must be in [0, 1)"),
        (d.subset == 0 or d.subset >= 2, "[data] subset must be 0 (all) or at least 2"),
        (d.pad >= -1, "[data] pad must be >= 0, or -1 for automatic"),
        (d.image_size == 0 or d.image_size >= 4, "[data] image_size must be 0 (the data's) or at least 4"),
        (d.channels in (0, 1, 3), "[data] channels must be 0 (the data's), 1 or 3"),
        (0 < d.test_fraction < 1, "[data] test_fraction must be in (0, 1)"),
        (len(d.mean) == len(d.std), "[data] mean and std need one value per channel each"),
        (all(v > 0 for v in d.std), "[data] std values must be positive"),
        (not d.class_names or len(d.class_names) >= 2, "[data] class_names needs at least 2 names"),
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
    if d.channels:  # bound to its data (bind_to_data): the model must take its images
        check_model_fits(cfg)


def check_model_fits(cfg: RunConfig) -> None:
    """SpecError unless the model's input is the (padded) images of the config's data."""
    if cfg.model is None:  # a plain module: its input is its own business
        return
    side, size = cfg.model.input_shape[0], cfg.image_size
    if cfg.model.input_shape[0] != cfg.model.input_shape[1] or side != size + 2 * cfg.pad:
        raise SpecError(f"model {cfg.model.name!r} expects {side}x{cfg.model.input_shape[1]} "
                        f"input but the data is {size + 2 * cfg.pad}x{size + 2 * cfg.pad} "
                        f"({size} + 2 x pad {cfg.pad}); fix [data] pad or the model's input_shape")
    if cfg.model.input_shape[2] != cfg.channels:
        raise SpecError(f"model {cfg.model.name!r}: the data has {cfg.channels} channel(s), "
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
    unknown = set(raw) - {"recipe", "description", "model", "module", *SECTIONS}
    if unknown:
        raise SpecError(f"{source}: unknown key {sorted(unknown)[0]!r}; expected model, "
                        f"description, {', '.join(SECTIONS)}")
    if "model" not in raw and "module" not in raw:
        raise SpecError(f"{source}: missing 'model' (a zoo name, a spec file, or a [model] table)")
    if "model" in raw and "module" in raw:
        raise SpecError(f"{source}: give either 'model' (a spec) or [module] (a plain PyTorch "
                        f"module's record), not both")
    spec, module = None, None
    if "module" in raw:
        module = _module_info(raw["module"], source)
    else:
        model = raw["model"]
        spec = parse_spec(model, "model") if isinstance(model, dict) else resolve_model(model)
    cfg = RunConfig(model=spec, recipe=str(raw.get("recipe", "")),
                    description=str(raw.get("description", "")), module=module)
    for section in SECTIONS:
        if section in raw:
            apply_section(cfg, section, raw[section], source)
    _range_checks(cfg)
    return cfg


def _module_info(raw, source: str) -> ModuleInfo:
    if (not isinstance(raw, dict) or set(raw) != {"class", "params"}
            or not isinstance(raw["class"], str) or not raw["class"]
            or isinstance(raw["params"], bool) or not isinstance(raw["params"], int)
            or raw["params"] < 0):
        raise SpecError(f"{source}: [module] must hold class (a string) and params (a count)")
    return ModuleInfo(raw["class"], raw["params"])


def bind_to_data(cfg: RunConfig, data) -> RunConfig:
    """Fill in what a run learns from its data (data.ImageData): the image size, channels and
    class names, and for normalize = "mean_std" the training split's per-channel statistics;
    the model spec adapted to them (models.spec.adapt_spec). What the config already says
    (a run's own config.toml) is checked against the data: DataError if the data changed."""
    from ..data.arrays import channel_stats, fit_part
    from ..errors import DataError
    from ..models.spec import adapt_spec

    d = cfg.data
    # What the config already says (a run's own config.toml, or the user's settings, which
    # the data was loaded with) must be what the data is; else the data changed.
    ours = (d.image_size or data.image_size, d.channels or data.channels,
            list(d.class_names) or list(data.class_names))
    theirs = (data.image_size, data.channels, list(data.class_names))
    if ours != theirs:
        def text(size, channels, names):
            return (f"{size}x{size}x{channels}, {len(names)} classes: "
                    f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
        raise DataError(f"{d.dataset}: the data ({text(*theirs)}) is not what the config says "
                        f"({text(*ours)}); has the dataset changed since the run?",
                        setting="data.dataset")
    if d.dataset != "fashion-mnist":  # recorded so the run reloads it from any directory
        from pathlib import Path

        d.dataset = str(Path(d.dataset).expanduser().resolve())
    d.image_size, d.channels, d.class_names = theirs
    if cfg.model is not None:
        # an explicit pad fixes the input's size; else smaller images are padded up to the
        # model's input (cfg.pad), larger ones widen it. A run's own spec fits already.
        cfg.model = adapt_spec(cfg.model, data.image_size + 2 * max(d.pad, 0), data.channels,
                               data.num_classes, exact=d.pad >= 0)
    if d.normalize == "mean_std" and not d.mean:
        d.mean, d.std = channel_stats(fit_part(data, d.subset or None, d.validation_split))
    if d.mean and len(d.mean) != d.channels:
        raise SpecError(f"[data] mean and std have {len(d.mean)} values; the data has "
                        f"{d.channels} channel(s)")
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
    if cfg.module is not None:
        return "\n".join(lines + [
            "# a plain PyTorch module, not a spec: resume or reload the run from Python, passing",
            "# the module again (fashion_cnn.resume(run_dir, model=...))",
            "[module]",
            f"class = {toml_value(cfg.module.qualname)}".ljust(40) + "  # its class, module.QualName",
            f"params = {toml_value(cfg.module.params)}".ljust(40) + "  # its parameter count", ""])
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
