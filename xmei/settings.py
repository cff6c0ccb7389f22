"""What builds an XMEI-Qwen, and the checks of the stores it reads: all without torch.

    stores = open_stores(paths, cfg.model.modalities)     # each checked: features, shard files, same encoders
    check_store_labels(stores[0], cfg.emotions, cfg.intents, "--config tiny.yaml")
    settings = XMEISettings.from_config(cfg, caption_vocab_size=..., **feature_facts(stores[0]))

    check_fit(feature_facts(store), settings, checkpoint, str(store.path))   # a checkpoint's features: the store's?

A command checks its inputs with these (and a checkpoint's files with
:func:`xmei.checkpoint.verify_checkpoint`, which reads its settings) before it imports torch,
transformers or peft, and before it builds a model: a damaged or unfit input is named in
seconds, not after a 7B LLM has loaded. A checkpoint keeps the feature facts of the store it was
trained on (:class:`FeatureFacts`), so a store (or a clip's extraction settings) whose features
are other than those is named with the difference (:func:`check_fit`), never fed to the model.
So this module imports neither; the torch parts that the settings describe
(:class:`~xmei.lqformer.LQFormerConfig`, :class:`~xmei.prompt.PromptBuilder`) are imported by
the two methods that make them, which only a model being built calls.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stores import FeatureStore, StoreError
from xmei.config import ModelConfig
from xmei.errors import UserError

if TYPE_CHECKING:
    from xmei.lqformer import LQFormerConfig
    from xmei.prompt import PromptBuilder

__all__ = ["FEATURES", "MODALITIES", "FeatureFacts", "FeatureMismatch", "XMEISettings", "check_fit",
           "check_store_labels", "feature_facts", "fit_problems", "open_stores"]

FEATURES = {"video": "visual", "audio": "audio"}  # modality (batch key) -> store array
MODALITIES = tuple(FEATURES)


class FeatureMismatch(UserError, ValueError):
    """Features (a store's, or those a config extracts) other than a checkpoint was trained on:
    the message names both sides in the user's terms."""


@dataclass
class FeatureFacts:
    """What stage 1 stored, read from a store's attributes (:func:`feature_facts`). A checkpoint
    written by an earlier xmei lacks the fields from ``visual_shape`` on (None): what it does not
    record is not compared."""

    visual_size: int  # feature widths
    audio_size: int
    num_frames: int  # frames / audio windows per clip
    num_audio_clips: int
    caption_vocab_size: int  # the caption tokenizer's vocabulary
    caption_tokens: int  # caption ids per description
    compute_dtype: str | None = None  # the encoders' dtype in stage 1 (None: not recorded by an earlier xmei)
    visual_shape: list[int] | None = None  # one clip's: [frames, tokens, width] (patch) or [frames, width] (pooled)
    audio_shape: list[int] | None = None  # one clip's: [windows, width]
    audio_clip_seconds: float | None = None  # the length of an audio window
    audio_layers: int | None = None  # HuBERT's last hidden layers averaged per window
    encoders: dict[str, dict[str, str]] | None = None  # visual / audio / caption_tokenizer: name, config_sha256


@dataclass
class XMEISettings:
    """What builds an XMEI-Qwen: the run config's ``model`` section itself (no renamed copy: a key
    added there reaches the model) and the feature facts of stage 1."""

    model: ModelConfig
    features: FeatureFacts

    @classmethod
    def from_config(cls, cfg, **features: Any) -> "XMEISettings":
        """``features``: the fields of :class:`FeatureFacts` (from a store, or an encoder's config)."""
        return cls(copy.deepcopy(cfg.model), FeatureFacts(**features))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.model.modalities)

    @property
    def llm_part(self) -> str | None:
        """What of the LLM a checkpoint holds: "adapter" (LoRA), "llm" (the whole LLM trained) or
        None (frozen: the base LLM alone)."""
        m = self.model
        return None if m.frozen_llm else "adapter" if m.use_lora else "llm"

    def queries(self, modality: str) -> int:
        """Placeholder tokens (LQ-Former outputs) of a modality; 0 when the model does not use it."""
        if modality not in self.modalities:
            return 0
        return self.model.num_video_query_token if modality == "video" else self.model.num_audio_query_token

    def prompt_builder(self, tokenizer) -> PromptBuilder:
        from xmei.prompt import PromptBuilder

        m = self.model
        return PromptBuilder(tokenizer, self.queries("video"), self.queries("audio"), m.prompt_format, m.max_length)

    def lqformer(self, modality: str) -> LQFormerConfig:
        from xmei.lqformer import LQFormerConfig

        m, f, video = self.model, self.features, modality == "video"
        return LQFormerConfig(
            feature_size=f.visual_size if video else f.audio_size,
            num_positions=f.num_frames if video else f.num_audio_clips,
            caption_vocab_size=f.caption_vocab_size, num_caption_tokens=f.caption_tokens,
            num_queries=self.queries(modality), query_mode=m.query_mode, hidden_size=m.qformer_hidden_size,
            num_layers=m.qformer_num_layers, num_heads=m.qformer_num_heads,
            intermediate_size=m.qformer_intermediate_size, dropout=m.qformer_dropout,
            cross_attention_freq=m.cross_attention_freq)

    def to_json(self) -> dict:
        plain = {"model": self.model.model_dump(), "features": asdict(self.features)}
        return json.loads(json.dumps(plain, default=str))

    @classmethod
    def from_json(cls, data: dict) -> "XMEISettings":
        """Back from ``to_json`` (a TypeError or ValueError for another layout: a checkpoint's
        settings are read by :func:`xmei.checkpoint.verify_checkpoint`, which names the file)."""
        return cls(ModelConfig(**data["model"]), FeatureFacts(**data["features"]))  # the paths Paths again


def feature_facts(store: FeatureStore | dict[str, Any]) -> dict[str, Any]:
    """What the model needs to know about the features (the fields of :class:`FeatureFacts` but
    the caption vocabulary), from a store's attributes, or from a dict laid out as they are (the
    ``features``, ``extract`` and ``encoders`` that `xmei extract` would write): 0 and None for a
    modality without features, None for what a store does not record. The encoders' folders are
    left out: moving them changes no feature."""
    attrs = store if isinstance(store, dict) else store.attrs
    feats, extract = attrs["features"], attrs.get("extract", {})
    shapes = {name: feats[name]["shape"] if name in feats else None for name in ("visual", "audio")}
    visual, audio = (shapes[name] or [0, 0] for name in ("visual", "audio"))
    encoders = attrs.get("encoders")
    return {"visual_size": visual[-1], "audio_size": audio[-1], "num_frames": visual[0], "num_audio_clips": audio[0],
            "caption_tokens": extract["caption_tokens"], "compute_dtype": attrs.get("compute_dtype"),
            "visual_shape": shapes["visual"], "audio_shape": shapes["audio"],
            "audio_clip_seconds": extract.get("audio_clip_seconds"), "audio_layers": extract.get("audio_layers"),
            "encoders": None if encoders is None else {
                kind: {k: v for k, v in identity.items() if k != "path"} for kind, identity in encoders.items()}}


def fit_problems(facts: dict[str, Any], trained: FeatureFacts, modalities: Iterable[str]) -> list[tuple[str, str]]:
    """What differs between the features ``facts`` (:func:`feature_facts`) and those a checkpoint
    was trained on (``trained``) that a model of ``modalities`` reads, as (what the features are,
    what the checkpoint was trained on) in the user's words: [] when they fit. A fact either side
    does not record is not compared; the compute dtype never is (a warning: xmei.data.dtype_warning)."""
    problems = []

    def compare(found, expected, said) -> None:
        if found is not None and expected is not None and found != expected:
            problems.append((said(found), said(expected)))

    if "video" in modalities:
        if trained.visual_shape is not None:
            compare(facts["visual_shape"], trained.visual_shape, _visual)
        elif facts["visual_shape"] is not None and [facts["num_frames"], facts["visual_size"]] != \
                [trained.num_frames, trained.visual_size]:  # an earlier checkpoint: frames and width only
            problems.append((_visual(facts["visual_shape"]),
                             f"visual features of {trained.num_frames} frames, width {trained.visual_size}"))
    if "audio" in modalities:
        if trained.audio_shape is not None:
            compare(facts["audio_shape"], trained.audio_shape, _audio)
        else:
            compare(facts["audio_shape"] and [facts["num_audio_clips"], facts["audio_size"]],
                    [trained.num_audio_clips, trained.audio_size], _audio)
        compare(facts["audio_clip_seconds"], trained.audio_clip_seconds, lambda s: f"audio windows of {s:g} s")
        compare(facts["audio_layers"], trained.audio_layers,
                lambda n: f"audio features averaged over HuBERT's last {n} layer{'s' * (n != 1)}")
    compare(facts["caption_tokens"], trained.caption_tokens, lambda n: f"captions of {n} tokens")
    kinds = [*(k for m, k in (("video", "visual"), ("audio", "audio")) if m in modalities), "caption_tokenizer"]
    for kind in kinds if facts["encoders"] and trained.encoders else ():  # the same files: the same encoder
        found, expected = facts["encoders"].get(kind), trained.encoders.get(kind)
        if found and expected and found.get("config_sha256") != expected.get("config_sha256"):
            problems.append((_encoder(kind, found), _encoder(kind, expected)))
    return problems


def _visual(shape: list[int]) -> str:
    kind = "patch" if len(shape) == 3 else "pooled"  # [frames, tokens, width] or [frames, width]
    return f"{kind} visual features {tuple(shape)}"


def _audio(shape: list[int]) -> str:
    return f"audio features of {shape[0]} windows, width {shape[-1]} {tuple(shape)}"


def _encoder(kind: str, identity: dict[str, str]) -> str:
    name = identity.get("name")
    what = {"visual": "visual features of", "audio": "audio features of", "caption_tokenizer": "captions of"}[kind]
    encoder = "the caption tokenizer" if kind == "caption_tokenizer" else "the encoder"
    return f"{what} {encoder}{f' {name}' if name else ''} whose config files hash to {identity.get('config_sha256')}"


def check_fit(facts: dict[str, Any], settings: XMEISettings, checkpoint: str | Path, what: str,
              hint: str = "use a store extracted as the checkpoint's training stores were (the extract section and "
                              "models of its config.yaml)") -> None:
    """A :class:`FeatureMismatch` when the features ``facts`` (of ``what``: a store's path, or
    where a clip's features come from) are not those the checkpoint at ``checkpoint`` (its
    ``settings``) was trained on:
    "WHAT has pooled visual features (8, 32); the checkpoint CK was trained on patch visual features
    (8, 257, 64); HINT", every difference named (joined by "and" on each side)."""
    problems = fit_problems(facts, settings.features, settings.modalities)
    if problems:
        found, trained = (" and ".join(side) for side in zip(*problems))
        raise FeatureMismatch(f"{what} has {found}; the checkpoint {checkpoint} was trained on {trained}; {hint}")


def open_stores(paths: Sequence[str | Path], modalities: Iterable[str]) -> list[FeatureStore]:
    """The stores at ``paths``, checked for what a model of ``modalities`` reads, without decoding
    a clip: each opens, holds those modalities' features, and has every shard file they need, with
    a whole index (:meth:`~stores.FeatureStore.check_files`); all hold the features of the same
    encoders and settings. Else a StoreError naming the store, and the file where one is wrong."""
    modalities = [m for m in MODALITIES if m in modalities]
    stores = [FeatureStore(p) for p in paths]
    for path, store in zip(paths, stores):
        lacking = [FEATURES[m] for m in modalities if FEATURES[m] not in store.features]
        if lacking:
            raise StoreError(f"{path}: no {' or '.join(lacking)} features, which model.modalities {modalities} needs")
        # a missing or damaged shard file: an error now (no clip decoded), not zeros or a stop mid-epoch
        store.check_files([*(FEATURES[m] for m in modalities), "has_audio"])
    # another compute dtype is no other feature layout: a warning where the stores are read (xmei.data.dtype_warning)
    facts = [{k: v for k, v in feature_facts(s).items() if k != "compute_dtype"} for s in stores]
    for path, store, f in zip(paths[1:], stores[1:], facts[1:]):
        if f != facts[0] or stores[0].attrs["encoders"] != store.attrs["encoders"]:
            raise StoreError(f"{path}: features {f} from other encoders or settings than {paths[0]}")
    return stores


def check_store_labels(store: FeatureStore, emotions, intents, config: str) -> None:
    """The label sets a store was extracted with (its attributes) are the config's, in any order
    (a model learns, answers and is scored in its config's labels); a StoreError naming both
    otherwise. ``config`` names where the config came from."""
    held = store.attrs.get("labels")
    if held is None:
        return
    for key, labels in (("emotions", emotions), ("intents", intents)):
        if set(held.get(key, ())) != set(labels.labels):
            raise StoreError(f"{store.path} was extracted with the {labels.kind} labels {held.get(key)}, but {config} "
                             f"has {list(labels.labels)}: use a store extracted with the config's label sets")
