"""The data layer: datasets (verified files, decoded once into a cache), splits, augmentation.
Imports nothing from the layers above it (models, training, analysis, apps, cli)."""

from .arrays import ImageData, Splits, make_splits, to_tensor
from .augment import AugmentConfig, augment_batch
from .fashion_mnist import (CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, FashionMNIST, cache_root,
                            find_data_dir, load_data)
from .sources import open_dataset

__all__ = ["AugmentConfig", "CLASS_NAMES", "FashionMNIST", "IMAGE_SIZE", "ImageData",
           "NUM_CLASSES", "Splits", "augment_batch", "cache_root", "find_data_dir", "load_data",
           "make_splits", "open_dataset", "to_tensor"]
