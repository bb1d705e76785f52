"""The command line: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

from .config import CHOICES
from .errors import TrainingStopped, UserError


def _parse_set(text: str) -> tuple[str, object]:
    """--set train.lr=0.01: the value is read as TOML (numbers, booleans, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.lr=0.01")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _train_overrides(args) -> dict:
    flag_map = {
        "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
        "seed": "train.seed", "threads": "train.threads", "precision": "train.precision",
        "optimizer": "train.optimizer", "weight_decay": "train.weight_decay",
        "label_smoothing": "train.label_smoothing", "subset": "data.subset",
        "validation_split": "data.validation_split", "data_dir": "data.data_dir",
        "augment": "augment.enabled", "checkpoint_every": "checkpoint.every",
        "checkpoint_name": "checkpoint.filename", "save_best_only": "checkpoint.save_best_only",
        "monitor": "checkpoint.monitor", "keep_last": "checkpoint.keep_last",
        "early_stopping": "checkpoint.early_stopping", "min_delta": "checkpoint.min_delta",
        "restore_best": "checkpoint.restore_best", "compile": "train.compile",
    }
    overrides = {dotted: getattr(args, flag) for flag, dotted in flag_map.items()
                 if getattr(args, flag, None) is not None}
    return {**overrides, **_set_overrides(args)}


def _set_overrides(args) -> dict:
    """The --set SECTION.KEY=VALUE options, in order (a later one wins)."""
    return dict(_parse_set(item) for item in args.set or [])


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (override the recipe)")
    g.add_argument("--epochs", type=int, help="passes over the training split")
    g.add_argument("--batch-size", type=int, help="images per step")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--seed", type=int, help="seed for init, shuffling, dropout, augmentation")
    g.add_argument("--optimizer", choices=CHOICES[("train", "optimizer")])
    g.add_argument("--weight-decay", type=float,
                   help="decoupled weight decay (AdamW-style; not a Keras kernel regularizer)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--precision", choices=CHOICES[("train", "precision")], help="bf16 uses autocast on the CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (compile time is reported apart)")
    g.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="turn the recipe's augmentation on or off")
    d = p.add_argument_group("data")
    d.add_argument("--subset", type=int, help="use the first N training images")
    d.add_argument("--validation-split", type=float, help="last fraction held out (default 0.2)")
    d.add_argument("--data-dir", help="directory of the four IDX files")
    c = p.add_argument_group("checkpoints and early stopping")
    c.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (0 = none)")
    c.add_argument("--checkpoint-name", help='checkpoint name pattern, e.g. "model1_{epoch}"')
    c.add_argument("--save-best-only", action=argparse.BooleanOptionalAction, default=None)
    c.add_argument("--monitor", choices=CHOICES[("checkpoint", "monitor")])
    c.add_argument("--keep-last", type=int, help="keep only the newest K epoch checkpoints")
    c.add_argument("--early-stopping", type=int, metavar="PATIENCE")
    c.add_argument("--min-delta", type=float)
    c.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config setting, e.g. --set augment.rotation_range=5")


def cmd_data(args) -> int:
    from .data import CLASS_NAMES, class_counts, download, timed_load

    if args.download:
        print(f"downloaded to {download()}")
    data, seconds = timed_load(args.data_dir, check_md5=not args.no_checksum)
    how = "cache" if data.from_cache else "IDX files (decoded and cached)"
    checks = "structure and MD5 verified" if data.verified_md5 else "structure verified (MD5 skipped)"
    print(f"Fashion-MNIST in {data.source}: {checks}; loaded from {how} in {seconds:.2f} s")
    train_counts, test_counts = class_counts(data.train_labels), class_counts(data.test_labels)
    print(f"{'class':<14}{'train':>8}{'test':>8}")
    for name, a, b in zip(CLASS_NAMES, train_counts, test_counts):
        print(f"{name:<14}{a:>8}{b:>8}")
    print(f"{'total':<14}{sum(train_counts):>8}{sum(test_counts):>8}")
    return 0


def cmd_models(args) -> int:
    from .zoo import get_model_spec, list_models, list_recipes, load_config

    print(f"{'model':<12}{'params':>10}  description")
    for name in list_models():
        spec = get_model_spec(name)
        print(f"{name:<12}{spec.total_params:>10,}  {spec.description}")
    print(f"\n{'recipe':<16}{'model':<12}{'epochs':>7}  description")
    for name in list_recipes():
        cfg = load_config(name)
        print(f"{name:<16}{cfg.model.name:<12}{cfg.train.epochs:>7}  {cfg.description}")
    from .zoo import list_searches, search_path
    from .config import read_toml

    print(f"\n{'search space':<16}{'recipe':<12}{'params':>7}  description (fashion-cnn tune)")
    for name in list_searches():
        raw = read_toml(search_path(name))  # as written; `tune` validates it in full
        print(f"{name:<16}{raw.get('recipe', ''):<12}{len(raw.get('params', {})):>7}  "
              f"{raw.get('description', '')}")
    return 0


def cmd_summary(args) -> int:
    from .spec import summary, train_flops_per_image
    from .zoo import load_config

    cfg = load_config(args.model)
    print(summary(cfg.model))
    spec = cfg.model
    if spec.input_crop is not None:
        (rows, cols), (height, width) = spec.input_crop, spec.input_shape[:2]
        print(f"Reads the top-left {rows}x{cols} of its {height}x{width} input: the rest "
              f"reaches only outputs that the pools' floor rounding drops (never computed)")
    whole = (f" ({spec.flops / 1e6:.2f} on the whole input, as Keras computes it)"
             if spec.input_crop is not None else "")
    print(f"Forward pass: {spec.read_flops / 1e6:.2f} MFLOP per image{whole}; "
          f"training: {train_flops_per_image(spec) / 1e6:.2f} MFLOP per image")
    return 0


def cmd_train(args) -> int:
    from . import run

    overrides = _train_overrides(args)
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError(f"--out {args.out} and --resume {args.resume} name different run "
                            f"directories; a resumed run stays in its own")
        expected = run.resolve_config(args.model, **overrides)
        epochs = overrides.get("train.epochs")
        result = run.resume(args.resume, epochs=epochs, expect=_without_epochs(expected, args.resume),
                            progress=not args.quiet, plots=not args.no_plots)
    else:
        result = run.train(args.model, args.out, progress=not args.quiet, plots=not args.no_plots,
                           **overrides)
    _print_result(result)
    return 0


def _without_epochs(cfg, run_dir):
    """For --resume, the epoch count may differ from the saved run's (it extends it)."""
    from .run import load_run_config

    cfg.train.epochs = load_run_config(run_dir).train.epochs
    return cfg


def _print_result(result) -> None:
    if not result.metrics:  # one of several training processes: process 0 reports
        return
    m = result.metrics
    print(f"Test accuracy: {m['test_accuracy']:.4f} (loss {m['test_loss']:.4f}) after "
          f"{m['epochs']} epoch{'s' if m['epochs'] != 1 else ''}, "
          f"{m['train_seconds']:.1f} s of training")
    outputs = [p.name + ("/" if p.is_dir() else "") for p in sorted(result.run_dir.iterdir())
               if not p.name.startswith(".")]
    print(f"Run directory: {result.run_dir} ({', '.join(outputs)})")
    if result.per_class:
        print(result.per_class)


def cmd_resume(args) -> int:
    from . import run

    result = run.resume(args.run_dir, epochs=args.epochs, progress=not args.quiet,
                        plots=not args.no_plots)
    _print_result(result)
    return 0


def cmd_evaluate(args) -> int:
    from .run import evaluate_run

    result = evaluate_run(args.run_dir, checkpoint=args.checkpoint, tta=args.tta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Test loss: {result['test_loss']:.4f}  accuracy: {result['test_accuracy']:.4f} "
          f"({result['test_correct']}/{result['test_size']}) in {result['eval_seconds']:.2f} s"
          + ("" if result["tta"] == "none" else
             f" (test-time augmentation: {result['tta']}; without it: "
             f"{result['test_accuracy_without_tta']:.4f})"))
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:<14}{acc:.4f}")
    if result["tta"] == "flip" and not result["trained_with_flips"]:
        print("note: this run was trained without horizontal flips; the flip TTA shows it "
              "mirrored shoes, which it has never seen", file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_files, save_inputs

    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    results = predict_files(args.run_dir, args.images, checkpoint=args.checkpoint,
                            invert=args.invert, tta=args.tta)
    if args.save_inputs:
        written = save_inputs(results, args.save_inputs)
        print(f"Wrote {len(written)} model inputs (28x28 PNG) to {args.save_inputs}",
              file=sys.stderr)
    failed = [r for r in results if r.error is not None]
    if args.json:
        print(json.dumps([r.to_dict(args.top) for r in results], indent=2))
    else:
        width = max([len("image")] + [len(r.path) for r in results if r.error is None])
        if len(failed) < len(results):
            print(f"{'image':<{width}}  {'prediction':<12} {'prob.':>6}  next")
        for r in results:
            if r.error is not None:
                continue
            (name, p), rest = r.top(1)[0], r.top(args.top)[1:]
            others = ", ".join(f"{n} {q:.3f}" for n, q in rest)
            print(f"{r.path:<{width}}  {name:<12} {p:6.3f}  {others}"
                  + ("  (inverted)" if r.inverted else ""))
    for r in failed:
        print(f"fashion-cnn: error: {r.error}", file=sys.stderr)
    return 2 if failed else 0


def cmd_export(args) -> int:
    from .export import OPSET, export_onnx

    result = export_onnx(args.run_dir, args.out, checkpoint=args.checkpoint,
                         check=not args.no_check)
    print(f"Wrote {result.path} ({result.size_bytes / 1024:.0f} KiB, ONNX opset {OPSET}): input "
          f"'pixels' uint8 (N, 28, 28); outputs 'logits' and 'probabilities' float32 (N, 10)")
    if result.max_difference is not None:
        print(f"Checked with onnxruntime {result.onnxruntime_version} on "
              f"{result.checked_images} images: probabilities within "
              f"{result.max_difference:.1e} of PyTorch's")
    return 0


def _one_process(command: str, instead: str) -> None:
    """Commands that are not data-parallel refuse torchrun's several processes."""
    from .distributed import launched_processes

    if launched_processes() > 1:
        raise UserError(f"{command} runs as one process, not under torchrun; {instead}")


def cmd_tune(args) -> int:
    from .search import params_text, tune

    _one_process("tune", "to search with several processes, start `fashion-cnn tune` in each "
                         "with one --storage file")

    overrides = {}
    if args.threads is not None:
        overrides["train.threads"] = args.threads
    if args.subset is not None:
        overrides["data.subset"] = args.subset
    overrides.update(_set_overrides(args))
    result = tune(args.space, trials=args.trials, timeout=args.timeout, out=args.out,
                  storage=args.storage, study_name=args.study_name, seed=args.seed,
                  prune=not args.no_prune, progress=not args.quiet, **overrides)
    if result.best_trial is None:
        print(f"No trial finished; trials so far in {result.out_dir / 'trials.csv'}")
    else:
        print(f"Best of {result.trials} trials (study {result.study_name!r}): trial "
              f"{result.best_trial}, {result.best_value:.4f}: {params_text(result.best_params)}")
        print(f"Retrain it: fashion-cnn train {result.out_dir / 'best.toml'}   "
              f"(all trials: {result.out_dir / 'trials.csv'})")
    if result.interrupted:
        print("fashion-cnn: interrupted; the trials above are kept", file=sys.stderr)
        return 130
    return 0


def cmd_augment_preview(args) -> int:
    from .plots import augmentation_preview

    path = augmentation_preview(args.recipe, args.out, n=args.n, seed=args.seed)
    print(f"Wrote {path}")
    return 0


def cmd_plots(args) -> int:
    from .plots import plots_from_run

    out, table = plots_from_run(args.run_dir, checkpoint=args.checkpoint, out_dir=args.out)
    print(table)
    print(f"Wrote the figures and tables into {out}")
    return 0


def cmd_compare(args) -> int:
    from .plots import compare_runs

    for path in compare_runs(args.run_dirs, args.out):
        print(f"Wrote {path}")
    return 0


def cmd_study(args) -> int:
    from .study import print_study_result, run_study

    _one_process("study", "train a recipe under torchrun instead")

    result = run_study(args.study, args.out, epochs_scale=args.epochs_scale, subset=args.subset,
                       repeats=args.repeats, progress=not args.quiet)
    print_study_result(result)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    html_path, md_path = write_report(args.study_dir)
    print(f"Wrote {html_path} and {md_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashion-cnn",
        description="Train, study and use CNN classifiers on Fashion-MNIST (Keras vocabulary, PyTorch).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="find, verify and cache the dataset; print class counts")
    p.add_argument("--data-dir", help="directory of the four IDX files")
    p.add_argument("--download", action="store_true", help="fetch from the official mirror first")
    p.add_argument("--no-checksum", action="store_true",
                   help="skip the MD5 and count checks (your own IDX files)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list the model zoo and the recipes")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="print a Keras-style summary of a model or recipe")
    p.add_argument("model", help="zoo model, recipe, or path to a .toml spec")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a model or recipe into a run directory")
    p.add_argument("model", help="zoo model, recipe, or path to a .toml spec/recipe/config")
    p.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run (options must match)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run from its newest intact checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, help="extend the run to this many epochs")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("evaluate", help="reload a run and evaluate it on the test set")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tta", choices=CHOICES[("train", "tta")], default=None,
                   help="test-time augmentation: average the logits of the image and its four "
                        "one-pixel shifts (shift) or its mirror image (flip; for models trained "
                        "with horizontal_flip); default: the run's own [train] tta")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files (photos or 28x28 images) with a run")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG, JPEG, WebP, ... files; photos are trimmed, resized to 28x28 and "
                        "made a light garment on black, as Fashion-MNIST's images were")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    p.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    from .predict import INVERT_CHOICES

    p.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                   help="negate the image: auto (default) where its border is light, as a "
                        "photo on a white background")
    p.add_argument("--tta", choices=CHOICES[("train", "tta")], default=None,
                   help="test-time augmentation (default: the run's own)")
    p.add_argument("--save-inputs", metavar="DIR",
                   help="also write each 28x28 model input as a PNG here (what the model saw)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a run's model as ONNX (checked with onnxruntime)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the .onnx file (default RUN_DIR/model.onnx)")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number instead of the final weights")
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison with PyTorch in onnxruntime")
    p.set_defaults(func=cmd_export)

    from .zoo import list_searches

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
    p.add_argument("--subset", type=int, help="use the first N training images")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="fix a setting for every trial, e.g. --set train.epochs=3")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("augment-preview", help="grid of original vs augmented training images")
    p.add_argument("recipe")
    p.add_argument("--out", default="augment-preview.png")
    p.add_argument("-n", type=int, default=8, help="images to show")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser("plots", help="regenerate a run's figures from its weights or a checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint name or epoch number (figures go to "
                                        "RUN_DIR/plots/<checkpoint>/)")
    p.add_argument("--out", help="write into this folder instead")
    p.set_defaults(func=cmd_plots)

    p = sub.add_parser("compare", help="overlaid learning curves and weight histograms of runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="folder for learning_curves.png and weights.png")
    p.set_defaults(func=cmd_compare)

    from .zoo import list_studies

    p = sub.add_parser("study", help="train every run of a study, then write its report")
    p.add_argument("study", help="built-in study (one of: " + ", ".join(list_studies())
                                 + ") or path to a study .toml")
    p.add_argument("--out", help="study directory (default studies/<name>); rerunning the same "
                                 "command skips finished runs and resumes interrupted ones")
    p.add_argument("--epochs-scale", type=float, metavar="F",
                   help="each recipe's epochs x F, rounded, at least 1 (quick versions)")
    p.add_argument("--subset", type=int, metavar="N", help="use the first N training images")
    p.add_argument("--repeats", type=int, metavar="K", help="train each run with seeds 0..K-1")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="rewrite a study's report.html and report.md from its runs")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_report)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import is_main, shutdown  # several processes (torchrun): process 0 speaks

    try:
        code = args.func(args)
        shutdown(succeeded=code == 0)
        return code
    except UserError as exc:
        if is_main():
            print(f"fashion-cnn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingStopped as exc:
        if is_main():
            print(f"fashion-cnn: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fashion-cnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
