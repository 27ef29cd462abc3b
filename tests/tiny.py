"""Tiny random-initialised BERT models for fast tests (MiniLM's real vocabulary, 32-wide layers)."""

from __future__ import annotations

from pathlib import Path


def make_tiny_bert(folder: Path, num_layers: int = 4, hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    """Write a random-initialised BERT classifier with the packaged MiniLM tokenizer into `folder`.

    Returns the folder; it loads with AutoModelForSequenceClassification / AutoTokenizer.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from actors.models import resolve_model

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_teachers(folder: Path, shapes: dict[str, tuple[int, int, int]]) -> tuple[list, dict]:
    """Untrained tiny teachers plus their manifest, as if `skd teachers prepare` had written them (for tests
    that exercise serving, not fine-tuning). `shapes`: name -> (layers, hidden, heads); dev metrics are made
    up (0.6, 0.55, ...), ranking the teachers in the given order.

    Returns:
        (TeacherInfo list, the config's `teachers` section pointing at them).
    """
    from actors.manifest import TeacherInfo, write_manifest
    from actors.models import count_parameters, load_classifier, load_tokenizer, vocab_fingerprint

    infos = []
    for i, (name, (layers, hidden, heads)) in enumerate(shapes.items()):
        model = make_tiny_bert(folder / name, num_layers=layers, hidden=hidden, heads=heads, seed=i + 1)
        infos.append(TeacherInfo(name=name, checkpoint=str(model), num_layers=layers, hidden_size=hidden,
                                 parameters=count_parameters(load_classifier(str(model), 2)),
                                 dev_metric=0.6 - 0.05 * i, metric="accuracy",
                                 vocab=vocab_fingerprint(load_tokenizer(str(model))), num_labels=2, task="sst2",
                                 mlflow_run_id=""))
    write_manifest(folder / "manifest.json", infos)
    section = {"members": [{"name": n, "init": str(folder / n)} for n in shapes],
               "manifest": str(folder / "manifest.json"), "num_cpus": 0.25}
    return infos, section
