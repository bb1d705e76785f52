"""The sub-commands: each parses nothing and computes nothing of its own; it calls the
library function of the same name and prints its result."""

from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path

from ..errors import UserError
from . import printable


def _parse_set(text: str) -> tuple[str, object]:
    """--set train.lr=0.01: the value is read as TOML (numbers, booleans, lists), else a string."""
    from ..models.args import shown

    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise UserError(f"--set {shown(text)}: expected section.key=value, e.g. train.lr=0.01")
    longest = 64 * 1024  # a setting's value is a number, a word, a path or a short list
    if len(value) > longest:
        raise UserError(f"--set {shown(key.strip())}=...: the value is {len(value)} "
                        f"characters long (at most {longest})")
    try:
        table = tomllib.loads(f"v = {value}")
        # one value, not a value and then more TOML (a newline and "[data]", say)
        parsed = table["v"] if list(table) == ["v"] else value
    except tomllib.TOMLDecodeError:
        parsed = value
    except ValueError:  # an integer of more than 4300 digits, which Python does not read
        raise UserError(f"--set {shown(key.strip())}=...: the value is an integer of more "
                        f"digits than can be read") from None
    except RecursionError:  # nested arrays deeper than Python's TOML parser goes
        raise UserError(f"--set {shown(key.strip())}=...: the value is nested too deep") from None
    return key.strip(), parsed


# The training options of `train` (argparse dest -> the config setting each overrides); the
# parser's recipe-aware --help shows the recipe's value of each.
TRAIN_FLAGS = {
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
    "dataset": "data.dataset", "strict": "data.strict", "device": "train.device",
    "cpu_kernels": "train.cpu_kernels", "deterministic": "train.deterministic",
}


def _train_overrides(args) -> dict:
    overrides = {dotted: getattr(args, flag) for flag, dotted in TRAIN_FLAGS.items()
                 if getattr(args, flag, None) is not None}
    tensorboard = _tensorboard(args)
    if tensorboard is not None:
        overrides["log.tensorboard"] = tensorboard is not False
        if isinstance(tensorboard, str):
            overrides["log.tensorboard_dir"] = tensorboard
    return {**overrides, **_set_overrides(args)}


def _tensorboard(args) -> bool | str | None:
    """--tensorboard / --no-tensorboard / --tensorboard-dir DIR: True, False, DIR, or None
    where none was given (then the run's [log] decides)."""
    if getattr(args, "tensorboard_dir", None):
        if args.tensorboard is False:
            raise UserError("--no-tensorboard and --tensorboard-dir contradict each other")
        return args.tensorboard_dir
    return getattr(args, "tensorboard", None)


def _set_overrides(args) -> dict:
    """The --set SECTION.KEY=VALUE options, in order (a later one wins)."""
    return dict(_parse_set(item) for item in args.set or [])


def cmd_data(args) -> int:
    from ..data.arrays import class_counts
    from ..data.fashion_mnist import download, timed_load
    from ..data.sources import open_dataset

    if args.download:
        print(f"downloaded to {download()}")
    start = time.perf_counter()
    if (args.dataset or "fashion-mnist") == "fashion-mnist":
        data, seconds = timed_load(args.data_dir, check_md5=not args.no_checksum)
        how = "cache" if data.from_cache else "IDX files (decoded and cached)"
        checks = ("structure and MD5 verified" if data.verified_md5
                  else "structure verified (MD5 skipped)")
        print(f"Fashion-MNIST in {data.source}: {checks}; loaded from {how} in {seconds:.2f} s")
    else:
        data = open_dataset(args.dataset, strict=bool(args.strict))
        how = "cache" if data.from_cache else "its files"
        print(f"{data.name} dataset in {data.source}: {data.image_size}x{data.image_size}x"
              f"{data.channels}, {data.num_classes} classes; loaded from {how} in "
              f"{time.perf_counter() - start:.2f} s")
        for note in data.notes:
            print(f"  {note}")
    train_counts = class_counts(data.train_labels, data.num_classes)
    test_counts = class_counts(data.test_labels, data.num_classes)
    width = max(14, max(len(n) for n in data.class_names) + 2)
    print(f"{'class':<{width}}{'train':>8}{'test':>8}")
    for name, a, b in zip(data.class_names, train_counts, test_counts):
        print(f"{name:<{width}}{a:>8}{b:>8}")
    print(f"{'total':<{width}}{sum(train_counts):>8}{sum(test_counts):>8}")
    return 0


def cmd_models(args) -> int:
    from ..models.zoo import get_model_spec, list_models
    from ..training.recipes import list_recipes, load_config

    print(f"{'model':<12}{'params':>10}  description")
    for name in list_models():
        spec = get_model_spec(name)
        print(f"{name:<12}{spec.total_params:>10,}  {spec.description}")
    print(f"\n{'recipe':<16}{'model':<12}{'epochs':>7}  description")
    for name in list_recipes():
        cfg = load_config(name)
        print(f"{name:<16}{cfg.model.name:<12}{cfg.train.epochs:>7}  {cfg.description}")
    from ..apps.tune import list_searches, search_path
    from ..fileio import read_toml

    print(f"\n{'search space':<16}{'recipe':<12}{'params':>7}  description (fashion-cnn tune)")
    for name in list_searches():
        raw = read_toml(search_path(name))  # as written; `tune` validates it in full
        print(f"{name:<16}{raw.get('recipe', ''):<12}{len(raw.get('params', {})):>7}  "
              f"{raw.get('description', '')}")
    return 0


def cmd_summary(args) -> int:
    from ..models.spec import summary, train_flops_per_image
    from ..training.recipes import load_config

    cfg = load_config(args.model)
    if args.dataset:
        from ..training.config import bind_to_data
        from ..training.run import data_for

        cfg.data.dataset = args.dataset
        bind_to_data(cfg, data_for(cfg))
        print(f"Adapted to {args.dataset}: {cfg.image_size}x{cfg.image_size}x{cfg.data.channels} "
              f"images, {len(cfg.class_names)} classes")
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
    from ..analysis import runs
    from ..training.recipes import resolve_config

    overrides = _train_overrides(args)
    if args.show_config and args.resume:
        from ..training.rundir import RunDir

        raise UserError(f"--show-config prints the configuration of a new run; a run's own is "
                        f"{RunDir(args.resume).config_file}")
    if args.show_config:
        from ..training.config import to_toml
        from ..training.run import run_config

        print(to_toml(run_config(args.model, **overrides)))
        return 0
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError(f"--out {args.out} and --resume {args.resume} name different run "
                            f"directories; a resumed run stays in its own")
        expected = resolve_config(args.model, **overrides)
        epochs = overrides.get("train.epochs")
        result = runs.resume(args.resume, epochs=epochs, expect=_without_epochs(expected, args.resume),
                            progress=not args.quiet, plots=not args.no_plots,
                            tensorboard=_tensorboard(args))
    else:
        result = runs.train(args.model, args.out, progress=not args.quiet, plots=not args.no_plots,
                           **overrides)
    _print_result(result)
    return 0


def _without_epochs(cfg, run_dir):
    """For --resume, the epoch count may differ from the saved run's (it extends it)."""
    from ..training.rundir import RunDir

    cfg.train.epochs = RunDir(run_dir).read_config().train.epochs
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
    from ..analysis import runs

    result = runs.resume(args.run_dir, epochs=args.epochs, progress=not args.quiet,
                        plots=not args.no_plots, device=args.device,
                        tensorboard=_tensorboard(args))
    _print_result(result)
    return 0


def cmd_evaluate(args) -> int:
    from ..training.reload import evaluate_run

    result = evaluate_run(args.run_dir, checkpoint=args.checkpoint, tta=args.tta,
                          device=args.device)
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
    from ..apps.predict import predict_files, save_inputs

    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    if args.explain:  # first: a bad --layer is refused before anything is printed
        from ..apps.predict import explain_files

        explained = explain_files(args.run_dir, args.images, args.explain,
                                  checkpoint=args.checkpoint, invert=args.invert,
                                  layer=args.layer, device=args.device, tta=args.tta)
        written = [f for e in explained for f in e.files]
        print(f"Wrote {len(written)} explanation PNGs to {printable(args.explain)}",
              file=sys.stderr)
    elif args.layer is not None:
        raise UserError("--layer chooses the Conv2D layer of --explain; give --explain DIR too",
                        setting="layer")
    results = predict_files(args.run_dir, args.images, checkpoint=args.checkpoint,
                            invert=args.invert, tta=args.tta, device=args.device)
    if args.save_inputs:
        written = save_inputs(results, args.save_inputs)
        print(f"Wrote {len(written)} model inputs (28x28 PNG) to {printable(args.save_inputs)}",
              file=sys.stderr)
    failed = [r for r in results if r.error is not None]
    if args.json:  # JSON escapes every character a name may hold
        print(json.dumps([r.to_dict(args.top) for r in results], indent=2))
    else:
        # file names escaped: a newline or an escape sequence in one cannot forge a row
        names = {id(r): printable(r.path) for r in results}
        width = max([len("image")] + [len(names[id(r)]) for r in results if r.error is None])
        if len(failed) < len(results):
            print(f"{'image':<{width}}  {'prediction':<12} {'prob.':>6}  next")
        for r in results:
            if r.error is not None:
                continue
            (name, p), rest = r.top(1)[0], r.top(args.top)[1:]
            others = ", ".join(f"{printable(n)} {q:.3f}" for n, q in rest)
            print(f"{names[id(r)]:<{width}}  {printable(name):<12} {p:6.3f}  {others}"
                  + ("  (inverted)" if r.inverted else ""))
    for r in failed:
        print(f"fashion-cnn: error: {printable(r.error)}", file=sys.stderr)
    return 2 if failed else 0


def cmd_export(args) -> int:
    from ..apps.export import OPSET, export_onnx

    result = export_onnx(args.run_dir, args.out, checkpoint=args.checkpoint,
                         check=not args.no_check)
    shape = ", ".join(str(v) for v in result.pixels_shape)
    print(f"Wrote {result.path} ({result.size_bytes / 1024:.0f} KiB, ONNX opset {OPSET}): input "
          f"'pixels' uint8 ({shape}); outputs 'logits' and 'probabilities' float32 "
          f"(N, {result.num_classes})")
    if result.max_difference is not None:
        print(f"Checked with onnxruntime {result.onnxruntime_version} on "
              f"{result.checked_images} images: probabilities within "
              f"{result.max_difference:.1e} of PyTorch's")
    return 0


def cmd_import_keras(args) -> int:
    from ..apps.keras_import import import_keras
    from ..models.spec import summary
    from ..training.rundir import RunDir

    if args.weights_only and not args.model:
        raise UserError("--weights-only needs --model SPEC (a zoo model or a spec .toml)")
    if args.model and not args.weights_only:
        raise UserError("--model gives the architecture of a weights-only file; add --weights-only")
    overrides = {k: v for k, v in {"data.dataset": args.dataset, "data.data_dir": args.data_dir,
                                   "data.strict": args.strict}.items() if v is not None}
    overrides.update(_set_overrides(args))
    run_dir = import_keras(args.file, args.out, weights_only=args.weights_only, model=args.model,
                           name=args.name, recipe=args.recipe, **overrides)
    print(summary(RunDir(run_dir).read_config().model))
    print(f"Imported {args.file} into {run_dir}; evaluate: fashion-cnn evaluate {run_dir}; "
          f"fine-tune: fashion-cnn resume {run_dir} --epochs N")
    return 0


def _one_process(command: str, instead: str) -> None:
    """Commands that are not data-parallel refuse torchrun's several processes."""
    from ..training.distributed import launched_processes

    if launched_processes() > 1:
        raise UserError(f"{command} runs as one process, not under torchrun; {instead}")


def cmd_tune(args) -> int:
    from ..apps.tune import params_text, tune

    _one_process("tune", "to search with several processes, start `fashion-cnn tune` in each "
                         "with one --storage file")

    overrides = {}
    if args.threads is not None:
        overrides["train.threads"] = args.threads
    if args.device is not None:
        overrides["train.device"] = args.device
    if args.subset is not None:
        overrides["data.subset"] = args.subset
    if args.dataset is not None:
        overrides["data.dataset"] = args.dataset
    if args.strict:
        overrides["data.strict"] = True
    overrides.update(_set_overrides(args))
    result = tune(args.space, trials=args.trials, timeout=args.timeout, out=args.out,
                  storage=args.storage, study_name=args.study_name, seed=args.seed,
                  prune=not args.no_prune, progress=not args.quiet,
                  tensorboard=_tensorboard(args) or False,
                  **overrides)
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
    from ..analysis.plots import augmentation_preview

    path = augmentation_preview(args.recipe, args.out, n=args.n, seed=args.seed)
    print(f"Wrote {path}")
    return 0


def cmd_plots(args) -> int:
    from ..analysis.plots import plots_from_run

    out, table = plots_from_run(args.run_dir, checkpoint=args.checkpoint, out_dir=args.out,
                                device=args.device)
    print(table)
    print(f"Wrote the figures and tables into {out}")
    return 0


def cmd_compare(args) -> int:
    from ..analysis.plots import compare_runs

    for path in compare_runs(args.run_dirs, args.out):
        print(f"Wrote {path}")
    return 0


def cmd_study(args) -> int:
    from ..analysis.study_run import print_study_result, run_study

    _one_process("study", "train a recipe under torchrun instead")

    result = run_study(args.study, args.out, epochs_scale=args.epochs_scale, subset=args.subset,
                       repeats=args.repeats, dataset=args.dataset, progress=not args.quiet,
                       tensorboard=_tensorboard(args) or False,
                       isolate=False if args.in_process else None)
    print_study_result(result)
    return 0


def cmd_report(args) -> int:
    from ..analysis.report import write_report

    html_path, md_path = write_report(args.study_dir)
    print(f"Wrote {html_path} and {md_path}")
    return 0


def cmd_env(args) -> int:
    from ..apps.environment import environment_report, format_environment

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_environment(report))
    return 0


def cmd_serve(args) -> int:
    from ..apps.serve import Limits, serve

    if not 0 < args.max_file_mb < float("inf"):
        raise UserError(f"--max-file-mb must be a positive number of MiB, got {args.max_file_mb}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    limits = Limits(max_file_bytes=max(1, int(args.max_file_mb * 2**20)),
                    max_files=args.max_files, max_pixels=args.max_pixels,
                    request_seconds=args.request_timeout, max_connections=args.max_connections)
    serve(args.run_dir, host=args.host, port=args.port, checkpoint=args.checkpoint,
          device=args.device, limits=limits, threads=args.threads)
    return 0
