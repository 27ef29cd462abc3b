"""Aligning a teacher's tokens to the student's by character offsets, for hidden-state knowledge across
tokenizers (a teacher of another model family).

Rule (span overlap, averaged). Every token carries a key: a content token its text segment (0 = `text_a`,
1 = `text_pair`) and its character span [start, end) in that text, from the fast tokenizer's offset mapping;
a special token ([CLS], [SEP], <s>, </s>, ...) the boundary it sits at, the number of distinct text segments
before it (0 before any text, 1 after the first text, 2 after the second). Student token j is matched to

    O_j = { teacher tokens i : same segment and spans overlap (start_i < end_j and start_j < end_i) }
          (specials: the teacher's specials at the same boundary, e.g. [CLS] <-> <s>, [SEP] <-> </s></s>)

and its aligned teacher vector is the mean of the teacher's vectors over O_j (a row of `align_matrix`).

Why this rule: where the teacher splits finer than the student (student `unbelievable`, teacher `un`,
`##believ`, `##able`) the student token gets the mean of its pieces; where it splits coarser, each student
piece gets the whole word's vector; where spans cross (`ab|cd` against `a|bc|d`) a student token takes every
teacher token it shares a character with, which is the word-level compromise without needing word ids that
tokenizers define differently. Zero-width content spans (a tokenizer's empty offsets) count as one character.

Nothing is dropped silently: student tokens with no match (e.g. text the teacher truncated at max_length)
get an all-zero row and are left out of the loss by the teacher's token mask; teacher tokens no student token
overlaps (text the student truncated) are counted, and both counts are reported (`Alignment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.errors import TeacherError


@dataclass(frozen=True)
class Spans:
    """One tokenized row's keys: `segment` [L] int64 (0/1 text segment, -1 special), `start`, `end` [L] int64
    (character span in its segment's text; for specials start = end = the boundary index)."""

    segment: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.segment)


def token_spans(tokenizer, text_a: list[str], text_b: list[str] | None, max_length: int) -> list[Spans]:
    """Each row's `Spans`, tokenized exactly as `orchestrator.driver.inputs.encode` does (truncation at `max_length`,
    pairs longest-first).

    Args:
        tokenizer: a fast (Rust `tokenizers`) Hugging Face tokenizer.
        text_a: [N] texts; text_b: [N] second texts of pair tasks, or None.
        max_length: tokens per row after truncation.

    Returns:
        [N] `Spans`, each of the row's token count.

    Raises:
        TeacherError: a slow tokenizer (no offset mapping), which cannot be aligned.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TeacherError(f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) is not a "
                           f"fast tokenizer and gives no character offsets, which aligning hidden states across "
                           f"tokenizers needs: save the model with a tokenizer.json, or ask only logits and cls of "
                           f"that teacher (distill.knowledge.outputs)")
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length, return_offsets_mapping=True)
    out = []
    for row, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(row)
        segment = np.array([-1 if s is None else s for s in seq], dtype=np.int64)
        start = np.array([o[0] for o in offsets], dtype=np.int64)
        end = np.array([o[1] for o in offsets], dtype=np.int64)
        seen, boundary = set(), np.zeros(len(seq), dtype=np.int64)
        for i, s in enumerate(seq):
            if s is None:
                boundary[i] = len(seen)
            else:
                seen.add(s)
        special = segment < 0
        start[special], end[special] = boundary[special], boundary[special]
        end[~special] = np.maximum(end[~special], start[~special] + 1)  # zero-width content: one character
        out.append(Spans(segment, start, end))
    return out


@dataclass(frozen=True)
class Alignment:
    """One row's student-to-teacher token matches.

    Attributes:
        pairs: [P, 2] int32 (student position j, teacher position i), one per match.
        unmatched_student: student tokens with no teacher token (left out of the hidden-state loss).
        unmatched_teacher: teacher tokens no student token overlaps (their vectors are not taught).
    """

    pairs: np.ndarray
    unmatched_student: int
    unmatched_teacher: int


def align(student: Spans, teacher: Spans) -> Alignment:
    """Match each student token to the teacher tokens it overlaps (the rule in the module docstring)."""
    s_seg, t_seg = student.segment[:, None], teacher.segment[None, :]
    same = s_seg == t_seg  # [L_s, L_t]
    content = (s_seg >= 0) & same & (teacher.start[None, :] < student.end[:, None]) \
        & (student.start[:, None] < teacher.end[None, :])
    special = (s_seg < 0) & same & (student.start[:, None] == teacher.start[None, :])
    match = content | special
    pairs = np.argwhere(match).astype(np.int32)
    return Alignment(pairs, int((~match.any(axis=1)).sum()), int((~match.any(axis=0)).sum()))


def align_matrix(alignments: list[np.ndarray], student_len: int, teacher_len: int) -> np.ndarray:
    """A batch's averaging matrices from each row's `Alignment.pairs`.

    Args:
        alignments: [B] pair arrays ([P, 2] int32).
        student_len: L_s of the padded student batch; teacher_len: L_t of the padded teacher view.

    Returns:
        [B, L_s, L_t] float32: row j of example b holds 1/|O_j| at each matched teacher position (all zeros
        for an unmatched or padding student token), so `A @ h_t` ([B, L_t, D] -> [B, L_s, D]) averages.
    """
    out = np.zeros((len(alignments), student_len, teacher_len), dtype=np.float32)
    for b, pairs in enumerate(alignments):
        if len(pairs):
            out[b, pairs[:, 0], pairs[:, 1]] = 1.0
    counts = out.sum(axis=2, keepdims=True)
    return np.divide(out, counts, out=out, where=counts > 0)
