"""GLUE task definitions and the token ids both sides use: `TaskSpec` (columns, labels, metric), the
encoded rows a worker batches (`Encoded`), and the marks of unlabelled transfer rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence
import numpy as np
from actors.errors import DataError
from orchestrator.config import DataConfig


@dataclass(frozen=True)
class TaskSpec:
    """A task's columns, labels and metric.

    `columns` are (text_a, text_b or None, label) as header names, or 0-based indices for header-less
    files (CoLA). `labels` lists the raw label strings in class order; None means regression. `names` are
    the labels people read, in the same order (GLUE's class names, as the `glue` dataset on the hub names
    them); None: the raw labels. They become the saved model's `id2label` / `label2id`.
    """

    name: str
    folder: str
    columns: tuple[str | int, str | int | None, str | int]
    labels: tuple[str, ...] | None
    metric: str
    has_header: bool = True
    dev_file: str = "dev.tsv"
    hub_columns: tuple[str, str | None] = ("sentence", None)
    hub_dev_split: str = "validation"
    names: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def label_names(self) -> tuple[str, ...] | None:
        """Class names in class order (`names`, else the raw `labels`); None for regression."""
        return self.names or self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", "CoLA", (3, None, 1), ("0", "1"), "mcc", has_header=False,
                 names=("unacceptable", "acceptable")),
        TaskSpec("sst2", "SST-2", ("sentence", None, "label"), ("0", "1"), "accuracy", names=("negative", "positive")),
        TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), ("0", "1"), "f1",
                 hub_columns=("sentence1", "sentence2"), names=("not_equivalent", "equivalent")),
        TaskSpec("stsb", "STS-B", ("sentence1", "sentence2", "score"), None, "pearson",
                 hub_columns=("sentence1", "sentence2")),
        TaskSpec("qqp", "QQP", ("question1", "question2", "is_duplicate"), ("0", "1"), "f1",
                 hub_columns=("question1", "question2"), names=("not_duplicate", "duplicate")),
        TaskSpec("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"),
                 ("entailment", "neutral", "contradiction"), "accuracy", dev_file="dev_matched.tsv",
                 hub_columns=("premise", "hypothesis"), hub_dev_split="validation_matched"),
        TaskSpec("qnli", "QNLI", ("question", "sentence", "label"), ("entailment", "not_entailment"),
                 "accuracy", hub_columns=("question", "sentence")),
        TaskSpec("rte", "RTE", ("sentence1", "sentence2", "label"), ("entailment", "not_entailment"),
                 "accuracy", hub_columns=("sentence1", "sentence2")),
        TaskSpec("wnli", "WNLI", ("sentence1", "sentence2", "label"), ("0", "1"), "accuracy",
                 hub_columns=("sentence1", "sentence2"), names=("not_entailment", "entailment")),
    ]
}


def task_spec(task: str, data: DataConfig) -> TaskSpec:
    """The `TaskSpec` for a GLUE task name, or one built from `data.*` for `task: custom`.

    Raises:
        DataError: unknown task name, or a custom task without text/label columns.
    """
    if task in GLUE_TASKS:
        return GLUE_TASKS[task]
    if task != "custom":
        raise DataError(f"unknown task {task!r} (setting `task`); use one of "
                        f"{', '.join(GLUE_TASKS)} or 'custom' with data.text_column/label_column")
    if not data.text_column or not data.label_column:
        raise DataError("task 'custom' needs data.text_column and data.label_column "
                        "(and data.text_pair_column for sentence pairs)")
    if data.task_type == "classification" and not data.labels:
        raise DataError("task 'custom' with data.task_type=classification needs data.labels, "
                        "the label values in class order, e.g. [negative, positive]")
    labels = None if data.task_type == "regression" else tuple(str(x) for x in data.labels or ())
    metric = "pearson" if labels is None else "accuracy"
    return TaskSpec("custom", "", (data.text_column, data.text_pair_column, data.label_column), labels, metric,
                    hub_columns=(data.text_column, data.text_pair_column))


UNLABELLED = -100
"""The class index of a transfer row (no label); regression transfer rows hold NaN."""


def is_labelled(labels: np.ndarray) -> np.ndarray:
    """[N] bool: which rows carry a label (class index >= 0, or a finite score)."""
    labels = np.asarray(labels)
    return np.isfinite(labels) if labels.dtype.kind == "f" else labels >= 0


TRANSFER_ID_BASE = 1 << 40
"""Example ids of transfer-file rows start here, apart from any split's row ids (caches key on ids)."""


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists to their longest member: (input_ids, attention_mask), each [B, L] int64."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class Encoded:
    """Tokenized examples, unpadded: `input_ids[i]` is a list of token ids (length <= max_length).

    `labels` [N] and `ids` [N] as in `Examples`. `vocab` is the `vocab_fingerprint` of the tokenizer that made
    `input_ids` (the student's). `views` holds the same rows tokenized by each other tokenizer the teachers
    use: vocab fingerprint -> (token id lists, that tokenizer's pad id); teachers that share a tokenizer share
    one view, and a teacher with the student's tokenizer reads `input_ids` itself.
    """

    input_ids: list[list[int]]
    labels: np.ndarray
    ids: np.ndarray
    vocab: str = ""
    views: dict[str, tuple[list[list[int]], int, list | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: Sequence[int] | np.ndarray, pad_id: int) -> dict:
        """Pad the chosen rows to their longest member, in the student's tokens and in every view.

        Returns:
            `input_ids`, `attention_mask` [B, L] int64, `labels` [B], `ids` [B] int64, `vocab` (str), and
            `views` {vocab fingerprint: (input_ids [B, L_v], attention_mask [B, L_v])} when there are views
            (each padded to its own longest row, with its own pad id).
        """
        rows = np.asarray(rows)
        ids, mask = pad([self.input_ids[i] for i in rows], pad_id)
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels[rows], "ids": self.ids[rows],
               "vocab": self.vocab}
        if self.views:
            out["views"] = {fp: self._view(rows, ids.shape[1], *view) for fp, view in self.views.items()}
        return out


    def _view(self, rows: np.ndarray, student_len: int, seqs: list, pad_id: int, pairs: list | None) -> tuple:
        """One view of `rows`: (input_ids, attention_mask [B, L_v]) and, when aligned, the [B, L, L_v]
        averaging matrix to the student's tokens (`actors.alignment.align_matrix`)."""
        from actors.alignment import align_matrix

        ids, mask = pad([seqs[i] for i in rows], pad_id)
        if pairs is None:
            return ids, mask
        return ids, mask, align_matrix([pairs[i] for i in rows], student_len, ids.shape[1])

    def select(self, keep: np.ndarray) -> "Encoded":
        """The rows at positions `keep`, views and alignments included."""
        return Encoded([self.input_ids[i] for i in keep], self.labels[keep], self.ids[keep], self.vocab,
                       {fp: ([seqs[i] for i in keep], p, None if pairs is None else [pairs[i] for i in keep])
                        for fp, (seqs, p, pairs) in self.views.items()})
