"""Tiny random-initialised BERT models for fast tests (MiniLM's real vocabulary, 32-wide layers)."""

from __future__ import annotations

from pathlib import Path


def make_tiny_bert(folder: Path, num_layers: int = 4, hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    """Write a random-initialised BERT classifier with the packaged MiniLM tokenizer into `folder`.

    Returns the folder; it loads with AutoModelForSequenceClassification / AutoTokenizer.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from orchestrator.models import resolve_model

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
