"""Teachers' views of the training rows, on the driver: the rows tokenized once per teacher tokenizer unlike the
student's, and, for hidden-state knowledge, each row's tokens aligned to the student's by character offsets
(`actors.alignment`).
"""

from __future__ import annotations

from orchestrator.driver.inputs import Inputs, encode


def with_views(inputs: Inputs, tokenizers: dict[str, str], align: bool = False) -> Inputs:
    """The inputs with the training rows also tokenized by each teacher tokenizer unlike the student's.

    The driver tokenizes once per distinct tokenizer (not once per teacher) with the same truncation and
    `max_length`; every batch then carries each view (`Encoded.batch`) and a teacher reads the one of its
    own tokenizer (`TokenBatch.view`). Soft labels and [CLS] states need nothing more: each teacher sees the
    whole text in its own tokens. With `align`, each view also keeps every row's token alignment to the
    student's tokens by character offsets (`actors.alignment`), for hidden-state knowledge; the unmatched
    tokens are counted in `alignment_counts` and printed, never dropped silently.

    Args:
        inputs: from `prepare_inputs`.
        tokenizers: vocab fingerprint -> tokenizer folder/name (a teacher's checkpoint), one per teacher.
        align: also align each view to the student's tokens.

    Returns:
        `inputs` itself when every tokenizer is the student's or already has its view (aligned when asked),
        else a copy whose `train` has the missing views.

    Raises:
        TeacherError: a tokenizer that does not load, one whose fingerprint is not what the manifest says, or
            (with `align`) a tokenizer without character offsets (not a fast tokenizer).
    """
    import dataclasses

    from actors.alignment import align as align_row, token_spans
    from actors.errors import TeacherError
    from actors.models import load_tokenizer, vocab_fingerprint

    views, counted = dict(inputs.train.views), dict(inputs.alignment_counts)
    missing = {fp: src for fp, src in tokenizers.items()
               if fp != inputs.vocab and (fp not in views or (align and views[fp][2] is None))}
    if not missing:
        return inputs
    ex = inputs.train_examples
    if ex is None:
        raise ValueError("with_views needs Inputs.train_examples (made by prepare_inputs)")
    student_spans = token_spans(load_tokenizer(inputs.tokenizer_init), ex.text_a, ex.text_b,
                                inputs.max_length) if align else None
    for fp, src in missing.items():
        tok = load_tokenizer(src)
        if vocab_fingerprint(tok) != fp:
            raise TeacherError(f"the tokenizer in {src} is not the one the teachers manifest records ({fp}); "
                               f"re-run `skd teachers prepare`")
        enc = encode(ex, tok, inputs.max_length)
        pairs = None
        if align:
            rows = [align_row(s, t) for s, t in zip(student_spans, token_spans(tok, ex.text_a, ex.text_b,
                                                                               inputs.max_length))]
            pairs = [r.pairs for r in rows]
            counts = {"student_tokens": sum(len(s) for s in student_spans),
                      "teacher_tokens": sum(len(x) for x in enc.input_ids),
                      "unmatched_student_tokens": sum(r.unmatched_student for r in rows),
                      "unmatched_teacher_tokens": sum(r.unmatched_teacher for r in rows)}
            counted[fp] = counts
            print(f"[skd] tokens of tokenizer {fp} ({src}) aligned to the student's by character offsets: "
                  f"{counts['unmatched_student_tokens']} of {counts['student_tokens']} student tokens without a "
                  f"teacher token (left out of the hidden-state loss), {counts['unmatched_teacher_tokens']} of "
                  f"{counts['teacher_tokens']} teacher tokens without a student token (text the student "
                  f"truncated)", flush=True)
        views[fp] = (enc.input_ids, int(tok.pad_token_id or 0), pairs)
    return dataclasses.replace(inputs, train=dataclasses.replace(inputs.train, views=views),
                               alignment_counts=counted)
