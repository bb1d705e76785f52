"""fashion-cnn: train, study and use small CNN image classifiers (Fashion-MNIST or your own
images), in Keras' vocabulary on PyTorch.

The package is laid out by layer, each importing only from those below it:
data -> models -> training -> analysis -> apps -> cli. Everything a notebook needs is here:

>>> import fashion_cnn as fc
>>> result = fc.train("seed-model1", epochs=1)                 # doctest: +SKIP
>>> fc.evaluate_run(result.run_dir)["test_accuracy"]           # doctest: +SKIP

The names below load on first use (PEP 562): `import fashion_cnn` itself imports nothing
heavy, so the command line's start-up (torch included) runs inside its Ctrl-C handler, and
`fc.load_data` does not wait for onnxruntime or Optuna.
"""

import importlib

# public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "figure_compare_curves": "analysis.figures",
    "figure_confusion": "analysis.figures",
    "figure_metrics": "analysis.figures",
    "figure_weights": "analysis.figures",
    "figure_gradcam": "analysis.gradcam_figure",
    "gradcam": "analysis.explain",
    "overlay_heatmap": "analysis.explain",
    "saliency": "analysis.explain",
    "figure_activations": "analysis.image_figures",
    "figure_misclassified": "analysis.image_figures",
    "figure_predictions": "analysis.image_figures",
    "confusion_matrix": "analysis.metrics",
    "per_class_table": "analysis.metrics",
    "softmax": "analysis.metrics",
    "LivePlot": "analysis.plots",
    "augmentation_preview": "analysis.plots",
    "compare_runs": "analysis.plots",
    "plots_from_run": "analysis.plots",
    "results_markdown": "analysis.report",
    "write_report": "analysis.report",
    "resume": "analysis.runs",
    "train": "analysis.runs",
    "list_studies": "analysis.study",
    "load_study": "analysis.study",
    "run_study": "analysis.study_run",
    "environment_report": "apps.environment",
    "format_environment": "apps.environment",
    "export_onnx": "apps.export",
    "import_keras": "apps.keras_import",
    "explain_files": "apps.predict",
    "predict_files": "apps.predict",
    "save_inputs": "apps.predict",
    "create_app": "apps.serve",
    "serve": "apps.serve",
    "tune": "apps.tune",
    "ImageData": "data.arrays",
    "class_counts": "data.arrays",
    "make_splits": "data.arrays",
    "CLASS_NAMES": "data.fashion_mnist",
    "load_data": "data.fashion_mnist",
    "write_image_folder": "data.images",
    "open_dataset": "data.sources",
    "CheckpointError": "errors",
    "DataError": "errors",
    "Interrupted": "errors",
    "NonFiniteLoss": "errors",
    "SpecError": "errors",
    "TrainingStopped": "errors",
    "UserError": "errors",
    "build_model": "models.build",
    "accelerate": "models.cpu_pass",
    "is_accelerated": "models.cpu_pass",
    "plain": "models.cpu_pass",
    "keras_to_spec": "models.keras_format",
    "load_keras": "models.keras_format",
    "parse_spec": "models.spec",
    "summary": "models.spec",
    "get_model_spec": "models.zoo",
    "list_models": "models.zoo",
    "adapt_spec": "models.spec",
    "RunConfig": "training.config",
    "bind_to_data": "training.config",
    "Trainer": "training.loop",
    "evaluate": "training.loop",
    "list_recipes": "training.recipes",
    "load_config": "training.recipes",
    "resolve_config": "training.recipes",
    "RunResult": "training.run",
    "run_config": "training.run",
    "ProgressBar": "training.progress",
    "FreeCoreThreads": "training.threads",
    "TensorBoardLogger": "analysis.tensorboard",
    "evaluate_run": "training.reload",
    "load_model": "training.reload",
    "RunDir": "training.rundir",
}

__all__ = [
    # data and models
    "CLASS_NAMES", "ImageData", "class_counts", "load_data", "open_dataset", "make_splits",
    "write_image_folder",
    "build_model", "parse_spec", "adapt_spec", "summary", "get_model_spec", "list_models",
    "accelerate", "plain", "is_accelerated",
    # configuration and training
    "RunConfig", "bind_to_data", "list_recipes", "load_config", "resolve_config", "Trainer", "evaluate", "train",
    "resume", "RunResult", "RunDir", "evaluate_run", "load_model", "run_config", "ProgressBar",
    "FreeCoreThreads",
    # analysis
    "LivePlot", "confusion_matrix", "per_class_table", "softmax", "figure_metrics",
    "figure_confusion", "figure_weights", "figure_compare_curves", "figure_predictions",
    "figure_misclassified", "figure_activations", "augmentation_preview", "plots_from_run",
    "compare_runs", "list_studies", "load_study", "run_study", "write_report",
    "results_markdown", "TensorBoardLogger", "gradcam", "saliency", "overlay_heatmap",
    "figure_gradcam",
    # apps
    "predict_files", "save_inputs", "export_onnx", "tune", "import_keras", "load_keras",
    "keras_to_spec", "environment_report", "format_environment", "explain_files", "create_app",
    "serve",
    # errors
    "UserError", "DataError", "SpecError", "CheckpointError", "TrainingStopped", "Interrupted",
    "NonFiniteLoss",
]


def __getattr__(name: str):
    """A public name, imported from its module on first use; `__version__` the installed
    package's version."""
    if name == "__version__":
        from .apps.environment import package_version

        value = package_version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
