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


def make_tiny_mpnet(folder: Path, num_layers: int = 4, hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    """Write a random-initialised MPNet classifier with a tokenizer of its own into `folder`.

    The tokenizer is a WordPiece model trained with the `tokenizers` library on SST-2's first 2,000 training
    sentences (vocabulary 1,200), with MPNet's specials and template (`<s>` = 0, `<pad>` = 1, `</s>` = 2,
    `<unk>` = 3; pairs `<s> A </s></s> B </s>`), so its ids differ from MiniLM's BERT ids for every sentence
    while it stays a real fast tokenizer (offsets included). Built once per folder, in about a second.
    """
    import csv

    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import MPNetConfig, MPNetForSequenceClassification, PreTrainedTokenizerFast

    glue = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
    with glue.open() as f:
        rows = [r[0] for _, r in zip(range(2000), csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))][1:]
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(rows, trainers.WordPieceTrainer(vocab_size=1200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=128)
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=num_layers,
                         num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=160,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2)
    MPNetForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
