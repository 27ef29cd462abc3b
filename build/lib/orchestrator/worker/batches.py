"""The rows of each optimizer step on a Ray Train worker: a seeded permutation per epoch, each rank its share."""

from __future__ import annotations

import numpy as np

from orchestrator.common.task import Encoded


class StepBatches:
    """Deterministic global batches: epoch e uses permutation rng(seed + e) of the rows; a step takes the
    next batch_size * world rows and rank r keeps rows r::world of them.

    `batches(step)` returns the rank's batch of a 0-based step as `Encoded.batch` does (input_ids and
    attention_mask [B, L] int64, labels [B], ids [B]); the last two steps' batches are kept, so the
    knowledge feed can build step t+1's request before the loop needs it without padding it twice.
    """

    def __init__(self, data: Encoded, pad_id: int, batch_size: int, world: int, rank: int, seed: int,
                 per_epoch: int) -> None:
        self.data, self.pad_id, self.global_batch, self.world, self.rank = data, pad_id, batch_size * world, world, rank
        self.seed, self.per_epoch = seed, per_epoch
        self._perm: tuple[int, np.ndarray] | None = None
        self._built: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        if step in self._built:
            return self._built[step]
        epoch, i = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.data)))
        rows = self._perm[1][i * self.global_batch: (i + 1) * self.global_batch]
        self._built = {k: v for k, v in self._built.items() if k >= step - 1}
        self._built[step] = self.data.batch(rows[self.rank:: self.world], self.pad_id)
        return self._built[step]
