"""The one batch type that crosses actor boundaries, the knowledge request, and the knowledge returned.

Arrays travel as numpy through Ray's object store (zero-copy, read-only on arrival: copy before
writing). `TokenBatch.check()` enforces shape and dtype consistency at both ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class TokenBatch:
    """A batch of tokenized examples.

    Attributes:
        input_ids: [B, L] int64 token ids.
        attention_mask: [B, L] int64, 1 for real tokens.
        ids: [B] int64 example ids (stable row ids of the split).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    ids: np.ndarray

    def check(self) -> "TokenBatch":
        """Validate shapes and dtypes.

        Raises:
            ValueError: mismatched shapes or non-integer arrays.
        """
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(f"input_ids {self.input_ids.shape} and attention_mask {self.attention_mask.shape} "
                             f"must both be [B, L]")
        if self.ids.shape != (self.input_ids.shape[0],):
            raise ValueError(f"ids {self.ids.shape} must be [B] with B = {self.input_ids.shape[0]}")
        for name in ("input_ids", "attention_mask", "ids"):
            if getattr(self, name).dtype.kind not in "iu":
                raise ValueError(f"{name} must be an integer array, got {getattr(self, name).dtype}")
        return self

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class KnowledgeRequest:
    """What a teacher should return for a batch.

    Attributes:
        outputs: which outputs; this release serves soft labels ("logits").
        wire_dtype: dtype of floating arrays on the wire.
    """

    outputs: tuple[Literal["logits"], ...] = ("logits",)
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclass
class Knowledge:
    """A teacher's answer for one batch.

    Attributes:
        teacher: the serving teacher's index in the pool.
        logits: [B, C] float (soft labels before temperature); [B, 1] for regression.
        compute_s: seconds the teacher spent in its forward pass (excludes queueing and transfer).
        wait_s: seconds the caller blocked waiting for it (set by the pool on receipt).
    """

    teacher: int
    logits: np.ndarray
    compute_s: float
    wait_s: float = field(default=0.0)
