"""Datasets, samplers and LightningDataModules for retrieval.

Every item/batch is ``(images float32 [C,H,W] in [0,1], label int64, index int64)`` -- no mean/std
normalisation (models normalise inside, so attack budgets are in pixel units).
"""

from robust_ranking.data.cars196 import Cars196DataModule
from robust_ranking.data.cifar10 import CIFAR10DataModule
from robust_ranking.data.class_balanced_batch_sampler import ClassBalancedBatchSampler
from robust_ranking.data.cub200 import CUB200DataModule
from robust_ranking.data.dml_benchmark import DMLBenchmarkDataModule
from robust_ranking.data.errors import DataConfigError, DataNotFoundError
from robust_ranking.data.fashion_mnist import FASHION_MNIST_DEBIAN_DIR, FashionMNISTDataModule
from robust_ranking.data.idx_format import read_idx_ubyte, write_idx_ubyte
from robust_ranking.data.image_file_dataset import ImageFileDataset
from robust_ranking.data.mnist import MNIST_DEBIAN_DIR, MNISTDataModule
from robust_ranking.data.mnist_like_datamodule import MNISTLikeDataModule
from robust_ranking.data.retrieval_batch import RetrievalBatch, collate_retrieval_batch
from robust_ranking.data.retrieval_datamodule import RetrievalDataModule
from robust_ranking.data.stanford_online_products import StanfordOnlineProductsDataModule
from robust_ranking.data.synthetic import SyntheticDataModule
from robust_ranking.data.tensor_image_dataset import TensorImageDataset

__all__ = [
    "CIFAR10DataModule",
    "CUB200DataModule",
    "Cars196DataModule",
    "ClassBalancedBatchSampler",
    "DMLBenchmarkDataModule",
    "DataConfigError",
    "DataNotFoundError",
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
