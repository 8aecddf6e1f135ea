"""The training loop of the pixel-policy benchmarks (cameras_bc.py, pixels_downscale.py): the
trainer's way for a recipe's model (its standardized core `model.net` on the inputs
`training_tensors` prepared, AdamW, a seeded shuffle per epoch, the recipe's augmentation),
without the harness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def fit_net(recipe: Any, model: Any, x: dict, y: torch.Tensor, hp: Any,
            on_epoch: Callable[[int, float], None] | None = None, seed: int = 0) -> float:
    """Train `model.net` on (x, y) for hp.epochs (shuffles and augmentation seeded by `seed`);
    the seconds it took."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    step = 0
    for epoch in range(hp.epochs):
        model.net.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), hp.batch_size):
            batch = order[i:i + hp.batch_size]
            # The trainer's augmentation, keyed (seed, rank, step) as there (hp.random_shift).
            inputs = recipe.augment({k: v[batch] for k, v in x.items()}, hp, (seed, 0, step))
            step += 1
            loss = recipe.training_loss(model.net(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, time.perf_counter() - started)
    model.eval()
    return time.perf_counter() - started
