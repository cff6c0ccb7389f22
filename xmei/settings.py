"""What builds an XMEI-Qwen, and the checks of the stores it reads: all without torch.

    stores = open_stores(paths, cfg.model.modalities)     # each checked: features, shard files, same encoders
    check_store_labels(stores[0], cfg.emotions, cfg.intents, "--config tiny.yaml")
    settings = XMEISettings.from_config(cfg, caption_vocab_size=..., **feature_facts(stores[0]))

A command checks its inputs with these (and a checkpoint's files with
:func:`xmei.checkpoint.verify_checkpoint`, which reads its settings) before it imports torch,
transformers or peft, and before it builds a model: a damaged or unfit input is named in
seconds, not after a 7B LLM has loaded. So this module imports neither; the torch parts that the
settings describe (:class:`~xmei.lqformer.LQFormerConfig`, :class:`~xmei.prompt.PromptBuilder`)
are imported by the two methods that make them, which only a model being built calls.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stores import FeatureStore, StoreError
from xmei.config import ModelConfig

if TYPE_CHECKING:
    from xmei.lqformer import LQFormerConfig
    from xmei.prompt import PromptBuilder

__all__ = ["FEATURES", "MODALITIES", "FeatureFacts", "XMEISettings", "check_store_labels", "feature_facts",
           "open_stores"]

FEATURES = {"video": "visual", "audio": "audio"}  # modality (batch key) -> store array
MODALITIES = tuple(FEATURES)


@dataclass
class FeatureFacts:
    """What stage 1 stored, read from a store's attributes (:func:`feature_facts`)."""

    visual_size: int  # feature widths
    audio_size: int
    num_frames: int  # frames / audio windows per clip
    num_audio_clips: int
    caption_vocab_size: int  # the caption tokenizer's vocabulary
    caption_tokens: int  # caption ids per description
    compute_dtype: str | None = None  # the encoders' dtype in stage 1 (None: not recorded by an earlier xmei)


@dataclass
class XMEISettings:
    """What builds an XMEI-Qwen: the run config's ``model`` section itself (no renamed copy: a key
    added there reaches the model) and the feature facts of stage 1."""

    model: ModelConfig
    features: FeatureFacts

    @classmethod
    def from_config(cls, cfg, **features: int) -> "XMEISettings":
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


def feature_facts(store: FeatureStore) -> dict[str, int | str | None]:
    """What the model needs to know about the features, from the store's attributes (0 for a
    modality the store has no features of; compute_dtype None for a store that does not say)."""
    feats = store.attrs["features"]
    visual, audio = (feats.get(name, {"shape": [0, 0]})["shape"] for name in ("visual", "audio"))
    return {"visual_size": visual[-1], "audio_size": audio[-1], "num_frames": visual[0], "num_audio_clips": audio[0],
            "caption_tokens": store.attrs["extract"]["caption_tokens"],
            "compute_dtype": store.attrs.get("compute_dtype")}


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
