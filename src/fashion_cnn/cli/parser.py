"""The argument parser of `fashion-cnn`: one sub-command per library function."""

from __future__ import annotations

import argparse

from ..apps.environment import version_line
from ..training.config import CHOICES
from . import commands


def _add_dataset_options(p) -> None:
    p.add_argument("--dataset", metavar="NAME_OR_PATH",
                   help="fashion-mnist (default), a folder of images with one subfolder per "
                        "class (optionally under train/ and test/), a folder of MNIST-style "
                        "IDX files, or an .npz file")
    p.add_argument("--strict", action="store_true", default=None,
                   help="refuse an image folder holding a file that cannot be read "
                        "(default: skip it with a warning naming it)")


def _add_device_option(p, what: str) -> None:
    p.add_argument("--device", metavar="DEVICE",
                   help=f"{what}: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")


RECIPE_HELP = ("zoo model, recipe, or path to a .toml spec/recipe/config "
               "(`fashion-cnn models` lists them)")
RUN_DIR_HELP = "a run directory (as `train` writes it)"


class RecipeHelp(argparse.Action):
    """-h/--help of `train`: after a recipe (`train fast --help`), each training option's help
    ends with the value that recipe gives it (`--show-config` shows what a run here would use:
    a precision this machine lacks, for one, settled to fp32)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..errors import UserError
        from ..training.recipes import load_config

        name = getattr(namespace, "model", None)
        try:
            config = load_config(name) if name else None
        except UserError:
            config = None  # not a recipe (yet): the general help
        if config is not None:
            for action in parser._actions:
                setting = commands.TRAIN_FLAGS.get(action.dest)
                if setting:
                    section, key = setting.split(".")
                    value = getattr(getattr(config, section), key)
                    shown = "(default)" if value in ("", None) else repr(value)
                    action.help = f"{action.help or ''} [{name}: {shown}]".lstrip()
            parser.description = (f"Settings marked [{name}: ...] are the recipe's; each "
                                  f"option overrides it. `--show-config` prints all of them.")
        parser.print_help()
        parser.exit()


def _add_tensorboard_option(p, where: str) -> None:
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help=f"log for TensorBoard ({where}); view with `tensorboard --logdir DIR`")
    p.add_argument("--tensorboard-dir", metavar="DIR",
                   help="log for TensorBoard into DIR instead (implies --tensorboard)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (default: the recipe's; `train RECIPE --help` shows "
                             "them)")
    g.add_argument("--epochs", type=int, help="passes over the training split")
    g.add_argument("--batch-size", type=int, help="images per step")
    g.add_argument("--lr", type=float, help="learning rate (the peak, with a schedule)")
    g.add_argument("--seed", type=int, help="seed for init, shuffling, dropout, augmentation")
    g.add_argument("--optimizer", choices=CHOICES[("train", "optimizer")])
    g.add_argument("--weight-decay", type=float,
                   help="decoupled weight decay (AdamW-style; not a Keras kernel regularizer)")
    g.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing")
    g.add_argument("--precision", choices=CHOICES[("train", "precision")],
                   help="autocast precision: bf16 needs fast bf16 (an AVX-512 CPU, or a GPU "
                        "of compute capability 8.0+), fp16 a GPU")
    _add_device_option(g, "where to train")
    g.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="on the CPU, the C kernels and CPU speed paths")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA, deterministic algorithms (slower)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (compile time is reported apart)")
    g.add_argument("--threads", type=int, help="CPU threads (0: one per core, fewer while other "
                   "processes keep cores busy)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="turn the recipe's augmentation on or off")
    d = p.add_argument_group("data")
    _add_dataset_options(d)
    d.add_argument("--subset", type=int, help="use the first N training images (0: all)")
    d.add_argument("--validation-split", type=float,
                   help="last fraction of the training images held out for validation")
    d.add_argument("--data-dir", help="directory of the four IDX files")
    c = p.add_argument_group("checkpoints and early stopping")
    c.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (0 = none)")
    c.add_argument("--checkpoint-name", help='checkpoint name pattern, e.g. "model1_{epoch}"')
    c.add_argument("--save-best-only", action=argparse.BooleanOptionalAction, default=None,
                   help="write a checkpoint only when --monitor improves")
    c.add_argument("--monitor", choices=CHOICES[("checkpoint", "monitor")],
                   help="the figure that ranks epochs")
    c.add_argument("--keep-last", type=int, help="keep only the newest K epoch checkpoints")
    c.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after this many epochs without improvement (0 = off)")
    c.add_argument("--min-delta", type=float, help="the smallest change that counts as one")
    c.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=None,
                   help="end with the best epoch's weights")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config setting, e.g. --set augment.rotation_range=5")


def _data_commands(sub) -> None:
    p = sub.add_parser("data", help="find, verify and cache a dataset; print class counts")
    _add_dataset_options(p)
    p.add_argument("--data-dir", help="directory of Fashion-MNIST's four IDX files")
    p.add_argument("--download", action="store_true", help="fetch from the official mirror first")
    p.add_argument("--no-checksum", action="store_true",
                   help="skip the MD5 and count checks (your own IDX files)")
    p.set_defaults(func=commands.cmd_data)

    p = sub.add_parser("models", help="list the model zoo and the recipes")
    p.set_defaults(func=commands.cmd_models)

    p = sub.add_parser("summary", help="print a Keras-style summary of a model or recipe")
    p.add_argument("model", help="zoo model, recipe, or path to a .toml spec")
    p.add_argument("--dataset", metavar="NAME_OR_PATH",
                   help="show the model as adapted to this dataset's images and classes")
    p.set_defaults(func=commands.cmd_summary)


def _training_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model or recipe into a run directory",
                       add_help=False)
    p.add_argument("-h", "--help", action=RecipeHelp,
                   help="show this help (after a recipe: with its values) and exit")
    p.add_argument("model", metavar="RECIPE", help=RECIPE_HELP)
    p.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run (options must match)")
    p.add_argument("--show-config", action="store_true",
                   help="print the fully resolved config.toml this run would write, and exit "
                        "without training")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    _add_tensorboard_option(p, "into RUN_DIR/tensorboard")
    _add_train_options(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("resume", help="continue a run from its newest intact checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--epochs", type=int, help="extend the run to this many epochs")
    _add_device_option(p, "where to continue (default: the run's own)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    _add_tensorboard_option(p, "default: as the run's [log] says; into RUN_DIR/tensorboard")
    p.set_defaults(func=commands.cmd_resume)

    from ..apps.tune import list_searches

    p = sub.add_parser("tune", help="search a recipe's settings with Optuna, judged on validation")
    p.add_argument("space", help="built-in search space (one of: " + ", ".join(list_searches())
                                 + ") or path to a search .toml")
    p.add_argument("--trials", type=int, help="trials to run (this process)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="start no trial after this many seconds")
    p.add_argument("--out", help="folder for trials.csv, best.toml, space.toml "
                                 "(default runs/tune-<space>-<time>)")
    p.add_argument("--storage", metavar="FILE",
                   help="Optuna journal file (or an RDB URL) shared by several processes "
                        "working on one study; default: in memory")
    p.add_argument("--study-name", help="default: the space's name")
    p.add_argument("--seed", type=int, help="the sampler's seed (default 0; with --storage, "
                                            "each process draws its own)")
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    p.add_argument("--threads", type=int, help="CPU threads per trial")
    _add_device_option(p, "where to train the trials")
    p.add_argument("--subset", type=int, help="use the first N training images")
    _add_dataset_options(p)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="fix a setting for every trial, e.g. --set train.epochs=3")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    _add_tensorboard_option(p, "one sub-run per trial, into OUT/tensorboard")
    p.set_defaults(func=commands.cmd_tune)


def _run_commands(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as ONNX (checked with onnxruntime)")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", help="the .onnx file (default RUN_DIR/model.onnx)")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison with PyTorch in onnxruntime")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("import-keras", help="import a Keras model file (.keras, .h5) as a run")
    p.add_argument("file", metavar="FILE",
                   help="a Keras 3 .keras or Keras 2 .h5 model (as ModelCheckpoint writes), or "
                        "with --weights-only a .weights.h5")
    p.add_argument("--out", help="run directory (default runs/<name>-keras-<time>)")
    p.add_argument("--weights-only", action="store_true",
                   help="FILE holds weights only; --model gives the architecture")
    p.add_argument("--model", metavar="SPEC", help="zoo model or spec .toml (with --weights-only)")
    p.add_argument("--name", help="the model's name (default: the Keras model's)")
    p.add_argument("--recipe", help="training settings for fine-tuning with resume "
                                    "(default: Keras' defaults)")
    _add_dataset_options(p)
    p.add_argument("--data-dir", help="directory of Fashion-MNIST's IDX files")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=0.0001")
    p.set_defaults(func=commands.cmd_import_keras)


def _evaluate_and_predict_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="reload a run and evaluate it on the test set")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_device_option(p, "where to compute (default: the run's own, or the CPU)")
    p.add_argument("--tta", choices=CHOICES[("train", "tta")], default=None,
                   help="test-time augmentation: average the logits of the image and its four "
                        "one-pixel shifts (shift) or its mirror image (flip; for models trained "
                        "with horizontal_flip); default: the run's own [train] tta")
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files with a run")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG, JPEG, WebP, ... files; for a Fashion-MNIST run, photos are trimmed, "
                        "resized to 28x28 and made a light garment on black, as Fashion-MNIST's "
                        "images were; for another dataset, brought to its size as its images were")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    p.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    _add_device_option(p, "where to compute (default: the run's own, or the CPU)")
    from ..apps.predict import INVERT_CHOICES

    p.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                   help="negate the image: auto (default) where its border is light, as a "
                        "photo on a white background")
    p.add_argument("--tta", choices=CHOICES[("train", "tta")], default=None,
                   help="test-time augmentation (default: the run's own)")
    p.add_argument("--save-inputs", metavar="DIR",
                   help="also write each 28x28 model input as a PNG here (what the model saw)")
    p.add_argument("--explain", metavar="DIR",
                   help="also write, per image, the model input with its Grad-CAM heatmap "
                        "(SmoothGrad saliency for a model without Conv2D) and the heatmap "
                        "drawn back onto the photo")
    p.add_argument("--layer", type=int, metavar="N",
                   help="the Conv2D layer Grad-CAM explains, counted from 0 (negative: from "
                        "the end; default: the last)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=commands.cmd_predict)


def _serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a run as a web page and a JSON API (predictions, "
                                     "Grad-CAM, its figures)")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other "
                        "makes the model reachable from others, without authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    _add_device_option(p, "where to compute (default: the run's own, or the CPU)")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: half the "
                                               "cores, 1 to 4)")
    g = p.add_argument_group("limits (each request)")
    g.add_argument("--max-file-mb", type=float, default=10.0,
                   help="size of one uploaded file, in MiB (default 10)")
    g.add_argument("--max-files", type=int, default=16, help="images per request (default 16)")
    g.add_argument("--max-pixels", type=int,
                   help="width x height of one image, checked before decoding (default: the "
                        "image pixel budget, docs/limits.md)")
    g.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="from a request's start to its answer (default 30)")
    g.add_argument("--max-connections", type=int, default=128,
                   help="concurrent connections; more are answered 503 (default 128)")
    p.set_defaults(func=commands.cmd_serve)


def _figure_commands(sub) -> None:
    p = sub.add_parser("augment-preview", help="grid of original vs augmented training images")
    p.add_argument("recipe", metavar="RECIPE",
                   help="a recipe or config whose [augment] settings to show (on or off)")
    p.add_argument("--out", default="augment-preview.png",
                   help="the .png file, or a folder for augment_preview.png "
                        "(default augment-preview.png)")
    p.add_argument("-n", type=int, default=8, help="images to show (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws "
                                                       "(default 0)")
    p.set_defaults(func=commands.cmd_augment_preview)

    p = sub.add_parser("plots", help="regenerate a run's figures from its weights or a checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number (figures go to "
                                        "RUN_DIR/plots/<checkpoint>/)")
    p.add_argument("--out", help="write into this folder instead")
    _add_device_option(p, "where to compute (default: the run's own, or the CPU)")
    p.set_defaults(func=commands.cmd_plots)

    p = sub.add_parser("compare", help="overlaid learning curves and weight histograms of runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the runs to compare")
    p.add_argument("--out", required=True, help="folder for learning_curves.png and weights.png")
    p.set_defaults(func=commands.cmd_compare)

    from ..analysis.study import list_studies

    p = sub.add_parser("study", help="train every run of a study, then write its report")
    p.add_argument("study", help="built-in study (one of: " + ", ".join(list_studies())
                                 + ") or path to a study .toml")
    p.add_argument("--out", help="study directory (default studies/<name>); rerunning the same "
                                 "command skips finished runs and resumes interrupted ones")
    p.add_argument("--epochs-scale", type=float, metavar="F",
                   help="each recipe's epochs x F, rounded, at least 1 (quick versions)")
    p.add_argument("--subset", type=int, metavar="N", help="use the first N training images")
    p.add_argument("--repeats", type=int, metavar="K", help="train each run with seeds 0..K-1")
    p.add_argument("--dataset", metavar="NAME_OR_PATH",
                   help="train every run on this dataset (as --dataset of train)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    p.add_argument("--in-process", action="store_true",
                   help="train every run in this process (default: each run in a process of "
                        "its own, with its own memory peak)")
    _add_tensorboard_option(p, "one sub-run per run, each into its RUN_DIR/tensorboard; "
                               "with --tensorboard-dir DIR, into DIR/<run>")
    p.set_defaults(func=commands.cmd_study)

    p = sub.add_parser("report", help="rewrite a study's report.html and report.md from its runs")
    p.add_argument("study_dir", metavar="STUDY_DIR", help="a study directory (as `study` "
                                                          "writes it)")
    p.set_defaults(func=commands.cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashion-cnn",
        description="Train, study and use small CNN image classifiers: Fashion-MNIST or your "
                    "own images (Keras vocabulary, PyTorch).")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(sub)
    _training_commands(sub)
    _evaluate_and_predict_commands(sub)
    _run_commands(sub)
    _figure_commands(sub)
    _serve_command(sub)
    p = sub.add_parser("env", help="print versions, devices, precisions, C kernels and data "
                                   "directory (for a bug report)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=commands.cmd_env)
    return parser
