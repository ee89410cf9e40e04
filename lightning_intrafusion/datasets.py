"""scikit-learn's bundled 8x8 digits as tensors and as a LightningDataModule (nothing is
downloaded: the data ships inside scikit-learn)."""

from __future__ import annotations

from typing import Tuple

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(test_fraction: float = 0.3, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of ``(1, 8, 8)`` images in [0, 1] and integer labels, split by a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class DigitsDataModule(pl.LightningDataModule):
    """Digits with a fixed train/validation split."""

    def __init__(self, batch_size: int = 64, test_fraction: float = 0.3, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.test_fraction = test_fraction
        self.seed = seed

    def setup(self, stage: str = "") -> None:
        self.train_set, self.val_set = digits_tensors(self.test_fraction, self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
