"""A deterministic synthetic image-text dataset.

Sample ``i`` is a pure function of (seed, i): the same on any world size and any resume point.
Images and captions share a latent class (colour x shape), so a CLIP model can actually learn
from it and a falling loss means something.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import ConfigError
from .samples import batches_per_rank

COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"]
SHAPES = ["square", "stripe", "dot", "cross"]
_RGB = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [.6, 0, .8], [0, 1, 1], [1, .5, 0], [1, 1, 1]])


def synthetic_sample(seed: int, index: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    colour = int(torch.randint(len(COLOURS), (1,), generator=g))
    shape = int(torch.randint(len(SHAPES), (1,), generator=g))
    h, w = image_size
    img = 0.15 * torch.randn(3, h, w, generator=g)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = [
        (ys > h // 4) & (ys < 3 * h // 4) & (xs > w // 4) & (xs < 3 * w // 4),
        (xs // max(1, w // 8)) % 2 == 0,
        ((ys - h // 2) ** 2 + (xs - w // 2) ** 2) < (min(h, w) // 4) ** 2,
        ((ys - h // 2).abs() < max(1, h // 10)) | ((xs - w // 2).abs() < max(1, w // 10)),
    ][shape]
    img = img + mask.float() * (_RGB[colour].view(3, 1, 1) * 2 - 1)
    return img, f"a {COLOURS[colour]} {SHAPES[shape]}"


def synthetic_batches(num_samples: int, batch_size: int, world: int, count_flag: str = "--train-num-samples") -> int:
    """Batches per rank per epoch; ConfigError when the samples cannot fill one global batch."""
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"synthetic data needs at least one sample and a batch size >= 1, got "
                          f"{num_samples} samples and --batch-size {batch_size}")
    return batches_per_rank(num_samples, batch_size, world, f"{num_samples} synthetic samples",
                            f"raise {count_flag} or lower --batch-size")


class SyntheticSource:
    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, tokenizer: Callable,
                 image_size: tuple[int, int], seed: int = 0, shuffle: bool = True,
                 count_flag: str = "--train-num-samples"):
        self.num_samples, self.batch_size, self.rank, self.world = num_samples, batch_size, rank, world
        self.tokenizer, self.image_size, self.seed, self.shuffle = tokenizer, tuple(image_size), seed, shuffle
        self.global_batch = batch_size * world
        self.num_batches = synthetic_batches(num_samples, batch_size, world, count_flag)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + 65_537 * epoch))

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        order = self.order(epoch)
        for b in range(start_batch, self.num_batches):
            lo = b * self.global_batch + self.rank * self.batch_size
            idx = order[lo: lo + self.batch_size].tolist()
            images, captions = zip(*(synthetic_sample(self.seed, i, self.image_size) for i in idx))
            yield {"image": torch.stack(images), "text": self.tokenizer(list(captions)),
                   "keys": [f"syn-{i:08d}" for i in idx], "captions": list(captions)}

    def stats(self) -> dict[str, Any]:
        return {}
