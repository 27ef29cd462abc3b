"""GLUE tasks and custom datasets, on the driver: reading, label mapping, the rows a run trains and evaluates on
(subsets, transfer rows, rows held back from training) and tokenization. Teachers of another tokenizer get their
views of the rows in `orchestrator.driver.views`; the task definitions and the encoded rows the workers receive
are `orchestrator.common.task`'s.

Three sources, chosen by `data.source`:
- `glue_dir`: GLUE-format TSV folders as written by the standard GLUE download script (split on TAB,
  no CSV quoting; CoLA has no header; MRPC starts with a UTF-8 byte-order mark).
- `hub`: any `datasets` dataset (GLUE by default: `nyu-mll/glue`), for users with internet.
- `files`: custom TSV/CSV files with named text, optional text-pair and label columns.

Everything returns an `Examples` object (texts, labels, ids); `encode` turns it into padded-per-batch
token ids for training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from actors.errors import DataError
from orchestrator.common.task import (GLUE_TASKS, TRANSFER_ID_BASE, UNLABELLED, Encoded, TaskSpec, is_labelled,
                                      task_spec)
from orchestrator.config import DataConfig

Split = Literal["train", "dev", "holdout"]
"""A split a run reads: the training rows, the dev set, or the training rows held back (`data.holdout`)."""


@dataclass
class Examples:
    """One split of a task: parallel lists of texts and labels, plus stable example ids.

    Shapes: `labels` is [N] int64 class indices, or [N] float32 scores for regression; `ids` is [N]
    int64, the row's position in the source split (stable across subsetting, so caches can key on it).
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    ids: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = np.arange(len(self.text_a), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.text_a)

    def concat(self, other: "Examples | None") -> "Examples":
        """These rows followed by `other`'s (self when other is None).

        Raises:
            DataError: one has a second text column and the other not.
        """
        if other is None:
            return self
        if (self.text_b is None) != (other.text_b is None):
            raise DataError("data.transfer: the transfer rows and the task differ in text columns (pair task "
                            "without data.transfer.text_pair_column, or the reverse)")
        return Examples(self.text_a + other.text_a, None if self.text_b is None else self.text_b + other.text_b,
                        np.concatenate([self.labels, other.labels.astype(self.labels.dtype)]),
                        np.concatenate([self.ids, other.ids]))

    def subset(self, n: int | None, seed: int) -> "Examples":
        """A seeded random subset of `n` rows (all rows, shuffled order, when n >= len)."""
        if n is None:
            return self
        return self.take(np.random.default_rng(seed).permutation(len(self))[: min(n, len(self))])

    def take(self, rows: np.ndarray) -> "Examples":
        """The rows at positions `rows` ([M] int), in that order."""
        text_b = None if self.text_b is None else [self.text_b[i] for i in rows]
        return Examples([self.text_a[i] for i in rows], text_b, self.labels[rows], self.ids[rows])


def train_order(n: int, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The training split's row positions in its seeded shuffle (`data.shuffle_seed`), as (rows training may use,
    rows held back): the last `data.holdout` positions are held back (none without it). The labelled rows are
    the first `data.max_train_samples` of the first part and `data.transfer` `rest` the others, so holding rows
    back leaves both as they were.

    Args:
        n: rows in the training split.

    Raises:
        DataError: the held-back rows would cut into the labelled rows or leave none.
    """
    order = np.random.default_rng(data.shuffle_seed).permutation(n)
    held = data.holdout or 0
    if held and n - held < (data.max_train_samples or 1):
        raise DataError(f"data.holdout: holding back {held} of the {n} training rows leaves {max(n - held, 0)}, "
                        f"fewer than the {data.max_train_samples or 1} to train on (data.max_train_samples); "
                        f"lower data.holdout or data.max_train_samples")
    return order[:n - held], order[n - held:]


def eval_split(data: DataConfig) -> Literal["dev", "holdout"]:
    """The split a run evaluates on: the held-back training rows when `data.holdout` is set, else dev."""
    return "holdout" if data.holdout else "dev"


def _map_labels(raw: Sequence[str], spec: TaskSpec, where: str) -> np.ndarray:
    if spec.labels is None:
        scores = np.empty(len(raw), dtype=np.float32)
        for row, value in enumerate(raw):
            try:
                scores[row] = float(value)
            except ValueError:
                scores[row] = np.nan
            if not np.isfinite(scores[row]):
                raise DataError(f"{where}: row {row + 1} has regression label {str(value)[:40]!r}, which is not a "
                                f"finite number; fix or drop that row")
        return scores
    index = {lab: i for i, lab in enumerate(spec.labels)}
    out = np.empty(len(raw), dtype=np.int64)
    for row, value in enumerate(raw):
        key = str(value).strip()
        if key not in index:
            raise DataError(f"{where}: row {row + 1} has label {key!r}, expected one of {list(spec.labels)} "
                            f"(for custom data set data.labels)")
        out[row] = index[key]
    return out


def _read_table(path: Path, delimiter: str, what: str) -> list[list[str]]:
    """The non-empty rows of a UTF-8 TSV (split on TAB, no quoting: GLUE files hold bare `"`) or CSV
    (standard quoting), header included.

    Raises:
        DataError: missing, non-UTF-8 or empty file.
    """
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; {what}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); save "
                        f"the file as UTF-8") from None
    if delimiter == "\t":
        rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    else:
        csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long text is data, not an error
        rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r]
    if not rows:
        raise DataError(f"data file {path} is empty")
    return rows


def _columns(path: Path, header: list[str], wanted: Sequence[str | None], hint: str) -> list[int | None]:
    """Positions of the `wanted` header names (None stays None).

    Raises:
        DataError: a name the header lacks (the message lists the header and `hint`).
    """
    missing = [c for c in wanted if c is not None and c not in header]
    if missing:
        raise DataError(f"{path}: header lacks column(s) {missing}; found {header}. {hint}")
    return [None if c is None else header.index(c) for c in wanted]


def _check_width(path: Path, rows: list[list[str]], cols: Sequence[int | None], first_line: int, kind: str,
                 delimiter: str) -> None:
    need = max(c for c in cols if c is not None) + 1
    for n, row in enumerate(rows):
        if len(row) < need:
            raise DataError(f"{path}:{n + first_line}: malformed row with {len(row)} field(s), need at least {need} "
                            f"(is this a {kind} file split by {'TAB' if delimiter == chr(9) else repr(delimiter)}?)")


def read_delimited(path: Path, spec: TaskSpec, delimiter: str = "\t") -> Examples:
    """Read a GLUE-format TSV (or a CSV for custom data) into `Examples`.

    TSVs are split on TAB with no quoting (GLUE files hold bare `"`); CSVs use standard CSV quoting.

    Raises:
        DataError: missing file, missing header column, short rows, or unknown labels.
    """
    rows = _read_table(path, delimiter, f"set data.glue_dir (or $GLUE_DIR) to a folder with "
                                        f"{spec.folder or '<task>'}/train.tsv and dev files, or use data.source=hub")
    if spec.has_header:
        header, rows = rows[0], rows[1:]
        cols = _columns(path, header, spec.columns, "Check data.text_column/label_column or the file format")
    else:
        cols = list(spec.columns)
    _check_width(path, rows, cols, 1 + int(spec.has_header), spec.folder or "custom", delimiter)
    a, b, lab = cols
    return Examples([r[a] for r in rows], None if b is None else [r[b] for r in rows],
                    _map_labels([r[lab] for r in rows], spec, str(path)))


def load_transfer(task: str, data: DataConfig) -> Examples | None:
    """The unlabelled transfer rows of `data.transfer` (None when it is unset), labels set to `UNLABELLED`
    (classification) or NaN (regression).

    `rest`: the training rows past `data.max_train_samples` in the same seeded shuffle that picks the labelled
    rows (`Examples.subset`), keeping their split row ids. `file`: a TSV/CSV with a header, its rows' ids
    `TRANSFER_ID_BASE + row`. Both are cut to `transfer.max_rows`.

    Raises:
        DataError: an unreadable file, a missing text column, or no transfer row at all.
    """
    t = data.transfer
    if t is None:
        return None
    spec = task_spec(task, data)
    if t.source == "rest":
        everything = read_split(task, data, "train")
        rest = everything.take(train_order(len(everything), data)[0][data.max_train_samples:])
        texts_a, texts_b, ids = rest.text_a, rest.text_b, rest.ids
        where = f"the {len(everything)}-row training split past its first {data.max_train_samples} rows"
    else:
        path = Path(t.file).expanduser()
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
        rows = _read_table(path, delimiter, "point data.transfer.file at a TSV/CSV of unlabelled text")
        named = [c if isinstance(c, str) else None for c in spec.columns[:2]]
        text = t.text_column or named[0] or "sentence"
        pair = t.text_pair_column or (named[1] if spec.columns[1] is not None else None)
        a, b = _columns(path, rows[0], [text, pair], "Set data.transfer.text_column (and text_pair_column)")
        _check_width(path, rows[1:], [a, b], 2, "transfer", delimiter)
        texts_a = [r[a] for r in rows[1:]]
        texts_b = None if b is None else [r[b] for r in rows[1:]]
        ids = TRANSFER_ID_BASE + np.arange(len(texts_a), dtype=np.int64)
        where = str(path)
    n = len(texts_a) if t.max_rows is None else min(t.max_rows, len(texts_a))
    if n == 0:
        raise DataError(f"data.transfer: {where} holds no rows; point it at more text or drop data.transfer")
    labels = (np.full(n, np.nan, dtype=np.float32) if spec.is_regression
              else np.full(n, UNLABELLED, dtype=np.int64))
    return Examples(texts_a[:n], None if texts_b is None else texts_b[:n], labels, ids[:n])


def _from_hub(spec: TaskSpec, data: DataConfig, split: str) -> Examples:
    import datasets  # heavy import, only for users with internet

    name = data.hub_dataset or "nyu-mll/glue"
    config = data.hub_config or (spec.name if spec.name in GLUE_TASKS else None)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, unknown name, missing split: all user-fixable
        raise DataError(f"could not load dataset {name!r} ({config}) split {split!r} through `datasets`: "
                        f"{exc}. Check data.hub_dataset/hub_config, or use data.source=glue_dir offline") from None
    a, b = spec.hub_columns
    label_col = spec.columns[2] if spec.name == "custom" else "label"
    for col in (a, b, label_col):
        if col is not None and col not in ds.column_names:
            raise DataError(f"dataset {name!r} has no column {col!r}; columns are {ds.column_names}")
    raw = ds[label_col]
    if spec.labels is not None and spec.name != "custom":
        labels = np.asarray(raw, dtype=np.int64)  # GLUE on the hub already holds class indices
        if labels.min() < 0:
            raise DataError(f"dataset {name!r} split {split!r} has no labels (test split?); pick another split")
    else:
        labels = _map_labels([str(x) for x in raw], spec, f"{name}:{split}")
    return Examples(list(ds[a]), None if b is None else list(ds[b]), labels)


def load_split(task: str, data: DataConfig, split: Split) -> Examples:
    """Load the train, dev or held-back split of a task, subset as configured (`max_train_samples`, `holdout`
    etc.).

    Raises:
        DataError: unknown task, missing/malformed files, unknown labels, unreachable hub datasets.
    """
    return subset_split(read_split(task, data, split), data, split)


def read_split(task: str, data: DataConfig, split: Split) -> Examples:
    """Every row of the train or dev split of a task, in the source's order (`load_split` subsets them;
    "holdout" reads the training split, whose held-back rows it is).

    Raises:
        DataError: as `load_split`.
    """
    spec = task_spec(task, data)
    split = "dev" if split == "dev" else "train"
    if data.source == "glue_dir":
        if spec.name == "custom":
            raise DataError("task 'custom' reads data.source=files (train_file/dev_file) or data.source=hub")
        folder = data.resolved_glue_dir() / spec.folder
        examples = read_delimited(folder / ("train.tsv" if split == "train" else spec.dev_file), spec)
    elif data.source == "files":
        path = data.train_file if split == "train" else data.dev_file
        if path is None:
            raise DataError(f"data.source=files needs data.{split}_file")
        path = Path(path).expanduser()
        examples = read_delimited(path, spec, "," if path.suffix.lower() == ".csv" else "\t")
    else:
        hub_split = data.train_split if split == "train" else (data.dev_split or spec.hub_dev_split)
        examples = _from_hub(spec, data, hub_split)
    return examples


def subset_split(examples: Examples, data: DataConfig, split: Split) -> Examples:
    """A whole split's rows as configured: train, a seeded shuffle (`shuffle_seed`) cut to `max_train_samples`;
    dev, `max_dev_samples` rows of a seeded shuffle (all of them, in file order, by default); holdout (`examples`
    is then the training split), the rows `data.holdout` holds back (`train_order`).

    Raises:
        DataError: as `train_order`.
    """
    if split != "dev" and data.holdout:
        train, held = train_order(len(examples), data)
        return examples.take(held if split == "holdout" else train[:data.max_train_samples])
    limit = data.max_train_samples if split == "train" else data.max_dev_samples
    return examples.subset(limit, data.shuffle_seed) if split == "train" or limit else examples


def encode(examples: Examples, tokenizer, max_length: int) -> Encoded:
    """Tokenize with truncation (pairs: longest-first), no padding; padding happens per batch."""
    from actors.models import vocab_fingerprint

    enc = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    return Encoded([list(x) for x in enc["input_ids"]], examples.labels, examples.ids, vocab_fingerprint(tokenizer))


@dataclass
class Inputs:
    """A task's tokenized splits and the tokenizer facts every run needs (made once on the driver).

    Attributes:
        spec: the task; train / dev: the tokenized training and evaluation splits (dev, or the rows
            `data.holdout` holds back); pad_id: the tokenizer's pad token id.
        vocab: `vocab_fingerprint` of the student's tokenizer.
        tokenizer_init: absolute folder or hub id of the tokenizer (workers run in other directories).
        train_examples: the training rows as text, kept so teachers with other tokenizers can get their own
            view of them (`orchestrator.driver.views.with_views`).
        max_length: `data.max_length`.
        alignment_counts: per aligned view (vocab fingerprint): student_tokens, teacher_tokens,
            unmatched_student_tokens, unmatched_teacher_tokens over the training rows (`with_views(align=True)`).
    """

    spec: TaskSpec
    train: Encoded
    dev: Encoded
    pad_id: int
    vocab: str
    tokenizer_init: str
    train_examples: Examples | None = None
    max_length: int = 128
    alignment_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def transfer_rows(self) -> int:
        """Training rows without a label (`data.transfer`), taught by the teachers alone."""
        return int((~is_labelled(self.train.labels)).sum())

    def labelled_only(self) -> "Inputs":
        """These inputs without the transfer rows (what a student without a teacher trains on)."""
        import dataclasses

        if not self.transfer_rows:
            return self
        keep = np.flatnonzero(is_labelled(self.train.labels))
        examples = None if self.train_examples is None else self.train_examples.take(keep)
        return dataclasses.replace(self, train=self.train.select(keep), train_examples=examples)


def prepare_inputs(data: DataConfig, task: str, tokenizer_init: str, transfer: bool = True) -> Inputs:
    """Load, subset and tokenize the train and dev splits (pure Python, before any Ray resources).

    Args:
        data, task: the config's; tokenizer_init: the tokenizer's model name/folder.
        transfer: append `data.transfer`'s unlabelled rows to train (`load_transfer`); False for teachers,
            which learn from labels only.

    Raises:
        DataError: unknown task, missing/malformed files, unknown labels, an unreadable transfer set.
        TeacherError: the tokenizer cannot be loaded.
    """
    from actors.models import load_tokenizer, resolve_model, vocab_fingerprint

    spec = task_spec(task, data)
    train_ex, dev_ex = load_split(task, data, "train"), load_split(task, data, eval_split(data))
    if data.holdout:
        print(f"[skd] evaluating on {len(dev_ex)} training rows held back from training (data.holdout), not on the "
              f"dev set", flush=True)
    if transfer:
        train_ex = train_ex.concat(load_transfer(task, data))
    tok = load_tokenizer(tokenizer_init)
    return Inputs(spec, encode(train_ex, tok, data.max_length), encode(dev_ex, tok, data.max_length),
                  int(tok.pad_token_id or 0), vocab_fingerprint(tok), resolve_model(tokenizer_init), train_ex,
                  data.max_length)
