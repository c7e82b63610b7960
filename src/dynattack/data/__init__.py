"""Datasets as float tensors in [0, 1]: images (B, C, H, W) and integer labels."""
from .images import load_fashion_mnist

__all__ = ["load_fashion_mnist"]
