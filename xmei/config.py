"""Typed, validated configuration: YAML -> dataclasses.

The sections and keys of the published XMEI-Qwen config keep their meaning (``model``,
``datasets``, ``run``); this project adds local checkpoint paths, media roots and the label
sets. Loading is strict: an unknown key or a wrong type is a :class:`ConfigError` naming the
key (all problems at once). Published keys that mean nothing here are accepted with a
:class:`ConfigWarning` naming them, never silently.

    cfg = load_config("configs/tiny.yaml", overrides=["run.init_lr=1e-4"], models_dir="models/tiny")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from xmei.errors import UserError, read_text
from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS, DEFAULT_SYNONYMS, LabelSet

__all__ = [
    "Config", "ConfigError", "ConfigWarning", "DatasetConfig", "EvalConfig", "ExtractConfig", "LabelsConfig", "ModelConfig",
    "RunConfig", "MODEL_SUBDIRS", "load_config",
]

# Layout of a models folder as `xmei models tiny` writes it; `--models DIR` maps each
# subfolder onto the config key that names that checkpoint.
MODEL_SUBDIRS = {
    "visual_encoder": "model.visual_encoder_path",
    "audio_encoder": "model.acoustic_encoder_path",
    "llm": "model.llama_model_path",
    "caption_tokenizer": "model.caption_tokenizer_path",
}

# What a checkpoint folder of each model key must hold to be loaded (each tuple: one of these).
CHECKPOINT_FILES = {
    "model.visual_encoder_path": [("config.json",), ("preprocessor_config.json",)],
    "model.acoustic_encoder_path": [("config.json",), ("preprocessor_config.json",)],
    "model.llama_model_path": [("config.json",), ("tokenizer_config.json", "tokenizer.json")],
    "model.caption_tokenizer_path": [("tokenizer_config.json", "tokenizer.json", "vocab.txt")],
}

# Keys of the published config that select LAVIS registry entries there and mean nothing
# here. They load with a warning; any other unknown key is an error.
IGNORED_PUBLISHED_KEYS = {
    "model": {"model_type", "ckpt"},
    "dataset": {"data_type"},
    "run": {"task"},
}


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message lists every problem, each naming its key."""


class ConfigWarning(UserWarning):
    """A config key that is accepted but means nothing here."""


@dataclass
class ModelConfig:
    arch: str = "xmeiqwen"
    # Names of the three networks, as in the published config; the *_path keys say where
    # their local checkpoint folders are (nothing is ever downloaded).
    llama_model: str = "Qwen2.5-7B-Instruct"
    acoustic_encoder: str = "HUBERT_LARGE"
    visual_encoder: str = "CLIP_VIT_LARGE"
    llama_model_path: Path | None = None
    acoustic_encoder_path: Path | None = None
    visual_encoder_path: Path | None = None
    caption_tokenizer_path: Path | None = None  # bert-base-uncased vocab: the LQ-Former's caption queries
    modalities: list[str] = field(default_factory=lambda: ["video", "audio"])  # [video], [audio]: the ablations
    num_audio_query_token: int = 32
    num_video_query_token: int = 32
    # LQ-Former, one per modality: queries = caption tokens (extract.caption_tokens) + learned ones
    query_mode: str = "language"  # language: caption-token queries first; learned: the standard Q-Former
    caption_dropout: float = 0.2  # share of training samples seen without their description (predict needs none)
    caption_embeddings_from: Path | None = None  # a BERT folder whose word embeddings start the caption table
    qformer_hidden_size: int = 768
    qformer_num_layers: int = 2
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    qformer_dropout: float = 0.1
    cross_attention_freq: int = 1  # cross-attention in every n-th layer (1: all)
    lora_r: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_modules_to_save: list[str] = field(default_factory=list)  # LLM modules trained whole (e.g. lm_head)
    frozen_llm: bool = False  # true: the LLM stays frozen and gets no adapter
    use_lora: bool = True  # false (with frozen_llm false): the whole LLM trains
    gradient_checkpointing: bool = False
    prompt_format: str = "chat"  # chat: the tokenizer's chat template; plain: "###Human: ... ###Assistant: "
    max_length: int = 1024  # longest sequence; past it the subtitle is cut, never placeholders or target


@dataclass
class DatasetConfig:
    media_root: Path | None = None  # video_path / audio_path are relative to it (see extract.allow_absolute_paths)
    annotations: dict[str, Path] = field(default_factory=dict)  # split name -> annotation file
    face_or_frame: str = "multiframe"  # full frames; face crops are not supported


@dataclass
class RunConfig:
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int | float = 5000  # a count of optimizer steps, or a fraction of the run below 1 (e.g. 0.03)
    max_epoch: int = 60
    iters_per_epoch: int | None = None  # None: one pass over the store
    batch_size_train: int = 16
    batch_size_eval: int = 16
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    shuffle_shards: int = 4  # clips are shuffled within a buffer of this many shards (reads stay sequential)
    save_every_steps: int = 500  # a checkpoint every N optimizer steps, and at each epoch end
    keep_checkpoints: int = 3  # the last K are kept
    num_workers: int = 4
    seed: int = 42
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU
    use_wandb: bool = False
    device: str = "auto"  # auto (the local rank's GPU when present, else cpu) | cpu | cuda | cuda:N


@dataclass
class ExtractConfig:
    """Stage 1: what `xmei extract` computes and how it lays it out."""

    visual_tokens: str = "patch"  # patch: last hidden state (8, 257, 1024); pooled: get_image_features (8, 768)
    num_frames: int = 8  # sampled uniformly over the clip (short clips repeat frames)
    num_audio_clips: int = 8  # windows spread over the clip
    audio_clip_seconds: float = 2.0
    audio_layers: int = 4  # HuBERT: mean of the last N hidden layers, then mean over time
    caption_tokens: int = 16  # ids + mask per description: the LQ-Former's caption queries
    shard_size: int = 64  # clips per shard: the unit a worker writes, and resumes
    batch_size: int = 16  # clips per encoder batch
    # DESIGN.md measurement: zstd-1 saved 8% of bytes on features and halved read speed
    compression: str = "none"  # none | zstd
    device: str = "auto"  # auto (every GPU when present, else cpu) | cpu | cuda (every GPU) | cuda:N (one)
    workers_per_gpu: int = 1  # local workers sharing one GPU (never more than one unless asked)
    decode_workers: int = 0  # decode processes per worker; 0: the cores available to the worker
    # media paths in the annotations stay inside the media root; true also accepts absolute ones
    # (a path climbing out with '..' is refused either way). Not part of what a store is made with.
    allow_absolute_paths: bool = False


@dataclass
class EvalConfig:
    """`xmei eval` / `xmei score`: generation and the explanation metrics' local models."""

    max_new_tokens: int = 128
    num_beams: int = 1  # 1: greedy decoding; more: beam search
    # emotion and intent decoded only from labels.* (the explanation stays free): no answer is invalid;
    # false: free decoding, where an answer naming no label counts as invalid
    constrained: bool = True
    bertscore_model: Path | None = None  # local folder of BERTScore's model (roberta-large in the real setup)
    bertscore_layer: int = 17  # the layer BERTScore reads (17 for roberta-large)
    bertscore_rescale: bool = False  # rescaling with baselines needs bert-score's baseline files
    bleurt_checkpoint: Path | None = None  # local converted PyTorch BLEURT checkpoint (e.g. bleurt-base-128)


@dataclass
class LabelsConfig:
    emotions: list[str] = field(default_factory=lambda: list(DEFAULT_EMOTIONS))
    intents: list[str] = field(default_factory=lambda: list(DEFAULT_INTENTS))
    emotion_synonyms: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYNONYMS["emotion"]))
    intent_synonyms: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYNONYMS["intent"]))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)

    @property
    def emotions(self) -> LabelSet:
        return LabelSet("emotion", tuple(self.labels.emotions), self.labels.emotion_synonyms)

    @property
    def intents(self) -> LabelSet:
        return LabelSet("intent", tuple(self.labels.intents), self.labels.intent_synonyms)

    def to_dict(self, absolute: bool = False) -> dict[str, Any]:
        """Plain YAML/JSON-ready dict (paths as strings; made absolute when ``absolute``, so that a
        config saved with a checkpoint still points at the same folders from anywhere)."""
        return _plain(dataclasses.asdict(self), absolute)

    def hash(self) -> str:
        """Short stable hash of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def require_paths(self, keys: Iterable[str]) -> None:
        """Raise ConfigError naming every key in ``keys`` whose path is unset or missing, or, for a
        checkpoint key (CHECKPOINT_FILES), is not a folder holding that checkpoint's files."""
        problems = []
        for key in keys:
            value = self.get(key)
            if value is None:
                problems.append(f"{key}: not set (give it in the config, with --set {key}=DIR, or with --models DIR)")
            elif not Path(value).exists():
                problems.append(f"{key}: {value} does not exist")
            elif key in CHECKPOINT_FILES:
                lacking = [" or ".join(names) for names in CHECKPOINT_FILES[key]
                           if not any((Path(value) / name).is_file() for name in names)]
                if lacking:
                    problems.append(f"{key}: {value} is not a model folder (save_pretrained's layout): "
                                    f"it has no {', no '.join(lacking)}")
        if problems:
            raise ConfigError("\n".join(problems))

    def get(self, key: str) -> Any:
        node: Any = self
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return node

    def dataset(self, name: str | None = None) -> tuple[str, DatasetConfig]:
        """The named dataset, or the only one when ``name`` is None."""
        if name is None:
            if len(self.datasets) != 1:
                raise ConfigError(f"datasets: name one of {sorted(self.datasets)}" if self.datasets
                                  else "datasets: the config names no dataset")
            name = next(iter(self.datasets))
        if name not in self.datasets:
            raise ConfigError(f"datasets.{name}: not in the config (known: {sorted(self.datasets)})")
        return name, self.datasets[name]


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                models_dir: str | Path | None = None) -> Config:
    """Load a YAML config (built-in defaults when ``path`` is None), apply ``section.key=value``
    overrides, then point the checkpoint paths at ``models_dir`` when given."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    if models_dir is not None:
        _apply_models_dir(raw, Path(models_dir))

    problems: list[str] = []
    ignored: list[str] = []
    cfg = _build(Config, raw, "", problems, ignored)
    if not problems:
        problems += _check_values(cfg)
    if problems:
        source = f"{path}: " if path else ""
        raise ConfigError(source + "invalid config:\n  " + "\n  ".join(problems))
    if ignored:
        warnings.warn(f"ignoring published config keys that mean nothing here: {', '.join(ignored)}",
                      ConfigWarning, stacklevel=2)
    return cfg


# ---------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> Any:
    """The YAML document of a config file, or a ConfigError naming the file and the line."""
    text = read_text(path, "config file", ConfigError)
    try:
        return yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err)
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None:
            what += f" ({context} at line {start.line + 1})"
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.2), as the published config writes it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\d+\.\d*$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
# Integers must still read as ints: put the int resolver back in front of the float one.
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _Loader.yaml_implicit_resolvers[_first] = sorted(
        _resolvers, key=lambda r: r[0] != "tag:yaml.org,2002:int")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. run.init_lr=1e-4")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: cannot read the value: {err}") from None


def _apply_models_dir(raw: dict, models_dir: Path) -> None:
    if not models_dir.is_dir():
        raise ConfigError(f"--models {models_dir}: " + ("not a folder" if models_dir.exists() else "no such folder"))
    missing = [sub for sub in MODEL_SUBDIRS if not (models_dir / sub).is_dir()]
    if missing:
        raise ConfigError(f"--models {models_dir}: missing subfolder(s) {missing}; "
                          f"expected the layout of `xmei models tiny`: {list(MODEL_SUBDIRS)}")
    for sub, key in MODEL_SUBDIRS.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = str(models_dir / sub)


def _build(cls: type, data: Any, where: str, problems: list[str], ignored: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, recording every problem with its key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    section = "dataset" if cls is DatasetConfig else where
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in hints:
            if key in IGNORED_PUBLISHED_KEYS.get(section, ()):
                ignored.append(name)
            else:
                problems.append(f"{name}: unknown key (known in {where or 'the top level'}: {', '.join(hints)})")
            continue
        kwargs[key] = _coerce(value, hints[key], name, problems, ignored)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str, problems: list[str], ignored: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if set(args) == {int, float}:  # a count or a fraction: kept as written
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            problems.append(f"{name}: expected int or float, got {type(value).__name__} {value!r}")
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(value, tp, name, problems, ignored)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name, problems, ignored)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        return {str(k): _coerce(v, args[1], f"{name}.{k}", problems, ignored) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{name}: expected a list, got {type(value).__name__} {value!r}")
            return []
        return [_coerce(v, args[0], f"{name}[{i}]", problems, ignored) for i, v in enumerate(value)]
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
        problems.append(f"{name}: expected a path, got {value!r}")
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        problems.append(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return None
    return float(value) if tp is float else value


def _check_values(cfg: Config) -> list[str]:
    problems = []
    m, r = cfg.model, cfg.run
    if m.arch != "xmeiqwen":
        problems.append(f"model.arch: only 'xmeiqwen' is built here, got {m.arch!r}")
    if r.lr_sched != "linear_warmup_cosine_lr":
        problems.append(f"run.lr_sched: only 'linear_warmup_cosine_lr' is built here, got {r.lr_sched!r}")
    if m.query_mode not in ("language", "learned"):
        problems.append(f"model.query_mode: 'language' or 'learned', got {m.query_mode!r}")
    if not m.modalities or len(set(m.modalities)) != len(m.modalities) or set(m.modalities) - {"video", "audio"}:
        problems.append(f"model.modalities: [video, audio], [video] or [audio], got {m.modalities!r}")
    if not 0 <= m.caption_dropout < 1:
        problems.append(f"model.caption_dropout: a probability in [0, 1), got {m.caption_dropout}")
    if m.prompt_format not in ("chat", "plain"):
        problems.append(f"model.prompt_format: 'chat' or 'plain', got {m.prompt_format!r}")
    if m.qformer_hidden_size % max(m.qformer_num_heads, 1):
        problems.append(f"model.qformer_hidden_size: {m.qformer_hidden_size} is not a multiple of "
                        f"model.qformer_num_heads {m.qformer_num_heads}")
    for key in ("num_audio_query_token", "num_video_query_token", "lora_r", "lora_alpha", "qformer_hidden_size",
                "qformer_num_layers", "qformer_num_heads", "qformer_intermediate_size", "cross_attention_freq",
                "max_length"):
        if getattr(m, key) < 1:
            problems.append(f"model.{key}: must be >= 1, got {getattr(m, key)}")
    for key in ("max_epoch", "batch_size_train", "batch_size_eval", "gradient_accumulation_steps"):
        if getattr(r, key) < 1:
            problems.append(f"run.{key}: must be >= 1, got {getattr(r, key)}")
    for key in ("shuffle_shards", "save_every_steps", "keep_checkpoints"):
        if getattr(r, key) < 1:
            problems.append(f"run.{key}: must be >= 1, got {getattr(r, key)}")
    for key in ("warmup_steps", "num_workers", "max_grad_norm"):
        if getattr(r, key) < 0:
            problems.append(f"run.{key}: must be >= 0, got {getattr(r, key)}")
    if r.warmup_steps >= 1 and r.warmup_steps != int(r.warmup_steps):
        problems.append(f"run.warmup_steps: a count of steps (an integer) or a fraction of the run below 1, "
                        f"got {r.warmup_steps}")
    if r.iters_per_epoch is not None and r.iters_per_epoch < 1:
        problems.append(f"run.iters_per_epoch: must be >= 1 or null, got {r.iters_per_epoch}")
    for key in ("init_lr", "min_lr", "warmup_lr", "weight_decay"):
        if getattr(r, key) < 0:
            problems.append(f"run.{key}: must be >= 0, got {getattr(r, key)}")
    if r.min_lr > r.init_lr:
        problems.append(f"run.min_lr: {r.min_lr} is above run.init_lr {r.init_lr}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.device):
        problems.append(f"run.device: 'auto', 'cpu', 'cuda' or 'cuda:N', got {r.device!r}")
    e = cfg.eval
    for key in ("max_new_tokens", "num_beams", "bertscore_layer"):
        if getattr(e, key) < 1:
            problems.append(f"eval.{key}: must be >= 1, got {getattr(e, key)}")
    x = cfg.extract
    if x.visual_tokens not in ("patch", "pooled"):
        problems.append(f"extract.visual_tokens: 'patch' or 'pooled', got {x.visual_tokens!r}")
    if x.compression not in ("none", "zstd"):
        problems.append(f"extract.compression: 'none' or 'zstd', got {x.compression!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", x.device):
        problems.append(f"extract.device: 'auto', 'cpu', 'cuda' or 'cuda:N', got {x.device!r}")
    if x.decode_workers < 0:
        problems.append(f"extract.decode_workers: must be >= 0 (0: one per core), got {x.decode_workers}")
    for key in ("num_frames", "num_audio_clips", "audio_layers", "caption_tokens", "shard_size", "batch_size",
                "workers_per_gpu"):
        if getattr(x, key) < 1:
            problems.append(f"extract.{key}: must be >= 1, got {getattr(x, key)}")
    if x.audio_clip_seconds <= 0:
        problems.append(f"extract.audio_clip_seconds: must be > 0, got {x.audio_clip_seconds}")
    for name, ds in cfg.datasets.items():
        if ds.face_or_frame != "multiframe":
            problems.append(f"datasets.{name}.face_or_frame: only 'multiframe' (full frames) is supported, "
                            f"got {ds.face_or_frame!r}")
    for kind in ("emotions", "intents"):
        try:
            getattr(cfg, kind)
        except ValueError as err:
            problems.append(f"labels.{kind}: {err}")
    return problems


def _plain(obj: Any, absolute: bool = False) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v, absolute) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v, absolute) for v in obj]
    if isinstance(obj, Path):
        return str(obj.resolve() if absolute else obj)
    return obj
