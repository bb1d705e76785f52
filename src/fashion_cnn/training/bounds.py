"""The rules every run configuration keeps: bounds of its numbers, and text that config.toml
can hold. Each rule is (holds, setting, message); training.config checks them all, wherever
a config comes from (a recipe, a run's config.toml, the command line, Python).

>>> from fashion_cnn.training.recipes import load_config
>>> [message for holds, _, message in range_rules(load_config("model1")) if not holds]
[]
"""

from __future__ import annotations

import math
from typing import Any

from .. import devices
from ..models.args import shown
from ..models.spec import is_plain_name

# Upper bounds of the integer settings, far above any sensible value: beyond them a setting
# is a typo or an attack, and would fail late (an allocation, a thread pool) or never end.
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536            # images per batch
MAX_THREADS = 1024            # fixed, not the CPU count, so that a run's config reads anywhere
MAX_IMAGES = 10**9            # data.subset
MAX_STEPS = 10**9             # log.tensorboard_every (optimizer steps)
MAX_IMAGE_SIZE = 4096         # pixels per side (data.image_size, data.pad)
# Seeds: torch's generators take seed * 1000 + a per-process offset (training.loop), which must
# fit in 64 bits; 2**53 also survives a round trip through JSON and floats.
MAX_SEED = 2**53 - 1

Rule = tuple[bool, str, str]  # (holds, setting, message)


def is_text(value: str) -> bool:
    """Whether `value` can be written to config.toml: no lone surrogates (a file name that is
    not UTF-8 reads as those, and UTF-8 has no encoding for them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_finite_number(value: Any) -> bool:
    """An int or float (never a bool) that is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


def integer_rules(cfg) -> list[Rule]:
    """The integer settings' bounds of `cfg` (a config.RunConfig)."""
    t, d, c = cfg.train, cfg.data, cfg.checkpoint
    bounds = [  # (value, lowest, highest, setting, a special value below lowest and its meaning)
        (t.epochs, 1, MAX_EPOCHS, "train.epochs", None),
        (t.batch_size, 1, MAX_BATCH, "train.batch_size", None),
        (t.eval_batch_size, 1, MAX_BATCH, "train.eval_batch_size", None),
        (t.threads, 0, MAX_THREADS, "train.threads", None),
        (t.seed, 0, MAX_SEED, "train.seed", None),
        (d.split_seed, 0, MAX_SEED, "data.split_seed", None),
        (d.subset, 2, MAX_IMAGES, "data.subset", (0, "all")),
        (d.pad, 0, MAX_IMAGE_SIZE, "data.pad", (-1, "automatic")),
        (d.image_size, 4, MAX_IMAGE_SIZE, "data.image_size", (0, "the data's")),
        (c.every, 0, MAX_EPOCHS, "checkpoint.every", None),
        (c.keep_last, 0, MAX_EPOCHS, "checkpoint.keep_last", None),
        (c.early_stopping, 0, MAX_EPOCHS, "checkpoint.early_stopping", None),
        (cfg.log.tensorboard_every, 0, MAX_STEPS, "log.tensorboard_every", None),
    ]
    rules = []
    for value, lowest, highest, setting, special in bounds:
        section, key = setting.split(".")
        name = f"[{section}] {key} must be"
        top = "2**53 - 1" if highest == MAX_SEED else str(highest)
        if special is None:
            rules.append((value >= lowest, setting, f"{name} at least {lowest}"))
        else:
            rules.append((value >= lowest or value == special[0], setting,
                          f"{name} {special[0]} ({special[1]}) or at least {lowest}"))
        rules.append((value <= highest, setting, f"{name} at most {top}"))
    return rules


def text_rules(cfg) -> list[Rule]:
    """The run's name and description: what config.toml and the run directory's name hold."""
    recipe, description = cfg.recipe, cfg.description
    return [
        (recipe == "" or is_plain_name(recipe), "recipe",
         f"recipe must be a one-line name of at most 200 characters, without / or \\ (it "
         f"names the run directory), got {shown(recipe)}"),
        (isinstance(description, str) and is_text(description), "description",
         f"description must be a string of valid Unicode text, got {shown(description)}"),
    ]


def range_rules(cfg) -> list[Rule]:
    """Every rule a config (a config.RunConfig) must keep but the checkpoint name
    pattern's (training.names)."""
    t, d, a, c = cfg.train, cfg.data, cfg.augment, cfg.checkpoint
    return text_rules(cfg) + integer_rules(cfg) + [
        (0 < t.steps_fraction <= 1, "train.steps_fraction", "[train] steps_fraction must be in (0, 1]"),
        (t.lr > 0, "train.lr", "[train] lr must be positive"),
        (0 <= t.beta_1 < 1, "train.beta_1", "[train] beta_1 must be in [0, 1)"),
        (0 <= t.beta_2 < 1, "train.beta_2", "[train] beta_2 must be in [0, 1)"),
        (t.epsilon > 0, "train.epsilon", "[train] epsilon must be positive"),
        (0 <= t.momentum <= 1, "train.momentum", "[train] momentum must be in [0, 1]"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "[train] label_smoothing must be in [0, 1)"),
        (0 <= t.warmup < 1, "train.warmup", "[train] warmup must be in [0, 1)"),
        (0 <= t.final_lr_fraction <= 1, "train.final_lr_fraction",
         "[train] final_lr_fraction must be in [0, 1]"),
        (t.weight_decay >= 0, "train.weight_decay", "[train] weight_decay must be >= 0"),
        (devices.is_device_name(t.device), "train.device",
         f"[train] device {shown(t.device)} is not a device: {', '.join(devices.DEVICE_CHOICES)}"),
        (0 <= d.validation_split < 1, "data.validation_split", "[data] validation_split must be in [0, 1)"),
        (d.channels in (0, 1, 3), "data.channels", "[data] channels must be 0 (the data's), 1 or 3"),
        (0 < d.test_fraction < 1, "data.test_fraction", "[data] test_fraction must be in (0, 1)"),
        (len(d.mean) == len(d.std), "data.std", "[data] mean and std need one value per channel each"),
        (all(v > 0 for v in d.std), "data.std", "[data] std values must be positive"),
        (not d.class_names or len(d.class_names) >= 2, "data.class_names",
         "[data] class_names needs at least 2 names"),
        (all(is_text(name) for name in d.class_names), "data.class_names",
         "[data] class_names must be valid Unicode text (a folder's name that is not UTF-8?)"),
        (is_text(d.dataset), "data.dataset", "[data] dataset must be valid Unicode text"),
        (0 <= a.rotation_range <= 360, "augment.rotation_range",
         "[augment] rotation_range must be in [0, 360] degrees"),
        (0 <= a.width_shift_range <= 1, "augment.width_shift_range",
         "[augment] width_shift_range is a fraction of the width, in [0, 1]"),
        (0 <= a.height_shift_range <= 1, "augment.height_shift_range",
         "[augment] height_shift_range is a fraction of the height, in [0, 1]"),
        (0 <= a.zoom_range < 1, "augment.zoom_range", "[augment] zoom_range must be in [0, 1)"),
        (a.interpolation_order in (0, 1), "augment.interpolation_order",
         "[augment] interpolation_order must be 0 (nearest) or 1 (bilinear)"),
        (0 <= a.random_erasing <= 1, "augment.random_erasing",
         "[augment] random_erasing is a probability in [0, 1]"),
        (0 < a.erasing_area[0] <= a.erasing_area[1] <= 1, "augment.erasing_area",
         "[augment] erasing_area must be [low, high] with 0 < low <= high <= 1"),
        (0 < a.erasing_aspect[0] <= a.erasing_aspect[1], "augment.erasing_aspect",
         "[augment] erasing_aspect must be [low, high] with 0 < low <= high"),
        (c.min_delta >= 0, "checkpoint.min_delta", "[checkpoint] min_delta must be >= 0"),
    ]
