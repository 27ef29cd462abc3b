"""A fine-tuned teacher that serves knowledge for batches; run as a Ray actor by `TeacherPool`."""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch


class Teacher:
    """Holds one fine-tuned teacher in inference mode and answers knowledge requests.

    The same class runs in-process (benchmarks, tests) or as a Ray actor (`ray.remote(Teacher)`).

    Args:
        index: the teacher's position in the ensemble (echoed in every answer).
        checkpoint: a `save_pretrained` folder.
        num_labels: C.
        regression: the checkpoint is a regression head (1 output).
        threads: torch intra-op threads on CPU.
        device: "cuda" or "cpu"; "auto" picks cuda when visible.
    """

    def __init__(self, index: int, checkpoint: str, num_labels: int, regression: bool = False, threads: int = 1,
                 device: str = "auto") -> None:
        from orchestrator.models import load_classifier

        self.index = index
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = load_classifier(checkpoint, num_labels, regression=regression).to(self.device).eval()

    @torch.inference_mode()
    def knowledge(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Knowledge:
        """Run the teacher on a batch and return what the request asks for.

        Args:
            batch: [B, L] token ids and mask.
            request: which outputs and wire dtype.

        Returns:
            `Knowledge` with logits [B, C] in `request.wire_dtype` (bfloat16 travels as float32 since
            numpy has no bfloat16; values are rounded to bfloat16 first).
        """
        batch.check()
        start = time.perf_counter()
        ids = torch.tensor(batch.input_ids, device=self.device)  # [B, L] (copy: object-store arrays are read-only)
        mask = torch.tensor(batch.attention_mask, device=self.device)  # [B, L]
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # [B, C]
        if request.wire_dtype == "bfloat16":
            logits = logits.to(torch.bfloat16).float()
        elif request.wire_dtype == "float16":
            logits = logits.half()
        out = logits.cpu().numpy()
        return Knowledge(self.index, out, time.perf_counter() - start)

    def ping(self) -> int:
        """Liveness check used by the pool after start-up; returns the teacher index."""
        return self.index

    def device_name(self) -> str:
        return str(self.device)
