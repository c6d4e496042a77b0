"""Shuffled, epoch-aware batches of examples whose position can be saved and restored.

The order of epoch e is a permutation drawn from (seed, e) alone, so a resumed run that
restores (epoch, position) sees exactly the batches an uninterrupted run would have seen.
A batch never straddles two epochs: the tail shorter than a batch is dropped.
"""
from __future__ import annotations

from typing import Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class PromptStream(Generic[T]):
    def __init__(self, items: Sequence[T], batch_size: int, *, seed: int, shuffle: bool = True):
        if len(items) < batch_size:
            raise ValueError(f"the dataset has {len(items)} rows, fewer than one batch "
                             f"(config.trainer.batch_size = {batch_size})")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def next_batch(self) -> list[T]:
        if self.position + self.batch_size > len(self.items):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.items[i] for i in idx]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
