"""Data sets, transforms and samplers for training and evaluating TransNeXt models.

Heavy libraries (PIL, timm, torchvision) are imported inside the functions that need them.
"""

from .classes import imagenet_class_names, imagenet_wnids, robustness_subset_wnids
from .datasets import (
    IMG_EXTENSIONS,
    ArrayDataset,
    DataError,
    ImageFileDataset,
    collate_skip,
    find_images,
    load_image,
    scan_image_folder,
)
from .demo import DEMO_CLASSES, demo_dataset, write_demo_images
from .samplers import ResumableSampler, SeededDataset, ShardSampler, build_train_sampler
from .transforms import build_eval_transform, build_train_transform, eval_crop

__all__ = [
    "DEMO_CLASSES",
    "IMG_EXTENSIONS",
    "ArrayDataset",
    "DataError",
    "ImageFileDataset",
    "ResumableSampler",
    "SeededDataset",
    "ShardSampler",
    "build_eval_transform",
    "build_train_sampler",
    "build_train_transform",
    "collate_skip",
    "demo_dataset",
    "eval_crop",
    "find_images",
    "imagenet_class_names",
    "imagenet_wnids",
    "load_image",
    "robustness_subset_wnids",
    "scan_image_folder",
    "write_demo_images",
]
