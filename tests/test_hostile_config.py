"""Hostile configs, specs, --set overrides and search spaces (issue 24): each is accepted or
refused with a UserError in one line, in bounded memory; never another exception.

The Hypothesis suites run the profile tests/conftest.py loads ("ci" by default;
HYPOTHESIS_PROFILE=long runs many more examples by hand). Nothing here measures time:
"refused before allocating" is shown by memory (tracemalloc's peaks, a capped process).
"""

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tomllib
import tracemalloc

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from fashion_cnn.apps import tune as search
from fashion_cnn.apps import tune_storage
from fashion_cnn.catalog import ZOO
from fashion_cnn.cli import main
from fashion_cnn.errors import SpecError, UserError
from fashion_cnn.fileio import read_toml
from fashion_cnn.models import args as layer_args
from fashion_cnn.models.build import build_model
from fashion_cnn.models.layers import REGISTRY
from fashion_cnn.models.spec import (MEMORY_BUDGET_ENV, check_memory, memory_budget,
                                     memory_estimate, parse_spec, summary)
from fashion_cnn.models.zoo import get_model_spec, list_models
from fashion_cnn.training.config import CHOICES, SECTIONS, RunConfig, config_from_data, to_toml
from fashion_cnn.training.recipes import list_recipes, load_config, resolve_config

# Floats without subnormals: a training run in this process (another test) turns on flushing
# denormals to zero (perf.configure_runtime), after which Hypothesis cannot draw them.
def floats(*args, **kwargs):
    return st.floats(*args, allow_subnormal=False, **kwargs)


KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
WORDS = ["fp32", "bf16", "adam", "sgd", "nearest", "val_loss", "epoch_{epoch}", "e{epoch:02d}",
         "{", "auto", "cpu", "cuda:7", "fashion-mnist", "none", "", "../x", "a\nb"]

# Any text, characters above U+FFFF and control characters included
TEXT = st.characters()
# Integers of more than 4300 decimal digits: repr() and str() refuse them (a TOML hex literal
# or Python code makes them; a decimal literal that long fails to parse). Built by a function,
# as Hypothesis writes out the elements of sampled_from.
UNWRITABLE = st.integers(0, 3).map(lambda k: (-1) ** k * 2 ** (15_000 + k))
scalars = st.one_of(
    st.booleans(), st.integers(-3, 300), st.integers(-2**70, 2**70),
    floats(allow_nan=True, allow_infinity=True), floats(0, 1), st.text(TEXT, max_size=12),
    st.sampled_from(WORDS), UNWRITABLE)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


def expect_user_error(call):
    """call() or its UserError (one line); any other exception fails the test."""
    try:
        result = call()
    except UserError as exc:
        assert one_line(str(exc)), str(exc)
        event("refused")  # the proportions show in --hypothesis-show-statistics
        return exc
    event("accepted")
    return result


def mostly(plausible, odds: int = 8):
    """`plausible`, with one chance in `odds` of any hostile value instead."""
    return st.integers(1, odds).flatmap(lambda n: plausible if n > 1 else values)


# ------------------------------------------------------------------------------ configs

def plausible_setting(section: str, key: str):
    """Values of the setting's own type and near its range, bounds included."""
    default = getattr(SECTIONS[section](), key)
    if (section, key) in CHOICES:
        return st.sampled_from(CHOICES[section, key])
    if key == "device":
        return st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "mps", "tpu"])
    if key in ("mean", "std"):
        return st.lists(floats(0.01, 1), max_size=1)
    if key == "class_names":
        return st.lists(st.text(TEXT, min_size=1, max_size=5), max_size=3)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-1, 70) | st.sampled_from([100_000, 100_001, 65_536, 1024, 1025, 2**53])
    if isinstance(default, float):
        return floats(0, 1) | floats(-1, 400)
    if isinstance(default, list):
        return st.lists(floats(0, 4), min_size=2, max_size=2)
    return st.sampled_from([default, "epoch_{epoch}", "m_{epoch:03d}", "x"])


@st.composite
def section_tables(draw, section):
    keys = draw(st.lists(mostly(st.sampled_from(KEYS[section]), 12), max_size=4))
    return {key: draw(mostly(plausible_setting(section, key)) if key in KEYS[section]
                      else values) for key in keys if isinstance(key, str)}


@st.composite
def raw_configs(draw):
    raw = {"model": draw(mostly(st.sampled_from(["model1", "dense"]), 12))}
    for section in SECTIONS:
        if draw(st.booleans()):
            raw[section] = draw(mostly(section_tables(section), 12))
    if draw(st.integers(0, 3)) == 0:
        raw[draw(st.sampled_from(["recipe", "description", "module", "x"]))] = draw(
            st.sampled_from(["mine", "../x", ""]) | values)
    return raw


def dotted_overrides():
    """{"section.key": value}: mostly known settings with plausible values."""
    pairs = [(section, key) for section, keys in KEYS.items() for key in keys]
    known = st.sampled_from(pairs).flatmap(
        lambda pair: st.tuples(st.just(".".join(pair)), mostly(plausible_setting(*pair))))
    hostile = st.tuples(st.text(max_size=12), values)
    return st.lists(st.integers(1, 12).flatmap(lambda n: known if n > 1 else hostile),
                    max_size=4).map(dict)


@given(raw_configs())
def test_any_config_data_is_accepted_or_refused_in_one_line(raw):
    cfg = expect_user_error(lambda: config_from_data(raw, "hostile.toml", get_model_spec))
    if isinstance(cfg, UserError):
        return
    # accepted: within the bounds, and config.toml reads back as the same config
    assert 1 <= cfg.train.epochs <= 100_000 and 0 <= cfg.train.threads <= 1024
    assert 0 <= cfg.train.seed < 2**53 and 1 <= cfg.train.batch_size <= 65_536
    again = config_from_data(tomllib.loads(to_toml(cfg)), "config.toml", get_model_spec)
    assert again.to_data() == cfg.to_data()


@given(dotted_overrides())
def test_any_overrides_are_accepted_or_refused_in_one_line(overrides):
    expect_user_error(lambda: resolve_config("dense", **overrides))


def huge_integer_literals():
    """TOML integers around the 4300 decimal digits Python converts at most, and hexadecimal
    ones (which Python converts at any length) of thousands of digits."""
    return (st.integers(4290, 4400).map(lambda n: "1" * n)
            | st.integers(1000, 4000).map(lambda n: "0x" + "f" * n))


SETTINGS = [(section, key) for section, keys in KEYS.items() for key in keys]


@st.composite
def settings_with_huge_integers(draw):
    """A recipe that sets one setting to a huge integer literal."""
    section, key = draw(st.sampled_from(SETTINGS))
    return f'model = "dense"\n[{section}]\n{key} = {draw(huge_integer_literals())}\n'


@given(st.text(max_size=200) | st.text(alphabet='[]{}=.,"\'#\n model=dense_1e9-', max_size=200)
       | st.text(max_size=100).map(lambda tail: 'model = "dense"\n' + tail)
       | settings_with_huge_integers())
def test_any_toml_text_is_read_or_refused_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("toml") / "any.toml"
    path.write_text(text)
    expect_user_error(lambda: load_config(str(path)))


RECIPE_TEXT = (ZOO / "recipes" / "seed-model2.toml").read_text()


@given(st.lists(st.tuples(st.integers(0, len(RECIPE_TEXT)), st.integers(0, 3),
                          st.text(max_size=4)), min_size=1, max_size=4))
def test_mutations_of_a_recipe_are_read_or_refused_in_one_line(tmp_path_factory, edits):
    text = RECIPE_TEXT
    for at, cut, insert in edits:  # delete `cut` characters at `at` and insert `insert`
        text = text[:at] + insert + text[at + cut:]
    path = tmp_path_factory.mktemp("recipe") / "mutated.toml"
    path.write_text(text)
    expect_user_error(lambda: load_config(str(path)))


# ------------------------------------------------------------------------------ specs

PLAUSIBLE = {
    "posint": st.integers(1, 48),
    "rate": floats(0, 0.99),
    "posfloat": floats(1e-5, 1.0),
    "bool": st.booleans(),
    "pair": st.integers(1, 4) | st.lists(st.integers(1, 4), min_size=2, max_size=2),
    "activation": st.sampled_from(sorted(a for a in layer_args.ACTIVATIONS if a)),
    "padding": st.sampled_from(["valid", "same"]),
    "initializer": st.sampled_from(sorted(layer_args.INITIALIZERS)),
    "regularizer": st.sampled_from(["l2", "l1(0.01)", "l1_l2(l1=0.1, l2=0.2)", "none"])
    | floats(0, 1).map(lambda f: f"l2({f!r})"),
    "pad2d": st.integers(0, 2) | st.lists(st.integers(0, 2), min_size=2, max_size=2),
}


IMAGE_LAYERS = ["Conv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D", "Dropout",
                "SpatialDropout2D", "BatchNormalization", "Activation", "ZeroPadding2D",
                "Residual"]
FLAT_LAYERS = ["Dense", "Dropout", "BatchNormalization", "Activation"]


@st.composite
def layer_tables(draw, kinds, depth=0):
    """One [[layers]] table: a type of `kinds` with plausible arguments, now and then a
    hostile type, argument or value."""
    kinds = [k for k in kinds if depth < 2 or k != "Residual"]
    kind = draw(mostly(st.sampled_from(kinds), 30))
    table = {"type": kind}
    schema = REGISTRY[kind].args if isinstance(kind, str) and kind in REGISTRY else {}
    for key, (default, arg_kind) in schema.items():
        if default is not layer_args.REQUIRED and draw(st.booleans()):
            continue  # left to its default
        if arg_kind == "layers":
            table[key] = draw(mostly(st.lists(layer_tables(IMAGE_LAYERS, depth + 1),
                                              min_size=1, max_size=3), 30))
        else:
            table[key] = draw(mostly(PLAUSIBLE[arg_kind], 30))
    if draw(st.integers(0, 30)) == 0:
        table[draw(st.text(max_size=6))] = draw(values)
    return table


@st.composite
def raw_specs(draw):
    """Image layers, a Flatten or global pooling, flat layers and class scores, in order
    (now and then shuffled or cut short), on a plausible input."""
    layers = (draw(st.lists(layer_tables(IMAGE_LAYERS), max_size=4))
              + [{"type": draw(st.sampled_from(["Flatten", "GlobalAveragePooling2D"]))}]
              + draw(st.lists(layer_tables(FLAT_LAYERS), max_size=2)))
    if draw(st.integers(0, 5)):  # most specs end in class scores
        layers.append({"type": "Dense", "units": draw(st.integers(2, 10))})
    if draw(st.integers(0, 10)) == 0:
        layers = draw(st.permutations(layers))
    side = draw(st.integers(6, 32))
    raw = {"name": draw(mostly(st.just("hostile"), 20)),
           "input_shape": draw(mostly(st.just([side, side, draw(st.sampled_from([1, 3]))]), 20)),
           "layers": layers}
    if draw(st.integers(0, 20)) == 0:
        raw[draw(st.text(max_size=6))] = draw(values)
    return raw


SMALL_MODEL_BYTES = 64 * 2**20  # what a test may build: parameters and a batch of two


@given(raw_specs())
def test_any_spec_is_accepted_or_refused_in_one_line(raw):
    spec = expect_user_error(lambda: parse_spec(raw, "hostile"))
    if isinstance(spec, UserError):
        return
    # accepted: it prints, its data parses back to the same spec, and (where small enough
    # to build here) the model builds and maps a batch to one finite score per class
    assert summary(spec).startswith(f'Model: "{spec.name}"')
    assert parse_spec(spec.to_data()).to_data() == spec.to_data()
    if memory_estimate(spec, 2, 2).total_bytes > SMALL_MODEL_BYTES:
        event("accepted, too large to build here")
        return
    height, width, channels = spec.input_shape
    with torch.no_grad():
        out = build_model(spec, seed=0).eval()(torch.zeros(2, channels, height, width))
    assert out.shape == (2, spec.num_classes) and bool(torch.isfinite(out).all())


@given(st.text(alphabet="l12_()=,.eE-+ 0123456789x", max_size=40) | st.text(max_size=40))
def test_any_regularizer_text_is_parsed_or_refused(text):
    try:
        reg = layer_args.parse_regularizer(text)
    except ValueError as exc:
        assert one_line(str(exc))
        return
    assert reg is None or (reg.l1 >= 0 and reg.l2 >= 0 and math.isfinite(reg.l1 + reg.l2))


@given(st.sampled_from(sorted({kind for t in REGISTRY.values() for _, kind in t.args.values()})),
       values)
def test_any_argument_value_is_coerced_or_refused(kind, value):
    try:
        layer_args.coerce(kind, value)
    except ValueError as exc:
        assert one_line(str(exc))


# ------------------------------------------------------------------------------ search spaces

# setting -> (type, lowest, highest) of a sensible search over it
SEARCHABLE = {"train.lr": ("float", 1e-4, 0.5), "train.batch_size": ("int", 8, 128),
              "train.epochs": ("int", 1, 4), "augment.zoom_range": ("float", 0.0, 0.3),
              "data.validation_split": ("float", 0.05, 0.3), "train.threads": ("int", 1, 2)}


@st.composite
def param_tables(draw, key):
    """A [params."key"] table: a plausible search over the setting, now and then hostile."""
    kind, lowest, highest = SEARCHABLE.get(key, ("float", 0.0, 1.0))
    number = st.integers(lowest, highest) if kind == "int" else floats(lowest, highest)
    if draw(st.integers(0, 3)) == 0:
        return {"type": "categorical",
                "choices": draw(mostly(st.lists(mostly(number, 20), min_size=1, max_size=3), 20))}
    low, high = sorted([draw(number), draw(number)])
    table = {"type": draw(mostly(st.just(kind), 20)), "low": draw(mostly(st.just(low), 20)),
             "high": draw(mostly(st.just(high), 20))}
    if draw(st.integers(0, 3)) == 0:
        table["log"] = draw(mostly(st.booleans(), 20))
    if draw(st.integers(0, 3)) == 0:
        table["step"] = draw(mostly(st.just(1) if kind == "int" else floats(0.001, 0.1), 20))
    if draw(st.integers(0, 20)) == 0:
        table[draw(st.text(max_size=6))] = draw(values)
    return table


@st.composite
def raw_spaces(draw):
    keys = st.sampled_from(sorted(SEARCHABLE))
    hostile_keys = st.sampled_from(["model.name", "nosuch.x", "lr", "train.lrate"]) | st.text(
        max_size=8)
    searched = draw(st.lists(st.integers(1, 12).flatmap(lambda n: keys if n > 1 else hostile_keys),
                             min_size=1, max_size=3, unique=True))
    raw = {"recipe": draw(mostly(st.sampled_from(["dense", "model1"]), 20)),
           "params": {key: draw(mostly(param_tables(key), 20)) for key in searched}}
    if draw(st.booleans()):
        raw["set"] = {"train.epochs": draw(mostly(st.integers(1, 3), 12))}
    for key in ("objective", "description", "extra"):
        if draw(st.integers(0, 8)) == 0:
            raw[key] = draw(st.sampled_from(["val_loss", "val_accuracy", "test_accuracy"])
                            | values)
    return raw


@given(raw_spaces())
def test_any_search_space_is_accepted_or_refused_in_one_line(raw):
    optuna = pytest.importorskip("optuna")

    def check():
        space = search.parse_space(raw, "hostile", "hostile.toml")
        search.check_space(space)
        return space, search.distributions(optuna, space)

    accepted = expect_user_error(check)
    if isinstance(accepted, UserError):
        return
    # accepted: what a trial samples is a valid config
    space, distributions = accepted
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(distributions)
    resolve_config(space.recipe, **space.fixed, **trial.params)


# ------------------------------------------------------------------------------ each class

@pytest.mark.parametrize("overrides,fragment", [
    ({"train.epochs": 1e20}, "[train] epochs: expected an integer, got 1e+20"),
    ({"train.epochs": 10**20}, "[train] epochs must be at most 100000"),
    ({"train.batch_size": 10**6}, "[train] batch_size must be at most 65536"),
    ({"train.eval_batch_size": 0}, "[train] eval_batch_size must be at least 1"),
    ({"train.threads": 10**6}, "[train] threads must be at most 1024"),
    ({"train.seed": 2**64}, "[train] seed must be at most 2**53 - 1"),
    ({"train.seed": -1}, "[train] seed must be at least 0"),
    ({"data.split_seed": -1}, "[data] split_seed must be at least 0"),
    ({"train.lr": math.nan}, "[train] lr: must be finite"),
    ({"train.lr": 10**400}, "[train] lr: must be finite"),
    ({"train.beta_2": 1.0}, "[train] beta_2 must be in [0, 1)"),
    ({"data.subset": 10**12}, "[data] subset must be at most 1000000000"),
    ({"data.subset": 1}, "[data] subset must be 0 (all) or at least 2"),
    ({"data.pad": -2}, "[data] pad must be -1 (automatic) or at least 0"),
    ({"data.image_size": 10**5}, "[data] image_size must be at most 4096"),
    ({"augment.erasing_aspect": [0, 1]}, "erasing_aspect must be [low, high] with 0 < low"),
    ({"augment.erasing_area": [math.inf, 1]}, "expected a pair of finite numbers"),
    ({"checkpoint.filename": "x" * 300 + "{epoch}"}, "at most 160 characters"),
    ({"data.dataset": "a\x00b"}, "must not contain a NUL character"),
])
def test_numeric_and_string_bounds_are_one_line_naming_the_setting(overrides, fragment):
    with pytest.raises(SpecError) as caught:
        resolve_config("dense", **overrides)
    assert fragment in str(caught.value) and one_line(str(caught.value))
    assert caught.value.setting == next(iter(overrides))


def test_text_that_config_toml_cannot_hold_is_refused():
    with pytest.raises(SpecError, match=r"\[data\] dataset: not valid Unicode text"):
        resolve_config("dense", **{"data.dataset": "caf\udce9"})  # a Latin-1 name, decoded
    with pytest.raises(SpecError, match="class_names must be valid Unicode text"):
        resolve_config("dense", **{"data.class_names": ["a", "caf\udce9"]})


def test_a_config_with_any_unicode_reads_back():
    cfg = resolve_config("dense", **{"data.class_names": ["shirt \U0001F455", "sh\x7foe"]})
    again = config_from_data(tomllib.loads(to_toml(cfg)), "config.toml", get_model_spec)
    assert again.data.class_names == cfg.data.class_names


def test_keras_epoch_formats_pass_the_validator():
    cfg = resolve_config("dense", **{"checkpoint.filename": "model1_{epoch:02d}"})
    assert cfg.checkpoint.filename == "model1_{epoch:02d}"


@pytest.mark.parametrize("key", ["model.name", "recipe.x", "module.params", ".epochs", "nosuch.x"])
def test_unknown_sections_name_the_valid_ones(key):
    with pytest.raises(SpecError, match="unknown section .*; sections: data, augment, train, "
                                        "checkpoint, log$"):
        resolve_config("dense", **{key: 1})


def test_unknown_keys_name_the_valid_ones():
    with pytest.raises(SpecError, match=r"\[train\] unknown setting 'lrate'; known: batch_size"):
        resolve_config("dense", **{"train.lrate": 1})
    with pytest.raises(SpecError, match="unknown setting 'lrate'; name a setting as section.key"):
        resolve_config("dense", lrate=1)


def test_overrides_leave_the_given_config_as_it_was():
    base = load_config("dense")
    resolve_config(base, **{"train.epochs": 3})
    assert base.train.epochs == load_config("dense").train.epochs


@pytest.mark.parametrize("text", ["a = " + "[" * 3000 + "]" * 3000,
                                  "a = " + "{b=" * 3000 + "1" + "}" * 3000,
                                  "[" + ".".join(["t"] * 3000) + "]\n"])
def test_deeply_nested_toml_is_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        read_toml(path)
    assert str(caught.value) == f"{path}: tables or arrays nested more than 64 deep"


def test_special_and_huge_toml_files_are_refused_unread(tmp_path):
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(SpecError, match="is a named pipe"):
        load_config(str(fifo))
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * (1 << 20))
    with pytest.raises(SpecError, match="larger than 8 MiB"):
        read_toml(big)


class CountingPattern:
    """A regex stand-in that counts the characters given to fullmatch: the parser's work."""

    def __init__(self, pattern):
        self.pattern, self.characters = pattern, 0

    def fullmatch(self, text):
        self.characters += len(text)
        return self.pattern.fullmatch(text)


def test_the_regularizer_parser_refuses_long_text_unparsed_and_reads_each_number_once(
        monkeypatch):
    numbers = CountingPattern(layer_args._NUMBER)
    monkeypatch.setattr(layer_args, "_NUMBER", numbers)
    for text in ["l2" + " " * 32_000 + "x", "l2(" + "1" * 32_000 + "x)",
                 "l1_l2(" + "l1=1," * 6_400 + ")"]:
        with pytest.raises(ValueError, match=r"\(\d+ characters\)"):
            layer_args.parse_regularizer(text)
    assert numbers.characters == 0  # refused on its length, before any parsing
    # within the limit, the number pattern (one pass: no two of its quantifiers can share a
    # character) sees each factor once: work in proportion to the text
    for text in ["l2(0.001)", "l1_l2(l1=0.01, l2=0.02)", "l2(" + "1" * 150 + ")"]:
        before = numbers.characters
        layer_args.parse_regularizer(text)
        assert numbers.characters - before <= len(text)


@pytest.mark.parametrize("layer,fragment", [
    ({"type": ["Dense"]}, "unknown layer type ['Dense']"),
    ({"type": "Dense", "units": 10, "activation": [1]}, "unknown activation [1]"),
    ({"type": "Dense", "units": 10, "kernel_initializer": {}}, "unknown initializer {}"),
    ({"type": "Dense", "units": 2**40}, "a positive integer (at most 2147483647)"),
    ({"type": "Dense", "units": 10, "kernel_regularizer": {"l2": "x"}}, "must be numbers"),
    ({"type": "Dense", "units": 10, "name": "a\nb"}, "name must be a one-line string"),
])
def test_layer_arguments_of_the_wrong_kind_are_spec_errors(layer, fragment):
    raw = {"input_shape": [4, 4, 1], "layers": [{"type": "Flatten"}, layer]}
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    assert fragment in str(caught.value) and one_line(str(caught.value))


def test_residual_nesting_is_bounded():
    layer = {"type": "Conv2D", "filters": 1, "kernel_size": 1}
    for _ in range(40):
        layer = {"type": "Residual", "layers": [layer]}
    raw = {"input_shape": [4, 4, 1], "layers": [layer, {"type": "Flatten"},
                                                {"type": "Dense", "units": 2}]}
    with pytest.raises(SpecError, match="nested more than 16 deep"):
        parse_spec(raw)


def huge(kind: str) -> dict:
    big = ({"type": "Dense", "units": 10**9} if kind == "dense" else
           {"type": "Conv2D", "filters": 10**7, "kernel_size": 3})
    return {"name": f"huge-{kind}", "input_shape": [28, 28, 1],
            "layers": [{"type": "Flatten"}, big] if kind == "dense" else
            [big, {"type": "GlobalAveragePooling2D"}, {"type": "Dense", "units": 10}]}


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_huge_spec_is_data_and_its_model_is_refused_before_anything_is_allocated(kind):
    tracemalloc.start()
    try:
        spec = parse_spec(huge(kind))  # a spec is data: parsing and printing it allocate little
        text = summary(spec)
        with pytest.raises(SpecError) as caught:
            check_memory(spec, 32, 256)  # what the Trainer asks before building the model
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    # the parameters come from the shapes by arithmetic (28 * 28 inputs, 10**9 units)
    assert spec.total_params == (785 * 10**9 if kind == "dense" else 2 * 10**8 + 10)
    assert f"Total params: {spec.total_params:,}" in text
    message = str(caught.value)
    assert one_line(message) and "model 'huge-" in message and "to train on batches of 32" in message
    assert "more than the memory budget" in message and MEMORY_BUDGET_ENV in message


def test_the_memory_budget_counts_the_batch_and_can_be_raised(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0.5")
    assert memory_budget()[0] == 500_000_000
    spec = get_model_spec("model1")
    check_memory(spec, 128, 256)  # about 60 MB
    with pytest.raises(SpecError, match="to train on batches of 65536"):
        check_memory(spec, 65536, 256)
    check_memory(spec, eval_batch_size=256, training=False)  # evaluating needs far less
    with pytest.raises(SpecError, match="to evaluate on batches of 65536"):
        check_memory(spec, eval_batch_size=65536, training=False)
    resolve_config("seed-model1", **{"train.batch_size": 65536})  # a config is not checked
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1000")
    check_memory(spec, 65536, 256)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(SpecError, match=f"{MEMORY_BUDGET_ENV}='lots': expected a positive"):
        check_memory(spec)


def test_every_zoo_model_and_recipe_fits_a_small_machine(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1")  # a machine of 2 GB
    for name in list_models():
        check_memory(get_model_spec(name), 32, 256)  # the defaults' batches
    for name in list_recipes():
        cfg = load_config(name)
        check_memory(cfg.model, cfg.train.batch_size, cfg.train.eval_batch_size)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of the dense model, one epoch on 200 synthetic images, and its data."""
    from conftest import make_idx_dir
    from fashion_cnn.data.fashion_mnist import load_data
    from fashion_cnn.training.run import train

    root = tmp_path_factory.mktemp("tiny-run")
    data = load_data(make_idx_dir(root / "idx", n_train=200), check_md5=False)
    train("dense", root / "run", data=data, progress=False,
          **{"train.epochs": 1, "train.threads": 1})
    return root / "run", data


def test_a_run_reads_anywhere_and_its_model_is_checked_where_it_is_built(tiny_run, monkeypatch):
    from fashion_cnn.training.rundir import RunDir
    from fashion_cnn.training.reload import load_model
    from fashion_cnn.training.run import resume

    run_dir, data = tiny_run
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0.000001")  # a kilobyte: nothing fits
    cfg = RunDir(run_dir).read_config()  # the config itself holds no memory check
    assert cfg.model.name == "dense"
    with pytest.raises(SpecError) as caught:
        load_model(run_dir)
    assert "model 'dense' needs about" in str(caught.value)
    assert "to evaluate on batches of 256" in str(caught.value)
    with pytest.raises(SpecError, match="to train on batches of 32"):
        resume(run_dir, epochs=2, data=data, progress=False)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1")
    assert load_model(run_dir)[1] is not None


# ------------------------------------------------------------------------------ search spaces

SPACE = """
recipe = "dense"
[set]
"train.epochs" = 1
[params."train.lr"]
type = "float"
low = 0.001
high = 0.01
"""


def space_file(tmp_path, text=SPACE):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("param,fragment", [
    ('type = "float"\nlow = 0.1\nhigh = 0.5\nstep = 0', "step must be a positive finite number"),
    ('type = "float"\nlow = 0.1\nhigh = 0.5\nstep = -0.1', "step must be a positive"),
    ('type = "float"\nlow = 0.1\nhigh = 0.5\nstep = 1.0', "high - low (0.4) is not a multiple of step"),
    ('type = "int"\nlow = 1\nhigh = 6\nstep = 2', "high - low (5) is not a multiple of step (2)"),
    ('type = "int"\nlow = 1\nhigh = 5\nstep = 0.5', "step must be a positive integer"),
    ('type = "float"\nlow = nan\nhigh = 0.5', "low must be a finite number"),
    ('type = "float"\nlow = 0.1\nhigh = 0.5\nlog = "yes"', "log must be true or false"),
    ('type = "categorical"\nchoices = [[1, 2]]', "choices must be numbers, strings or booleans"),
    ('type = "float"\nlow = 0.1\nhigh = 0.5\nmean = 1', "unknown key 'mean' for type 'float'"),
    # a quotient of more than 28 digits, which Optuna's decimals cannot reckon
    ('type = "float"\nlow = 0\nhigh = 1e30\nstep = 1', "more digits than Optuna reckons with"),
    ('type = "int"\nlow = 1\nhigh = 2\nstep = 0x' + "f" * 4000,
     "high - low (1) is not a multiple of step (<integer of 16000 bits>)"),
    ('type = "int"\nlow = 0x' + "f" * 4000 + '\nhigh = 2', "low (<integer of 16000 bits>) must not"),
    ('type = "int"\nlow = 1\nhigh = ' + "1" * 4400, "an integer has more digits than can be read"),
])
def test_bad_distributions_are_one_line(tmp_path, param, fragment):
    text = SPACE.replace('type = "float"\nlow = 0.001\nhigh = 0.01', param)
    with pytest.raises(SpecError) as caught:
        search.load_space(space_file(tmp_path, text))
    assert fragment in str(caught.value) and one_line(str(caught.value))


@pytest.mark.parametrize("key,fragment", [
    ("model.name", "unknown section 'model'; sections: data, augment, train, checkpoint, log"),
    ("train.lrate", "unknown setting 'lrate'; known: batch_size"),
])
def test_unknown_settings_in_a_space_name_the_valid_ones(tmp_path, key, fragment):
    with pytest.raises(SpecError) as caught:
        search.load_space(space_file(tmp_path, SPACE.replace('"train.lr"', f'"{key}"')))
    assert fragment in str(caught.value) and one_line(str(caught.value))


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_tune_refuses_a_storage_file_it_did_not_make_untouched(tmp_path, capsys, monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    space = space_file(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    before = notes.stat()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for storage, fragment in [(notes, "is not an Optuna journal"), (fifo, "is a named pipe"),
                              ("nosuch://x", "storage 'nosuch://x': "),
                              (f"sqlite:///{notes}", "is not a SQLite database of Optuna"),
                              (f"sqlite:///{notes}/x.db", "storage 'sqlite:///")]:
        code, err = run_cli(["tune", space, "--trials", 1, "--storage", storage,
                             "--out", tmp_path / "out"], capsys)
        assert code == 2 and one_line(err.strip()) and fragment in err, (storage, err)
    after = notes.stat()
    assert notes.read_text() == "my notes\n" and after.st_mtime_ns == before.st_mtime_ns
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_tune_accepts_a_journal_optuna_made(tmp_path):
    optuna = pytest.importorskip("optuna")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.journal"
    optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))))
    first = json.loads(journal.read_text().splitlines()[0])
    assert first["op_code"] == tune_storage.JOURNAL_CREATE_STUDY  # the format this check reads
    tune_storage.check_journal(journal)
    tune_storage.check_journal(tmp_path / "new.journal")
    (tmp_path / "empty.journal").write_text("")
    tune_storage.check_journal(tmp_path / "empty.journal")  # any empty file: nothing to lose


def test_tune_leaves_no_study_where_its_output_folder_cannot_be_made(tmp_path, capsys):
    pytest.importorskip("optuna")
    space = space_file(tmp_path)
    (tmp_path / "a-file").write_text("")
    journal = tmp_path / "studies" / "study.journal"
    code, err = run_cli(["tune", space, "--trials", 1, "--storage", journal,
                         "--out", tmp_path / "a-file" / "out"], capsys)
    assert code == 2 and one_line(err.strip()) and err.startswith("fashion-cnn: error: --out: ")
    assert not journal.exists() and not journal.parent.exists()


def test_tune_blames_the_space_file_or_the_option_that_set_a_bad_value(tmp_path, capsys):
    pytest.importorskip("optuna")
    space = space_file(tmp_path, SPACE.replace('"train.epochs" = 1', '"train.threads" = 5000'))
    code, err = run_cli(["tune", space, "--trials", 1, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"error: {space}: [train] threads must be at most 1024" in err, err
    code, err = run_cli(["tune", space_file(tmp_path), "--trials", 1, "--threads", 5000,
                         "--out", tmp_path / "out"], capsys)
    assert code == 2 and "error: --threads: [train] threads must be at most 1024" in err, err
    assert not (tmp_path / "out").exists()


def test_tune_arguments_are_checked(tmp_path, capsys):
    pytest.importorskip("optuna")
    space = space_file(tmp_path)
    for extra, fragment in [(["--seed", 2**40], "seed must be an integer in [0, 2**32)"),
                            (["--timeout", "nan"], "time limit must be a positive number")]:
        code, err = run_cli(["tune", space, "--trials", 1, "--out", tmp_path / "out", *extra],
                            capsys)
        assert code == 2 and one_line(err.strip()) and fragment in err, err


# ------------------------------------------------------------------------------ the CLI

@pytest.mark.parametrize("setting,fragment", [
    ("train.epochs=1e20", "[train] epochs: expected an integer, got 1e+20"),
    ("model.name=x", "unknown section 'model'"),
    ("train.lrate=1", "unknown setting 'lrate'; known: "),
    ("train.lr=[1, 2]", "[train] lr: expected a number, got [1, 2]"),
    ("train.lr=[[[", "[train] lr: expected a number, got '[[['"),
    ("train.lr=" + "[" * 3000 + "]" * 3000, "the value is nested too deep"),
    ("train.lr=0.1\n[data]\nsubset = 2", "[train] lr: expected a number"),
    ("train.threads=100000", "threads must be at most 1024"),
    ("train.epochs=" + "1" * 5000, "the value is an integer of more digits than can be read"),
    ("train.compile=0x" + "f" * 4000, "expected true or false, got <integer of 16000 bits>"),
    ("checkpoint.filename={loss:d}_{epoch}", "Unknown format code 'd'"),
])
def test_set_overrides_fail_in_one_line_before_any_run(tmp_path, monkeypatch, capsys, setting,
                                                       fragment):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "dense", "--set", setting, "--quiet"], capsys)
    assert code == 2 and one_line(err.strip()) and fragment in err, err
    assert not (tmp_path / "runs").exists()


@given(st.sampled_from(SETTINGS), huge_integer_literals() | st.text(max_size=20))
def test_any_set_value_is_taken_or_refused_in_one_line(monkeypatch, tmp_path_factory, capsys,
                                                        setting, value):
    monkeypatch.chdir(tmp_path_factory.mktemp("set"))
    # the last --set wins and is always refused (data.subset 1), so no example trains
    code, err = run_cli(["train", "dense", "--set", f"{'.'.join(setting)}={value}",
                         "--set", "data.subset=1", "--quiet"], capsys)
    assert code == 2 and one_line(err.strip()), err
    assert not os.path.exists("runs")


def test_a_bad_value_in_a_file_names_the_file_not_a_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text('model = "dense"\n[train]\nthreads = 5000\n'
                                          '[checkpoint]\nfilename = "last"\n'
                                          'save_best_only = true\n')
    code, err = run_cli(["train", "recipe.toml", "--quiet"], capsys)
    assert code == 2 and err.strip() == ("fashion-cnn: error: recipe.toml: [train] threads "
                                         "must be at most 1024")
    # given as an option, the same value names the option's flag
    code, err = run_cli(["train", "dense", "--threads", 5000, "--quiet"], capsys)
    assert code == 2 and err.strip() == ("fashion-cnn: error: --threads: [train] threads must "
                                         "be at most 1024")
    # a rule broken by an option about another setting names no flag the user did not give
    (tmp_path / "recipe.toml").write_text('model = "dense"\n[checkpoint]\nfilename = "last"\n'
                                          'save_best_only = true\n')
    code, err = run_cli(["train", "recipe.toml", "--set", "checkpoint.save_best_only=false",
                         "--quiet"], capsys)
    assert code == 2 and err.startswith("fashion-cnn: error: [checkpoint] filename must "
                                        "contain {epoch}"), err


def test_a_run_config_name_and_description_are_checked_wherever_they_come_from():
    spec = get_model_spec("dense")
    for recipe in ["keras:" + "x" * 300 + ".keras", "keras:a\nb.keras", "keras:a/b.keras"]:
        with pytest.raises(SpecError, match="recipe must be a one-line name"):
            resolve_config(RunConfig(model=spec, recipe=recipe))
    with pytest.raises(SpecError, match="description must be a string of valid Unicode text"):
        resolve_config(RunConfig(model=spec, description="from caf\udce9.keras"))


def run_capped(argv, cwd, timeout=600):
    """`fashion-cnn ARGV` in a process of at most 1 GiB of address space (`timeout` guards
    against a hang; it measures nothing)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "fashion_cnn", *argv], cwd=cwd, text=True,
                          capture_output=True, preexec_fn=cap, timeout=timeout)


# A hidden layer of 10**9 units: adapting the spec to the data's 10 classes leaves it as it is
HUGE_SPEC = """name = "huge"
input_shape = [28, 28, 1]
[[layers]]
type = "Flatten"
[[layers]]
type = "Dense"
units = 1000000000
[[layers]]
type = "Dense"
units = 10
"""


def test_summary_of_a_huge_spec_prints_it_allocating_little(tmp_path, capsys):
    (tmp_path / "huge.toml").write_text(HUGE_SPEC)
    main(["summary", "dense"])  # the command's modules imported before measuring
    capsys.readouterr()
    tracemalloc.start()
    try:
        code = main(["summary", str(tmp_path / "huge.toml")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out = capsys.readouterr().out
    assert code == 0 and "Total params: 795,000,000,010" in out  # 785e9 + 10e9 + 10
    assert peak < 16 * 2**20  # the spec is data; no weight is allocated


def test_train_on_a_huge_spec_ends_in_one_line_within_a_gibibyte(tmp_path):
    (tmp_path / "huge.toml").write_text(HUGE_SPEC)
    done = run_capped(["train", "huge.toml", "--quiet"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "model 'huge' needs about" in done.stderr and MEMORY_BUDGET_ENV in done.stderr
    assert not (tmp_path / "runs").exists()
