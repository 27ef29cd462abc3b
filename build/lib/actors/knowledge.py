"""The one batch type that crosses actor boundaries, the knowledge request, the knowledge returned, and the
`KnowledgeSource` interface every provider of knowledge implements (the teacher pool, the cache reader).

Arrays travel as numpy through Ray's object store (zero-copy, read-only on arrival: copy before
writing). `TokenBatch.check()` enforces shape and dtype consistency at both ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TokenBatch:
    """A batch of tokenized examples.

    The same rows can travel in several tokenizers' tokens: `input_ids` are the student's (tokenizer
    `vocab`), `views` the others' that some teacher uses. A teacher reads its own with `view`.

    Attributes:
        input_ids: [B, L] int64 token ids.
        attention_mask: [B, L] int64, 1 for real tokens.
        ids: [B] int64 example ids (stable row ids of the split).
        vocab: `vocab_fingerprint` of the tokenizer of `input_ids` ("" when unknown: every teacher reads them).
        views: vocab fingerprint -> (input_ids [B, L_v], attention_mask [B, L_v]) of the same rows, plus
            align [B, L, L_v] float32 (`actors.alignment.align_matrix`) when hidden states are aligned.
        align: in a view (`view`), the [B, L, L_v] averaging matrix from this view's tokens to the student's
            (None: not aligned); the student's own `attention_mask` and `input_ids` travel as `student`.
        student: in a view, the student-token batch it was taken from (for selecting in the student's tokens).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    ids: np.ndarray
    vocab: str = ""
    views: dict | None = None
    align: np.ndarray | None = None
    student: "TokenBatch | None" = None

    @classmethod
    def of(cls, batch: dict) -> "TokenBatch":
        """The token part of a padded batch dict (`input_ids`, `attention_mask` [B, L], `ids` [B], and
        `vocab` / `views` when present; other keys such as `labels` stay with the student)."""
        return cls(batch["input_ids"], batch["attention_mask"], batch["ids"], batch.get("vocab", ""),
                   batch.get("views") or None)

    def view(self, vocab: str) -> "TokenBatch":
        """These rows in the tokens of tokenizer `vocab` (a plain batch without views).

        Raises:
            ValueError: the batch carries no view for that tokenizer (the driver did not tokenize for it).
        """
        if not vocab or not self.vocab or vocab == self.vocab:
            return TokenBatch(self.input_ids, self.attention_mask, self.ids, self.vocab) if self.views else self
        if not self.views or vocab not in self.views:
            raise ValueError(f"this batch is in tokenizer {self.vocab}'s tokens and has no view for tokenizer "
                             f"{vocab}: the driver tokenizes for every teacher of the plan (orchestrator.driver.inputs."
                             f"with_views); a teacher that joined later with another tokenizer cannot be served")
        ids, mask, *align = self.views[vocab]
        plain = TokenBatch(self.input_ids, self.attention_mask, self.ids, self.vocab)
        return TokenBatch(ids, mask, self.ids, vocab, align=align[0] if align else None, student=plain)

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
        for fp, (ids, mask, *align) in (self.views or {}).items():
            if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] != self.input_ids.shape[0]:
                raise ValueError(f"view {fp}: input_ids {ids.shape} and attention_mask {mask.shape} must both be "
                                 f"[B, L_v] with B = {self.input_ids.shape[0]}")
            if align and align[0].shape != (*self.input_ids.shape, ids.shape[1]):
                raise ValueError(f"view {fp}: align {align[0].shape} must be [B, L, L_v] = "
                                 f"{(*self.input_ids.shape, ids.shape[1])}")
        return self

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


OUTPUTS = ("logits", "hidden", "attentions", "cls")  # canonical order
LAYER_OUTPUTS = ("hidden", "attentions", "cls")
TOKEN_MODES = ("all", "first", "cls-attention", "cls-attention-no-sep")
WIDTH_MODES = ("all", "random", "even", "magnitude")
WIRE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class KnowledgeRequest:
    """What a teacher should return for a batch, and which hidden-state knowledge to keep.

    `KnowledgeRequest()` asks for soft labels only, in float32. Hidden states, attentions and [CLS]
    states are served at the teacher layers that the student layers map to (depth), for K tokens
    (length) and a fraction of the dims (width), selected on the teacher (Liu et al. 2021; see
    `actors.selection`). Settings that the requested outputs do not use are ignored (e.g. `width` when
    only attentions are asked for), so `subset` can drop outputs without touching the selection.

    Attributes:
        outputs: subset of "logits", "hidden", "attentions", "cls" (non-empty, no repeats).
        student_layers: 1-based student layers that receive hidden/attention/cls losses, ascending.
        student_num_layers: L_s; each teacher maps layer l to round(l * L_t / L_s) (half up), clamped.
        tokens: all | first | cls-attention | cls-attention-no-sep.
        num_tokens: K (required unless tokens == "all", where it must be None).
        sep_token_id: the [SEP] id, required for cls-attention-no-sep.
        width: all | random | even | magnitude.
        width_fraction: fraction of the teacher's hidden dims kept, (0, 1]; 1.0 when width == "all".
        width_seed: seed of the fixed random set (>= 0).
        wire_dtype: dtype of floating arrays on the wire (bfloat16 travels as float32 after rounding).
    """

    outputs: tuple[str, ...] = ("logits",)
    student_layers: tuple[int, ...] = ()
    student_num_layers: int = 0
    tokens: str = "all"
    num_tokens: int | None = None
    sep_token_id: int | None = None
    width: str = "all"
    width_fraction: float = 1.0
    width_seed: int = 0
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        # lists from YAML/JSON become tuples so the request stays hashable
        if isinstance(self.outputs, str):
            object.__setattr__(self, "outputs", (self.outputs,))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "student_layers", tuple(self.student_layers))

    @property
    def needs_layers(self) -> bool:
        """Whether any per-layer output (hidden, attentions, cls) is requested."""
        return any(o in LAYER_OUTPUTS for o in self.outputs)

    @property
    def needs_tokens(self) -> bool:
        """Whether token selection applies (hidden or attentions requested)."""
        return "hidden" in self.outputs or "attentions" in self.outputs

    def check(self) -> "KnowledgeRequest":
        """Validate every field and combination; returns self.

        Raises:
            ValueError: naming the field and the fix, e.g. unknown outputs, layer outputs without
                student_layers, num_tokens missing for a token mode, a bad width fraction.
        """
        if not self.outputs:
            raise ValueError(f"outputs is empty: ask for at least one of {OUTPUTS}")
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"outputs has unknown {unknown}: choose from {OUTPUTS}")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs {self.outputs} repeats an entry: list each output once")
        if not all(isinstance(l, (int, np.integer)) and not isinstance(l, bool) for l in self.student_layers):
            raise ValueError(f"student_layers {self.student_layers} must be integers")
        if not isinstance(self.student_num_layers, (int, np.integer)) or self.student_num_layers < 0:
            raise ValueError(f"student_num_layers = {self.student_num_layers} must be an integer >= 0")
        if self.needs_layers:
            if not self.student_layers:
                raise ValueError(f"outputs {self.outputs} need student_layers: name the 1-based student layers "
                                 f"that receive hidden/attention/cls losses, e.g. (L_s,)")
            if self.student_num_layers < 1:
                raise ValueError("student_num_layers must be set (>= 1) when hidden/attentions/cls are requested, "
                                 "so each teacher can map student layers to its own depth")
        if self.student_layers:
            if list(self.student_layers) != sorted(set(self.student_layers)):
                raise ValueError(f"student_layers {self.student_layers} must be strictly ascending without repeats")
            if self.student_num_layers < 1 or not (1 <= self.student_layers[0]
                                                   and self.student_layers[-1] <= self.student_num_layers):
                raise ValueError(f"student_layers {self.student_layers} must lie in [1, student_num_layers = "
                                 f"{self.student_num_layers}]: fix the layers or set student_num_layers to L_s")
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens = {self.tokens!r}: choose from {TOKEN_MODES}")
        if self.tokens == "all":
            if self.num_tokens is not None:
                raise ValueError(f"num_tokens = {self.num_tokens} has no effect with tokens = 'all': set num_tokens "
                                 f"to None or pick tokens = 'first' / 'cls-attention' / 'cls-attention-no-sep'")
        elif not isinstance(self.num_tokens, (int, np.integer)) or isinstance(self.num_tokens, bool) \
                or self.num_tokens < 1:
            raise ValueError(f"num_tokens = {self.num_tokens!r} must be an integer >= 1 (K) for tokens = "
                             f"{self.tokens!r}")
        if self.tokens == "cls-attention-no-sep" and self.sep_token_id is None:
            raise ValueError("sep_token_id is required for tokens = 'cls-attention-no-sep': pass "
                             "tokenizer.sep_token_id")
        if self.width not in WIDTH_MODES:
            raise ValueError(f"width = {self.width!r}: choose from {WIDTH_MODES}")
        if not isinstance(self.width_fraction, (int, float)) or not 0.0 < self.width_fraction <= 1.0:
            raise ValueError(f"width_fraction = {self.width_fraction!r} must be in (0, 1]")
        if self.width == "all" and self.width_fraction != 1.0:
            raise ValueError(f"width_fraction = {self.width_fraction} needs a width mode: set width to "
                             f"'random', 'even' or 'magnitude', or width_fraction to 1.0")
        if not isinstance(self.width_seed, (int, np.integer)) or self.width_seed < 0:
            raise ValueError(f"width_seed = {self.width_seed!r} must be an integer >= 0")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype = {self.wire_dtype!r}: choose from {WIRE_DTYPES}")
        return self

    def fingerprint(self) -> dict:
        """A canonical JSON-able dict of all fields (outputs in canonical order), for cache keys."""
        return {
            "outputs": [o for o in OUTPUTS if o in self.outputs],
            "student_layers": [int(l) for l in self.student_layers],
            "student_num_layers": int(self.student_num_layers),
            "tokens": self.tokens,
            "num_tokens": None if self.num_tokens is None else int(self.num_tokens),
            "sep_token_id": None if self.sep_token_id is None else int(self.sep_token_id),
            "width": self.width,
            "width_fraction": float(self.width_fraction),
            "width_seed": int(self.width_seed),
            "wire_dtype": self.wire_dtype,
        }

    def subset(self, outputs: tuple[str, ...] | None = None,
               student_layers: tuple[int, ...] | None = None) -> "KnowledgeRequest":
        """The same selection with fewer outputs and/or layers (e.g. one schedule stage's layers).

        Args:
            outputs: a subset of `self.outputs`; None keeps them.
            student_layers: a subset of `self.student_layers`; None keeps them. An empty tuple drops the
                per-layer outputs (hidden, attentions, cls).

        Returns:
            A checked `KnowledgeRequest`.

        Raises:
            ValueError: outputs or layers not in this request, or the result fails `check`.
        """
        outputs = self.outputs if outputs is None else tuple(outputs)
        layers = self.student_layers if student_layers is None else tuple(sorted(student_layers))
        extra = [o for o in outputs if o not in self.outputs]
        if extra:
            raise ValueError(f"subset outputs {extra} are not in this request's outputs {self.outputs}")
        extra = [l for l in layers if l not in self.student_layers]
        if extra:
            raise ValueError(f"subset student_layers {extra} are not in this request's {self.student_layers}")
        if not layers:
            outputs = tuple(o for o in outputs if o not in LAYER_OUTPUTS)
        return replace(self, outputs=outputs, student_layers=layers).check()


@dataclass
class Knowledge:
    """A teacher's answer for one batch.

    Shapes: B batch, L its sequence length, C classes, k requested student layers, K kept tokens,
    W kept dims (D_t when width == "all"), H_t and D_t the serving teacher's heads and hidden size.
    Floating arrays are in the request's wire dtype (bfloat16 travels as float32).

    Attributes:
        teacher: the serving teacher's index in the pool.
        logits: [B, C] float (soft labels before temperature); [B, 1] for regression. None when the
            request did not ask for logits.
        compute_s: seconds the teacher spent in its forward pass (excludes queueing and transfer).
        wait_s: seconds the caller blocked waiting for it (set by the pool on receipt).
        layers: [k] int64 teacher `hidden_states` indices (1..L_t) serving `request.student_layers`
            in order (attention of layer l is the l-th block's self-attention).
        hidden: [B, k, K, W] selected hidden states; slots with token_mask 0 hold position 0's values.
        token_index: [B, K] int64 positions into L; unused slots 0. Present with hidden or attentions.
        token_mask: [B, K] int64, 1 for kept real tokens (a short example has trailing 0s).
        width_index: [B, k, W] int64 kept dims, ascending; None when width == "all".
        attentions: [B, k, H_t, K, L] attention probabilities of the kept query tokens over all keys.
        cls: [B, k, D_t] full-width [CLS] hidden state at the mapped layers.
    """

    teacher: int
    logits: np.ndarray | None
    compute_s: float
    wait_s: float = field(default=0.0)
    layers: np.ndarray | None = None
    hidden: np.ndarray | None = None
    token_index: np.ndarray | None = None
    token_mask: np.ndarray | None = None
    width_index: np.ndarray | None = None
    attentions: np.ndarray | None = None
    cls: np.ndarray | None = None

    ARRAYS = ("logits", "layers", "hidden", "token_index", "token_mask", "width_index", "attentions", "cls")

    def nonfinite_rows(self) -> np.ndarray:
        """[R] int64 batch rows (0..B-1, ascending) where any floating array (logits, hidden, attentions,
        cls) holds a NaN or an infinity; empty when every value is finite."""
        bad = None
        for name in ("logits", "hidden", "attentions", "cls"):
            a = getattr(self, name)
            if a is None or not np.issubdtype(a.dtype, np.floating):
                continue
            rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)  # [B]
            bad = rows if bad is None else bad | rows
        return np.flatnonzero(bad) if bad is not None else np.zeros(0, dtype=np.int64)

    def nbytes(self) -> int:
        """Bytes of all arrays present (what crosses the wire or lands in the cache)."""
        return int(sum(getattr(self, name).nbytes for name in self.ARRAYS if getattr(self, name) is not None))


@runtime_checkable
class PendingKnowledge(Protocol):
    """Knowledge asked for and not yet received (a teacher call in flight, or a cache read not yet done)."""

    def result(self) -> Knowledge:
        """Block until the knowledge is there and return it (`wait_s` set to the seconds blocked)."""
        ...


@runtime_checkable
class KnowledgeSource(Protocol):
    """Where a trainer gets teacher knowledge: the teacher pool (`actors.pool.TeacherPool`, online) or an
    offline cache (`actors.cache.CacheReader`). The training loop and the knowledge feed see only this.

    Teacher indices are positions in `names` (the ensemble in config order). Implementations are
    picklable, so the driver can hand one to Ray Train workers and Tune trials. A source of Ray actors may
    also offer `actor_state(k) -> (state, restarts) | None` (`actors.pool.TeacherPool.actor_state`): the
    feed then takes a dropped teacher back once Ray has restarted its actor.
    """

    @property
    def names(self) -> list[str]:
        """Teacher names, [N], in ensemble order."""
        ...

    def live(self) -> list[int]:
        """Indices of the teachers that can serve now (ascending)."""
        ...

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> PendingKnowledge:
        """Ask teacher k for the knowledge of one batch without waiting. Its `result()` raises
        `actors.errors.TeacherLostError` when k can no longer serve."""
        ...

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest(),
                       teachers: list[int] | None = None) -> PendingKnowledge:
        """Ask `teachers` (default: every live one); `result()` holds their logits averaged ([B, C] float32,
        teacher -1)."""
        ...

    def close(self) -> None:
        """Release what the source holds (actors, memory maps); the opener calls it once."""
        ...


def average_logits(parts: Sequence[Knowledge], wait_s: float) -> Knowledge:
    """Multi-teacher averaging of soft labels (as TextBrewer's MultiTeacherDistiller): the mean of the
    teachers' logits, [B, C] float32, as one `Knowledge` with teacher -1 and the slowest compute time."""
    logits = np.mean([p.logits.astype(np.float32) for p in parts], axis=0)  # [B, C]
    return Knowledge(-1, logits, max(p.compute_s for p in parts), wait_s)
