"""Datasets, samplers and LightningDataModules for retrieval.

Every item/batch is ``(images float32 [C,H,W] in [0,1], label int64, index int64)`` -- no mean/std
normalisation (models normalise inside, so attack budgets are in pixel units).
"""

from data.cifar10 import CIFAR10DataModule
from data.class_balanced_batch_sampler import ClassBalancedBatchSampler
from data.errors import DataConfigError
from data.fashion_mnist import FASHION_MNIST_DEBIAN_DIR, FashionMNISTDataModule
from data.idx_format import read_idx_ubyte, write_idx_ubyte
from data.image_file_dataset import ImageFileDataset
from data.mnist import MNIST_DEBIAN_DIR, MNISTDataModule
from data.mnist_like_datamodule import MNISTLikeDataModule
from data.retrieval_batch import RetrievalBatch, collate_retrieval_batch
from data.retrieval_datamodule import RetrievalDataModule
from data.stanford_online_products import StanfordOnlineProductsDataModule
from data.synthetic import SyntheticDataModule
from data.tensor_image_dataset import TensorImageDataset

__all__ = [
    "CIFAR10DataModule",
    "ClassBalancedBatchSampler",
    "DataConfigError",
    "FASHION_MNIST_DEBIAN_DIR",
    "FashionMNISTDataModule",
    "ImageFileDataset",
    "MNISTDataModule",
    "MNISTLikeDataModule",
    "MNIST_DEBIAN_DIR",
    "RetrievalBatch",
    "RetrievalDataModule",
    "StanfordOnlineProductsDataModule",
    "SyntheticDataModule",
    "TensorImageDataset",
    "collate_retrieval_batch",
    "read_idx_ubyte",
    "write_idx_ubyte",
]
