"""Typed, validated configuration: YAML -> pydantic models.

The sections and keys of the published XMEI-Qwen config keep their meaning (``model``,
``datasets``, ``run``); this project adds local checkpoint paths, media roots and the label
sets. Loading is strict: an unknown key or a wrong type is a :class:`ConfigError` naming the
key (all problems at once). Published keys that mean nothing here are accepted with a
:class:`ConfigWarning` naming them, never silently.

    cfg = load_config("configs/tiny.yaml", overrides=["run.init_lr=1e-4"], models_dir="models/tiny")

Each key's type and range is declared on its field; a section's checks across fields are its
``model_validator``. Values are taken as YAML typed them (strict: ``"3"`` is no int, ``1`` no
bool; an int is a float); assignment is not validated (code may set a field of a loaded config).
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      ValidationError, field_validator, model_validator)

from xmei.errors import UserError, read_text
from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS, DEFAULT_SYNONYMS, LabelSet

__all__ = [
    "Config", "ConfigError", "ConfigWarning", "DatasetConfig", "EvalConfig", "ExtractConfig", "LabelsConfig",
    "ModelConfig", "RunConfig", "ServeConfig", "MODEL_SUBDIRS", "OPTIONAL_SUBDIRS", "load_config",
]

# Layout of a models folder as `xmei models tiny` writes it; `--models DIR` maps each
# subfolder onto the config key that names that checkpoint.
MODEL_SUBDIRS = {
    "visual_encoder": "model.visual_encoder_path",
    "audio_encoder": "model.acoustic_encoder_path",
    "llm": "model.llama_model_path",
    "caption_tokenizer": "model.caption_tokenizer_path",
    "asr": "model.asr_path",
}
# Subfolders `--models DIR` fills their key from only when present (a models folder made before
# `xmei models tiny` wrote a Whisper lacks it; only `xmei annotate` reads it).
OPTIONAL_SUBDIRS = {"asr"}

# What a checkpoint folder of each model key must hold to be loaded (each tuple: one of these).
CHECKPOINT_FILES = {
    "model.visual_encoder_path": [("config.json",), ("preprocessor_config.json",)],
    "model.acoustic_encoder_path": [("config.json",), ("preprocessor_config.json",)],
    "model.llama_model_path": [("config.json",), ("tokenizer_config.json", "tokenizer.json")],
    "model.caption_tokenizer_path": [("tokenizer_config.json", "tokenizer.json", "vocab.txt")],
    "model.asr_path": [("config.json",), ("preprocessor_config.json",), ("tokenizer_config.json", "tokenizer.json")],
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


def _must(test: Callable[[Any], bool], expected: str) -> AfterValidator:
    """A value check on a field (after its type's): the error reads 'key: <expected>, got <value>'."""
    def check(value: Any) -> Any:
        if not test(value):
            raise ValueError(f"{expected}, got {value!r}")
        return value
    return AfterValidator(check)


def _one_of(*choices: str) -> AfterValidator:
    return _must(lambda value: value in choices, " or ".join(map(repr, choices)))


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected int or float, got {type(value).__name__} {value!r}")
    return value


def _dump_path(path: Path, info: Any) -> str:  # to_dict(absolute=True) resolves paths
    return str(Path(path).resolve() if (info.context or {}).get("absolute") else path)


# A path: YAML gives a non-empty string, kept relative as written (resolved against the working folder).
_Path = Annotated[Path, BeforeValidator(lambda v: Path(v) if isinstance(v, str) and v else v),
                  PlainSerializer(_dump_path, when_used="json")]
_Key = Annotated[str, BeforeValidator(str)]  # a mapping's key as YAML wrote it (`1:` names "1")
_Device = Annotated[str, _must(re.compile(r"auto|cpu|cuda(:\d+)?").fullmatch, "'auto', 'cpu', 'cuda' or 'cuda:N'")]


class _Problems(ValueError):
    """A section's check across its fields: {field: what is wrong}, each reported under its own key."""


class _Section(BaseModel):
    """A config section: unknown keys and values of another type are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_takes_defaults(cls, data: Any) -> Any:  # `model:` with nothing under it
        return {} if data is None else data


class ModelConfig(_Section):
    arch: Annotated[str, _must(lambda v: v == "xmeiqwen", "only 'xmeiqwen' is built here")] = "xmeiqwen"
    # Names of the three networks, as in the published config; the *_path keys say where
    # their local checkpoint folders are (nothing is ever downloaded).
    llama_model: str = "Qwen2.5-7B-Instruct"
    acoustic_encoder: str = "HUBERT_LARGE"
    visual_encoder: str = "CLIP_VIT_LARGE"
    llama_model_path: _Path | None = None
    acoustic_encoder_path: _Path | None = None
    visual_encoder_path: _Path | None = None
    caption_tokenizer_path: _Path | None = None  # bert-base-uncased vocab: the LQ-Former's caption queries
    asr_path: _Path | None = None  # a Whisper folder (e.g. openai/whisper-large-v3): `xmei annotate` transcribes with it
    modalities: Annotated[list[str], _must(  # [video], [audio]: the ablations
        lambda m: m and len(set(m)) == len(m) and not set(m) - {"video", "audio"},
        "[video, audio], [video] or [audio]")] = ["video", "audio"]
    num_audio_query_token: int = Field(32, ge=1)
    num_video_query_token: int = Field(32, ge=1)
    # LQ-Former, one per modality: queries = caption tokens (extract.caption_tokens) + learned ones
    # language: caption-token queries first; learned: the standard Q-Former
    query_mode: Annotated[str, _one_of("language", "learned")] = "language"
    # share of training samples seen without their description (predict needs none)
    caption_dropout: Annotated[float, _must(lambda p: 0 <= p < 1, "a probability in [0, 1)")] = 0.2
    caption_embeddings_from: _Path | None = None  # a BERT folder whose word embeddings start the caption table
    qformer_hidden_size: int = Field(768, ge=1)
    qformer_num_layers: int = Field(2, ge=1)
    qformer_num_heads: int = Field(12, ge=1)
    qformer_intermediate_size: int = Field(3072, ge=1)
    qformer_dropout: float = 0.1
    cross_attention_freq: int = Field(1, ge=1)  # cross-attention in every n-th layer (1: all)
    lora_r: int = Field(64, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_modules_to_save: list[str] = []  # LLM modules trained whole (e.g. lm_head)
    frozen_llm: bool = False  # true: the LLM stays frozen and gets no adapter
    use_lora: bool = True  # false (with frozen_llm false): the whole LLM trains
    gradient_checkpointing: bool = False
    # chat: the tokenizer's chat template; plain: "###Human: ... ###Assistant: "
    prompt_format: Annotated[str, _one_of("chat", "plain")] = "chat"
    max_length: int = Field(1024, ge=1)  # longest sequence; past it the subtitle is cut, never placeholders or target

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.qformer_hidden_size % self.qformer_num_heads:
            raise _Problems({"qformer_hidden_size": f"{self.qformer_hidden_size} is not a multiple of "
                                                    f"model.qformer_num_heads {self.qformer_num_heads}"})
        return self


class DatasetConfig(_Section):
    media_root: _Path | None = None  # video_path / audio_path are relative to it (see extract.allow_absolute_paths)
    annotations: dict[_Key, _Path] = {}  # split name -> annotation file
    face_or_frame: Annotated[str, _must(  # full frames; face crops are not supported
        lambda v: v == "multiframe", "only 'multiframe' (full frames) is supported")] = "multiframe"


class RunConfig(_Section):
    lr_sched: Annotated[str, _must(lambda v: v == "linear_warmup_cosine_lr",
                                   "only 'linear_warmup_cosine_lr' is built here")] = "linear_warmup_cosine_lr"
    init_lr: float = Field(1e-5, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    # a count of optimizer steps, or a fraction of the run below 1 (e.g. 0.03)
    warmup_steps: Annotated[int | float, BeforeValidator(_number), Field(ge=0), _must(
        lambda n: n < 1 or n == int(n), "a count of steps (an integer) or a fraction of the run below 1")] = 5000
    max_epoch: int = Field(60, ge=1)
    iters_per_epoch: Annotated[int | None, _must(  # None: one pass over the store
        lambda n: n is None or n >= 1, "must be >= 1 or null")] = None
    batch_size_train: int = Field(16, ge=1)
    batch_size_eval: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)  # gradient clipping; 0 turns it off
    shuffle_shards: int = Field(4, ge=1)  # clips shuffle within a buffer of this many shards (reads stay sequential)
    save_every_steps: int = Field(500, ge=1)  # a checkpoint every N optimizer steps, and at each epoch end
    keep_checkpoints: int = Field(3, ge=1)  # the last K are kept
    # SIGTERM / SIGINT: at most this long to finish the step and write a checkpoint, then exit (xmei.preempt);
    # `xmei extract` / `xmei eval`: to finish the shards / the batch in progress (xmei.interrupt)
    preempt_grace_s: float = Field(120, gt=0)
    num_workers: int = Field(4, ge=0)
    seed: int = 42
    # bf16: frozen weights in bf16 and the forward under bf16 autocast, trainable weights, gradients and
    # optimizer state fp32, in both engines, on a GPU or the CPU; fp32: fp32 throughout; auto: bf16 on a
    # GPU that has it, else fp32 (a CPU gains no speed from bf16 at the tiny models' size)
    precision: Annotated[str, _one_of("auto", "bf16", "fp32")] = "auto"
    amp: bool = True  # the published switch: false means fp32 (run.precision must then not say bf16)
    use_wandb: bool = False
    device: _Device = "auto"  # auto (the local rank's GPU when present, else cpu) | cpu | cuda | cuda:N

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.min_lr > self.init_lr:
            raise _Problems({"min_lr": f"{self.min_lr} is above run.init_lr {self.init_lr}"})
        if not self.amp and self.precision == "bf16":
            raise _Problems({"precision": "bf16, but run.amp is false (mixed precision off): set one of them"})
        return self


class ExtractConfig(_Section):
    """Stage 1: what `xmei extract` computes and how it lays it out."""

    # patch: last hidden state (8, 257, 1024); pooled: get_image_features (8, 768)
    visual_tokens: Annotated[str, _one_of("patch", "pooled")] = "patch"
    num_frames: int = Field(8, ge=1)  # sampled uniformly over the clip (short clips repeat frames)
    num_audio_clips: int = Field(8, ge=1)  # windows spread over the clip
    audio_clip_seconds: float = Field(2.0, gt=0)
    audio_layers: int = Field(4, ge=1)  # HuBERT: mean of the last N hidden layers, then mean over time
    caption_tokens: int = Field(16, ge=1)  # ids + mask per description: the LQ-Former's caption queries
    shard_size: int = Field(64, ge=1)  # clips per shard: the unit a worker writes, and resumes
    batch_size: int = Field(16, ge=1)  # clips per encoder batch
    # DESIGN.md measurement: zstd-1 saved 8% of bytes on features and halved read speed
    compression: Annotated[str, _one_of("none", "zstd")] = "none"
    device: _Device = "auto"  # auto (every GPU when present, else cpu) | cpu | cuda (every GPU) | cuda:N (one)
    workers_per_gpu: int = Field(1, ge=1)  # local workers sharing one GPU (never more than one unless asked)
    # decode processes per worker; 0: the cores of the worker's node (its CPU affinity, over all its
    # workers on that node) divided among the node's workers, at least 1 each
    decode_workers: Annotated[int, _must(lambda n: n >= 0, "must be >= 0 (0: a share of the node's cores)")] = 0
    # the encoders' compute dtype, one for the whole store (recorded in it; a resume in another is refused):
    # auto: bf16 on a GPU that computes in it natively, fp16 on an older GPU, fp32 on the CPU
    precision: Annotated[str, _one_of("auto", "bf16", "fp16", "fp32")] = "auto"
    # media paths in the annotations stay inside the media root; true also accepts absolute ones
    # (a path climbing out with '..' is refused either way). Not part of what a store is made with.
    allow_absolute_paths: bool = False


class EvalConfig(_Section):
    """`xmei eval` / `xmei score`: generation and the explanation metrics' local models."""

    max_new_tokens: int = Field(128, ge=1)
    num_beams: int = Field(1, ge=1)  # 1: greedy decoding; more: beam search
    # emotion and intent decoded only from labels.* (the explanation stays free): no answer is invalid;
    # false: free decoding, where an answer naming no label counts as invalid
    constrained: bool = True
    bertscore_model: _Path | None = None  # local folder of BERTScore's model (roberta-large in the real setup)
    bertscore_layer: int = Field(17, ge=1)  # the layer BERTScore reads (17 for roberta-large)
    bertscore_rescale: bool = False  # rescaling with baselines needs bert-score's baseline files
    bleurt_checkpoint: _Path | None = None  # local converted PyTorch BLEURT checkpoint (e.g. bleurt-base-128)


class ServeConfig(_Section):
    """`xmei serve`: the limits of what its page takes."""

    # a longer clip is refused with a message: stage 1 samples num_frames over any length, so a long
    # clip is mostly unseen, and decoding it holds the one generation slot of the device meanwhile
    max_seconds: float = Field(60.0, gt=0)


class StoresConfig(_Section):
    """Where this machine finds stores in object storage: not part of a run, so never saved with a
    checkpoint nor hashed (Config.to_dict leaves it out)."""

    # an S3-compatible server (MinIO, Ceph, moto...) for s3:// stores, e.g. http://127.0.0.1:9000;
    # None: AWS's, or AWS_ENDPOINT_URL. Credentials never go here: AWS_ACCESS_KEY_ID ... (README)
    endpoint_url: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _plain_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL of a server")
        if parts.username or parts.password or parts.query:
            raise ValueError("an endpoint URL holds no credentials or query: credentials come from "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return value


class LabelsConfig(_Section):
    emotions: list[str] = list(DEFAULT_EMOTIONS)
    intents: list[str] = list(DEFAULT_INTENTS)
    emotion_synonyms: dict[_Key, str] = DEFAULT_SYNONYMS["emotion"]
    intent_synonyms: dict[_Key, str] = DEFAULT_SYNONYMS["intent"]

    def label_set(self, kind: str) -> LabelSet:
        """The ordered ``"emotion"`` or ``"intent"`` label set with its synonyms."""
        return LabelSet(kind, tuple(getattr(self, f"{kind}s")), getattr(self, f"{kind}_synonyms"))

    @model_validator(mode="after")
    def _label_sets_hold(self) -> LabelsConfig:
        problems = {}
        for kind in ("emotion", "intent"):
            try:
                self.label_set(kind)
            except ValueError as err:
                problems[f"{kind}s"] = str(err)
        if problems:
            raise _Problems(problems)
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    datasets: dict[_Key, DatasetConfig] = {}
    run: RunConfig = Field(default_factory=RunConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    stores: StoresConfig = Field(default_factory=StoresConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)

    @property
    def emotions(self) -> LabelSet:
        return self.labels.label_set("emotion")

    @property
    def intents(self) -> LabelSet:
        return self.labels.label_set("intent")

    def to_dict(self, absolute: bool = False, machine: bool = False) -> dict[str, Any]:
        """Plain YAML/JSON-ready dict (paths as strings; made absolute when ``absolute``, so that a
        config saved with a checkpoint still points at the same folders from anywhere). ``stores``
        (where this machine finds object storage) only when ``machine``: never in a checkpoint."""
        return self.model_dump(mode="json", context={"absolute": absolute}, exclude=None if machine else {"stores"})

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

    ignored = _drop_published_only(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        source = f"{path}: " if path else ""
        raise ConfigError(source + "invalid config:\n  " + "\n  ".join(_problems(err))) from None
    if ignored:
        warnings.warn(f"ignoring published config keys that mean nothing here: {', '.join(ignored)}",
                      ConfigWarning, stacklevel=2)
    return cfg


# ---------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> Any:
    """The YAML document of a config file, or a ConfigError naming the file and the line."""
    text = read_text(path, "the config file", ConfigError)
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
    missing = [sub for sub in MODEL_SUBDIRS if not (models_dir / sub).is_dir() and sub not in OPTIONAL_SUBDIRS]
    if missing:
        raise ConfigError(f"--models {models_dir}: missing subfolder(s) {missing}; "
                          f"expected the layout of `xmei models tiny`: {list(MODEL_SUBDIRS)}")
    for sub, key in MODEL_SUBDIRS.items():
        if not (models_dir / sub).is_dir():
            continue  # an optional one (OPTIONAL_SUBDIRS): its key keeps the config's value
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = str(models_dir / sub)


def _drop_published_only(raw: dict) -> list[str]:
    """Take the keys of IGNORED_PUBLISHED_KEYS out of ``raw``; their dotted names, in file order."""
    dropped = []
    for name, section in raw.items():
        ignorable = IGNORED_PUBLISHED_KEYS.get("dataset" if name == "datasets" else name, ())
        parts = {f"{name}.{k}": v for k, v in section.items()} if name == "datasets" and isinstance(section, dict) \
            else {name: section}
        for where, part in parts.items():
            for key in [k for k in part if k in ignorable] if isinstance(part, dict) else []:
                del part[key]
                dropped.append(f"{where}.{key}")
    return dropped


# pydantic's type errors, in the words of this module
_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
             "dict_type": "a mapping", "model_type": "a mapping", "list_type": "a list"}


def _problems(error: ValidationError) -> list[str]:
    """One 'dotted.key: what is wrong' line per problem pydantic found."""
    lines = []
    for e in error.errors(include_url=False):
        loc, kind, value, ctx = e["loc"], e["type"], e["input"], e.get("ctx", {})
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if isinstance(ctx.get("error"), _Problems):
            lines += [f"{key}.{field}: {text}" for field, text in ctx["error"].args[0].items()]
            continue
        if kind == "extra_forbidden":
            where = ".".join(map(str, loc[:-1]))
            section = Config if not where else DatasetConfig if loc[0] == "datasets" \
                else Config.model_fields[loc[0]].annotation
            text = f"unknown key (known in {where or 'the top level'}: {', '.join(section.model_fields)})"
        elif kind in _EXPECTED:
            text = f"expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}"
        elif kind == "is_instance_of":  # a _Path's value that is no non-empty string
            text = f"expected a path, got {value!r}"
        elif kind in ("greater_than_equal", "greater_than"):
            bound = ctx.get("ge", ctx.get("gt"))  # a float on a float field, whose value reads as one
            text = (f"must be {'>=' if 'equal' in kind else '>'} {bound:g}, "
                    f"got {float(value) if isinstance(bound, float) else value}")
        elif kind == "value_error":  # from _must and _number
            text = str(ctx["error"])
        else:
            text = e["msg"]
        lines.append(f"{key}: {text}")
    return lines
