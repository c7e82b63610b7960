"""Datasets as float tensors in [0, 1]: images (B, C, H, W) and integer labels."""
from .images import (
    CIFAR10_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    ImageSet,
    check_labels,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    pad_to,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "check_labels",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "pad_to",
]
