"""Run configuration: recipes in, one fully resolved `config.toml` out.

A recipe is a TOML file naming a model (zoo name, spec path, or an inline [model] table) with
[data], [augment], [train], [checkpoint] and [log] settings. Command-line options override it; the
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
from ..models.args import shown
from ..models.spec import ModelSpec, parse_spec
from .bounds import is_finite_number, is_text, range_rules
from .names import check_checkpoint_pattern


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
    threads: int = 0                # CPU threads (0: one per core, fewer while others are busy)
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


@dataclass
class LogConfig:
    tensorboard: bool = False       # write TensorBoard event files (pip install 'fashion-cnn[tensorboard]')
    tensorboard_dir: str = ""       # where they go ("" = RUN_DIR/tensorboard)
    tensorboard_every: int = 100    # log the running training loss every N optimizer steps (0 = never)
    histograms: bool = True         # weight and gradient histograms of every layer, each epoch


SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "train": TrainConfig,
            "checkpoint": CheckpointConfig, "log": LogConfig}
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
    log: LogConfig = field(default_factory=LogConfig)
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
        data.pop("log", None)  # what is logged, and where, changes no weight
        for section, key in ignore:
            data[section].pop(key, None)
        data["data"].pop("data_dir", None)
        data["data"].pop("strict", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# The source of settings given as options (resolve_config's overrides): errors about them name
# the setting, which the CLI shows as its flag; errors about a file's settings name the file.
OVERRIDES = "command line"


def _check_value(section: str, key: str, value: Any, template: Any) -> Any:
    where, setting = f"[{section}] {key}", f"{section}.{key}"
    if isinstance(template, bool):
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {shown(value)}", setting=setting)
    elif isinstance(template, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: expected an integer, got {shown(value)}", setting=setting)
    elif isinstance(template, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {shown(value)}", setting=setting)
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            value = math.inf
        if not math.isfinite(value):
            raise SpecError(f"{where}: must be finite, got {shown(value)}", setting=setting)
    elif isinstance(template, str):
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {shown(value)}", setting=setting)
        if "\x00" in value:  # no file name or choice holds one; open() would raise
            raise SpecError(f"{where}: must not contain a NUL character", setting=setting)
        if not is_text(value):
            raise SpecError(f"{where}: not valid Unicode text, got {shown(value)}",
                            setting=setting)
        choices = CHOICES.get((section, key))
        if choices and value not in choices:
            raise SpecError(f"{where}: must be one of {', '.join(choices)}, got {shown(value)}",
                            setting=setting)
    elif (section, key) == ("data", "class_names"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SpecError(f"{where}: expected a list of names, got {shown(value)}",
                            setting=setting)
        if len(set(value)) != len(value):
            raise SpecError(f"{where}: a class name appears twice", setting=setting)
    elif (section, key) in (("data", "mean"), ("data", "std")):
        if not isinstance(value, list) or len(value) not in (0, 1, 3) or not all(
                is_finite_number(v) for v in value):
            raise SpecError(f"{where}: expected one number per channel (1 or 3), got "
                            f"{shown(value)}", setting=setting)
        value = [float(v) for v in value]
    elif isinstance(template, list):
        if (not isinstance(value, list) or len(value) != 2
                or not all(is_finite_number(v) for v in value)):
            raise SpecError(f"{where}: expected a pair of finite numbers, got {shown(value)}",
                            setting=setting)
        value = [float(v) for v in value]
    return value


def _blamed(exc: SpecError, source: str | None, given=None) -> SpecError:
    """`exc` as its reader should see it. From a file (`source` names it), it names the file
    and no setting: the CLI would show the setting's flag, which the user never gave. From
    options (`source` None or OVERRIDES), it keeps its setting where that is one of `given`
    (the settings given as options, where known)."""
    if source not in (None, OVERRIDES):
        return SpecError(f"{source}: {exc}")
    if given is not None and exc.setting not in given:
        return SpecError(str(exc))
    return exc


def _range_checks(cfg: RunConfig, source: str | None = None, given=None) -> None:
    """SpecError (blamed as _blamed says) unless `cfg` keeps every rule: bounds.range_rules,
    the checkpoint name pattern's (names.check_checkpoint_pattern), and a model that takes
    the images of its data once the config is bound to them."""
    try:
        for ok, setting, message in range_rules(cfg):
            if not ok:
                raise SpecError(message, setting=setting)
        c = cfg.checkpoint
        if not ("epoch" in check_checkpoint_pattern(c.filename) or c.save_best_only
                or c.every == 0):
            raise SpecError("[checkpoint] filename must contain {epoch} (e.g. \"model1_{epoch}\") "
                            "unless save_best_only is true or every is 0",
                            setting="checkpoint.filename")
        if cfg.data.channels:  # bound to its data (bind_to_data): the model must take its images
            check_model_fits(cfg)
    except SpecError as exc:
        raise _blamed(exc, source, given) from None


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
    """Set the `values` ({key: value}) of one section of `cfg`, each checked; SpecError names
    `source` (a file, or OVERRIDES: then the setting) and the valid sections or keys where one
    is unknown."""
    if section not in SECTIONS:
        raise SpecError(f"{source}: unknown section {shown(section)}; sections: "
                        f"{', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise SpecError(f"{source}: [{section}] must be a table")
    target = getattr(cfg, section)
    known = {f.name for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise SpecError(f"{source}: [{section}] unknown setting {shown(key)}; "
                            f"known: {', '.join(sorted(known))}")
        try:
            setattr(target, key, _check_value(section, key, value, getattr(target, key)))
        except SpecError as exc:
            raise _blamed(exc, source) from None


def config_from_data(raw: dict, source: str, resolve_model) -> RunConfig:
    """Build a RunConfig from recipe/config data; `resolve_model(value)` turns `model` into a spec."""
    unknown = set(raw) - {"recipe", "description", "model", "module", *SECTIONS}
    if unknown:
        raise SpecError(f"{source}: unknown key {shown(sorted(map(str, unknown))[0])}; "
                        f"expected model, description, {', '.join(SECTIONS)}")
    if "model" not in raw and "module" not in raw:
        raise SpecError(f"{source}: missing 'model' (a zoo name, a spec file, or a [model] table)")
    if "model" in raw and "module" in raw:
        raise SpecError(f"{source}: give either 'model' (a spec) or [module] (a plain PyTorch "
                        f"module's record), not both")
    recipe, description = raw.get("recipe", ""), raw.get("description", "")
    spec, module = None, None
    if "module" in raw:
        module = _module_info(raw["module"], source)
    else:
        model = raw["model"]
        if isinstance(model, dict):
            spec = parse_spec(model, "model")
        elif isinstance(model, str) and model:
            spec = resolve_model(model)
        else:
            raise SpecError(f"{source}: model must be a zoo name, a spec file or a [model] "
                            f"table, got {shown(model)}")
    cfg = RunConfig(model=spec, recipe=recipe, description=description, module=module)
    for section in SECTIONS:
        if section in raw:
            apply_section(cfg, section, raw[section], source)
    _range_checks(cfg, source)
    return cfg


def _module_info(raw, source: str) -> ModuleInfo:
    if (not isinstance(raw, dict) or set(raw) != {"class", "params"}
            or not isinstance(raw["class"], str) or not raw["class"].isprintable()
            or not raw["class"] or isinstance(raw["params"], bool)
            or not isinstance(raw["params"], int) or raw["params"] < 0):
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


def validate(cfg: RunConfig, source: str | None = None, given=None) -> RunConfig:
    """`cfg`, checked: every rule of the config (bounds.range_rules, the checkpoint name
    pattern, the recipe's name and the description); SpecError names `source` where it is a
    file, else the setting where it is one of `given` (or any setting where `given` is None):
    the settings the caller's options set.

    >>> from fashion_cnn.training.recipes import load_config
    >>> validate(load_config("model1")).train.batch_size
    32
    """
    _range_checks(cfg, source, given)
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
        section, dot, key = dotted.partition(".")
        if not dot:
            raise SpecError(f"setting {shown(dotted)}: name it as section.key (sections: "
                            f"{', '.join(SECTIONS)})")
        out.setdefault(section, {})[key] = value
    return out
