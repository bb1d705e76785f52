"""fashion-cnn: train, study and use CNN classifiers on Fashion-MNIST, in Keras' vocabulary on PyTorch.

>>> import fashion_cnn as fc
>>> result = fc.train("seed-model1", epochs=1)                 # doctest: +SKIP
>>> fc.evaluate_run(result.run_dir)["test_accuracy"]           # doctest: +SKIP
"""

from .build import build_model
from .config import RunConfig
from .data import CLASS_NAMES, load_data, make_splits
from .predict import predict_files
from .run import evaluate_run, load_model, resolve_config, resume, train
from .spec import parse_spec, summary
from .train import Trainer, evaluate
from .zoo import get_model_spec, list_models, list_recipes, load_config

__all__ = ["CLASS_NAMES", "RunConfig", "Trainer", "build_model", "evaluate", "evaluate_run",
           "get_model_spec", "list_models", "list_recipes", "load_config", "load_data",
           "load_model", "make_splits", "parse_spec", "predict_files", "resolve_config", "resume",
           "summary", "train"]
__version__ = "0.1.0"
