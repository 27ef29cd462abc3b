"""A fine-tuned teacher that serves knowledge for batches; run as a Ray actor by `TeacherPool`."""

from __future__ import annotations

import threading
import time

import numpy as np
import ray
import torch

from actors import selection
from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch


def to_wire(t: torch.Tensor, wire_dtype: str) -> np.ndarray:
    """A float tensor as a numpy array in the wire dtype (bfloat16 is rounded, then travels as float32)."""
    t = t.float()
    if wire_dtype == "bfloat16":
        t = t.to(torch.bfloat16).float()
    elif wire_dtype == "float16":
        t = t.half()
    return t.cpu().numpy()


def _gpu_reserved() -> bool:
    """Whether this process may use a GPU: in-process always; as a Ray actor only with GPUs reserved (Ray
    2.60 leaves CUDA_VISIBLE_DEVICES alone for actors without GPUs, so they would share a student's GPU)."""
    return not ray.is_initialized() or bool(ray.get_gpu_ids())


def remote_teacher():
    """`Teacher` as a Ray actor class: a threaded actor whose knowledge requests (up to 16 at a time, the rest
    queued by Ray) wait for the teacher's compute slots inside, while `stats`, `ping` and `dims` run in
    their own "control" thread and answer at once."""
    return ray.remote(max_concurrency=16, concurrency_groups={"control": 1})(Teacher)


class _AlignedStates:
    """`hidden_states[l]` in the student's tokens, aligned on first use: A @ h ([B, L_s, L_t] @ [B, L_t, D])."""

    def __init__(self, states, align: torch.Tensor) -> None:
        self.states, self.align, self.done = states, align, {}

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.done:
            self.done[layer] = torch.bmm(self.align, self.states[layer].float()).to(self.states[layer].dtype)
        return self.done[layer]


class Teacher:
    """Holds one fine-tuned teacher in inference mode and answers knowledge requests.

    The same class runs in-process (benchmarks, tests) or as a Ray actor (`remote_teacher()`).
    Teachers of different depth, width and head count can serve the same request: each maps the
    student layers to its own depth and returns its own hidden size and heads.

    Args:
        index: the teacher's position in the ensemble (echoed in every answer).
        checkpoint: a `save_pretrained` folder.
        num_labels: C.
        regression: the checkpoint is a regression head (1 output).
        threads: torch intra-op threads on CPU.
        device: "cuda" or "cpu"; "auto" picks cuda when torch sees a GPU and (as a Ray actor) one was reserved.
        attn_implementation: None keeps transformers' default (sdpa: fastest for logits and hidden
            states); "eager" is needed to serve attentions or the cls-attention token modes.
        slots: forward passes run at once (the actor is threaded: `remote_teacher`); further requests wait in
            this actor's queue (`stats()["queued"]`). More than 1 lets one teacher serve several students'
            requests in parallel (each pass uses `threads` cores on CPU).
        autocast: "bfloat16" or "float16" runs the forward pass under `torch.autocast` in that dtype (matmuls
            and attention in half precision, weights kept in float32; what GPUs with tensor cores run fast);
            None: float32. Answers leave as float32 (or the request's wire dtype) either way.
        vocab: `vocab_fingerprint` of this teacher's tokenizer: each batch is read in its view of that
            tokenizer (`TokenBatch.view`); "" reads the batch's `input_ids` whatever their tokenizer.
    """

    def __init__(self, index: int, checkpoint: str, num_labels: int, regression: bool = False, threads: int = 1,
                 device: str = "auto", attn_implementation: str | None = None, slots: int = 1,
                 autocast: str | None = None, vocab: str = "") -> None:
        from actors.models import load_classifier

        self.index, self.vocab = index, vocab
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and _gpu_reserved() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.attn_implementation = attn_implementation
        if autocast not in (None, "none", "bfloat16", "float16"):
            raise ValueError(f"autocast={autocast!r}: use None, 'bfloat16' or 'float16'")
        self.autocast = None if autocast in (None, "none") else getattr(torch, autocast)
        self.model = load_classifier(checkpoint, num_labels, regression=regression,
                                     attn_implementation=attn_implementation).to(self.device).eval()
        config = self.model.config
        self.num_layers = int(config.num_hidden_layers)  # L_t
        self.hidden_size = int(config.hidden_size)  # D_t
        self.num_heads = int(config.num_attention_heads)  # H_t
        self.requests, self.examples, self.compute_s = 0, 0, 0.0  # served so far (see `stats`)
        self._slots, self._lock = threading.Semaphore(slots), threading.Lock()
        self.slots, self.queued, self.running = slots, 0, 0

    @ray.method(concurrency_group="control")
    def dims(self) -> dict[str, int]:
        """The teacher's shape: {"num_layers": L_t, "hidden_size": D_t, "num_heads": H_t}.

        The trainer uses it to build `HiddenProjection` (one map per teacher width) before training.
        """
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "num_heads": self.num_heads}

    def knowledge(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Knowledge:
        """The answer of `_answer` once one of the `slots` is free (requests beyond them wait, counted)."""
        with self._lock:
            self.queued += 1
        with self._slots:
            with self._lock:
                self.queued, self.running = self.queued - 1, self.running + 1
            try:
                return self._answer(batch, request)
            finally:
                with self._lock:
                    self.running -= 1

    @torch.inference_mode()
    def _answer(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Knowledge:
        """Run the teacher on a batch and return what the request asks for, selected on this actor.

        One forward pass; hidden states and attentions are computed only when the request needs them.
        Depth: student layer l is served by teacher layer `selection.map_layer(l, L_s, L_t)`. Length and
        width: `selection.select_tokens`, `selection.select_width` and `selection.gather` (the same
        functions the trainer applies to the student). Liu et al., ACL 2021.

        Args:
            batch: [B, L] token ids and mask.
            request: outputs, selection and wire dtype (see `KnowledgeRequest`).

        Returns:
            `Knowledge` with the requested arrays (shapes in its docstring); floats in
            `request.wire_dtype` (bfloat16 travels as float32 since numpy has no bfloat16; values are
            rounded to bfloat16 first).

        Raises:
            ValueError: a bad batch or request, or attentions asked of a non-eager teacher.
        """
        request.check()
        batch = batch.check().view(self.vocab)
        if request.needs_tokens and batch.student is not None and (
                batch.align is None or "attentions" in request.outputs):
            raise ValueError(f"teacher {self.index} tokenizes with another tokenizer than the student: its hidden "
                             f"states need the batch's alignment to the student's tokens (orchestrator.driver.inputs."
                             f"with_views(align=True)), and its attentions are not aligned; ask logits, cls and "
                             f"hidden of it")
        start = time.perf_counter()
        want_tokens = request.needs_tokens
        want_attn = "attentions" in request.outputs or (want_tokens and request.tokens.startswith("cls-attention"))
        want_hidden = "hidden" in request.outputs or "cls" in request.outputs
        if want_attn and self.attn_implementation != "eager":
            raise ValueError(f"teacher {self.index} runs attn_implementation={self.attn_implementation!r}, which "
                             f"returns no attentions: start it with attn_implementation='eager'")
        ids = torch.tensor(batch.input_ids, device=self.device)  # [B, L] (copy: object-store arrays are read-only)
        mask = torch.tensor(batch.attention_mask, device=self.device)  # [B, L]
        half = self.autocast or torch.bfloat16  # (unused when disabled)
        with torch.autocast(self.device.type, dtype=half, enabled=self.autocast is not None):
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=want_hidden,
                             output_attentions=want_attn)
        wire = request.wire_dtype
        answer = Knowledge(self.index, to_wire(out.logits, wire) if "logits" in request.outputs else None, 0.0)

        if request.needs_layers:
            layers = selection.map_layers(request.student_layers, request.student_num_layers, self.num_layers)
            answer.layers = np.asarray(layers, dtype=np.int64)  # [k]
        states = out.hidden_states
        if want_tokens:
            cls_scores = selection.cls_attention(out.attentions) if request.tokens.startswith("cls-") else None
            if batch.align is not None:  # hidden states and the length selection in the student's tokens
                states, cls_scores, ids, mask = self._student_space(batch, states, cls_scores)
            token_index, token_mask = selection.select_tokens(mask, request.num_tokens, request.tokens, cls_scores,
                                                              ids, request.sep_token_id)  # [B, K] each
            answer.token_index = token_index.cpu().numpy()
            answer.token_mask = token_mask.cpu().numpy()
        if "hidden" in request.outputs:
            hidden, widths = [], []
            for l in layers:
                h = states[l]  # [B, L, D_t] (L: the student's length when aligned)
                w = None
                if request.width != "all":
                    kept = selection.gather(h, token_index) if request.width == "magnitude" else None  # [B, K, D_t]
                    w = selection.select_width(request.width, self.hidden_size, request.width_fraction,
                                               request.width_seed, hidden=kept, token_mask=token_mask)  # [W]
                    w = w.to(self.device).expand(h.shape[0], -1)  # [B, W]: per example, so batches split cleanly
                    widths.append(w)
                hidden.append(selection.gather(h, token_index, w))  # [B, K, W]
            answer.hidden = to_wire(torch.stack(hidden, dim=1), wire)  # [B, k, K, W]
            if widths:
                answer.width_index = torch.stack(widths, dim=1).cpu().numpy()  # [B, k, W]
        if "attentions" in request.outputs:
            rows = [selection.gather_attention(out.attentions[l - 1], token_index) for l in layers]  # [B, H_t, K, L]
            answer.attentions = to_wire(torch.stack(rows, dim=1), wire)  # [B, k, H_t, K, L]
        if "cls" in request.outputs:
            answer.cls = to_wire(torch.stack([out.hidden_states[l][:, 0] for l in layers], dim=1), wire)  # [B, k, D_t]
        answer.compute_s = time.perf_counter() - start
        with self._lock:
            self.requests, self.examples = self.requests + 1, self.examples + batch.size
            self.compute_s += answer.compute_s
        return answer

    def _student_space(self, batch: TokenBatch, states, cls_scores):
        """Hidden states and [CLS]-attention scores moved to the student's tokens by the view's alignment
        (`actors.alignment`: each student token averages the teacher tokens its characters overlap).

        Returns:
            (hidden states: per layer [B, L_s, D_t] (only the layers the request reads are aligned; a dict
            by layer), scores [B, L_s] or None, the student's input_ids [B, L_s], and its attention mask with
            unmatched student tokens set to 0, so they are neither selected nor taught).
        """
        align = torch.tensor(batch.align, device=self.device)  # [B, L_s, L_t]
        student = batch.student
        matched = (align.sum(dim=2) > 0).long()  # [B, L_s]
        mask = torch.tensor(student.attention_mask, device=self.device) * matched
        ids = torch.tensor(student.input_ids, device=self.device)
        aligned = _AlignedStates(states, align)
        scores = None if cls_scores is None else torch.bmm(align, cls_scores.float()[:, :, None])[:, :, 0]
        return aligned, scores, ids, mask

    @ray.method(concurrency_group="control")
    def stats(self) -> dict[str, float]:
        """What this teacher served and where: {"requests", "examples", "compute_s" (seconds in forward
        passes), "queued" (requests waiting for a slot now), "running", "slots", "device", "node" (the Ray
        node id; None in-process without Ray)}, and its process's use: "clock_s" (this process's monotonic
        clock, seconds), "cpu_s" (CPU seconds of all its threads), "rss_bytes" (resident memory),
        "gpu_memory_bytes" (torch's allocated CUDA memory; 0 on CPU). Answered at once, not behind queued
        requests."""
        import psutil

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        return {"requests": self.requests, "examples": self.examples, "compute_s": self.compute_s,
                "queued": self.queued, "running": self.running, "slots": self.slots,
                "device": str(self.device), "node": node, "clock_s": time.monotonic(),
                "cpu_s": time.process_time(), "rss_bytes": psutil.Process().memory_info().rss,
                "gpu_memory_bytes": gpu}

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        """Liveness check used by the pool after start-up; returns the teacher index."""
        return self.index
