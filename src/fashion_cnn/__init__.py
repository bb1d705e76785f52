"""fashion-cnn: train, study and use small CNN image classifiers (Fashion-MNIST or your own
images), in Keras' vocabulary on PyTorch.

The package is laid out by layer, each importing only from those below it:
data -> models -> training -> analysis -> apps -> cli. Everything a notebook needs is here:

>>> import fashion_cnn as fc
>>> result = fc.train("seed-model1", epochs=1)                 # doctest: +SKIP
>>> fc.evaluate_run(result.run_dir)["test_accuracy"]           # doctest: +SKIP
"""

from .analysis.figures import figure_compare_curves, figure_confusion, figure_metrics, figure_weights
from .analysis.image_figures import figure_activations, figure_misclassified, figure_predictions
from .analysis.metrics import confusion_matrix, per_class_table, softmax
from .analysis.plots import LivePlot, augmentation_preview, compare_runs, plots_from_run
from .analysis.report import results_markdown, write_report
from .analysis.runs import resume, train
from .analysis.study import list_studies, load_study
from .analysis.study_run import run_study
from .apps.environment import environment_report, format_environment, package_version
from .apps.export import export_onnx
from .apps.keras_import import import_keras
from .apps.predict import predict_files, save_inputs
from .apps.tune import tune
from .data.arrays import ImageData, class_counts, make_splits
from .data.fashion_mnist import CLASS_NAMES, load_data
from .data.images import write_image_folder
from .data.sources import open_dataset
from .errors import (CheckpointError, DataError, Interrupted, NonFiniteLoss, SpecError,
                     TrainingStopped, UserError)
from .models.build import build_model
from .models.cpu_pass import accelerate, is_accelerated, plain
from .models.keras_format import keras_to_spec, load_keras
from .models.spec import parse_spec, summary
from .models.zoo import get_model_spec, list_models
from .models.spec import adapt_spec
from .training.config import RunConfig, bind_to_data
from .training.loop import Trainer, evaluate
from .training.recipes import list_recipes, load_config, resolve_config
from .training.run import RunResult, evaluate_run, load_model
from .training.rundir import RunDir

__version__ = package_version()

__all__ = [
    # data and models
    "CLASS_NAMES", "ImageData", "class_counts", "load_data", "open_dataset", "make_splits",
    "write_image_folder",
    "build_model", "parse_spec", "adapt_spec", "summary", "get_model_spec", "list_models",
    "accelerate", "plain", "is_accelerated",
    # configuration and training
    "RunConfig", "bind_to_data", "list_recipes", "load_config", "resolve_config", "Trainer", "evaluate", "train",
    "resume", "RunResult", "RunDir", "evaluate_run", "load_model",
    # analysis
    "LivePlot", "confusion_matrix", "per_class_table", "softmax", "figure_metrics",
    "figure_confusion", "figure_weights", "figure_compare_curves", "figure_predictions",
    "figure_misclassified", "figure_activations", "augmentation_preview", "plots_from_run",
    "compare_runs", "list_studies", "load_study", "run_study", "write_report",
    "results_markdown",
    # apps
    "predict_files", "save_inputs", "export_onnx", "tune", "import_keras", "load_keras",
    "keras_to_spec", "environment_report", "format_environment",
    # errors
    "UserError", "DataError", "SpecError", "CheckpointError", "TrainingStopped", "Interrupted",
    "NonFiniteLoss",
]
