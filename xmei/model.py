"""XMEI-Qwen: two LQ-Formers whose outputs take the places of the prompt's placeholder tokens
in a (LoRA-tuned) Qwen2.5 causal LM.

    video (B, F, T, Dv) --video_lqformer--> (B, Qv, H) --video_proj--> (B, Qv, E) -> <ImageHere> x Qv
    audio (B, W, Da)    --audio_lqformer--> (B, Qa, H) --audio_proj--> (B, Qa, E) -> <AudioHere> x Qa

Only the LQ-Formers, the projections and the LoRA adapter (plus any ``lora_modules_to_save``)
train. A checkpoint is a folder: ``trainable.safetensors`` (LQ-Formers + projections),
``adapter/`` (peft ``save_pretrained``), ``xmei_model.json`` (the model settings) and
``config.yaml`` (the resolved run config, when given); loading never unpickles.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmei.config import PLACEHOLDER_TOKENS
from xmei.distributed import llm_dtype
from xmei.lqformer import LQFormer, LQFormerConfig
from xmei.prompt import AUDIO_TOKEN, VIDEO_TOKEN

__all__ = ["CHECKPOINT_FILES", "XMEIQwen", "XMEISettings"]

CHECKPOINT_FILES = {"settings": "xmei_model.json", "trainable": "trainable.safetensors", "adapter": "adapter",
                    "llm": "llm", "config": "config.yaml"}
MODALITIES = ("video", "audio")


@dataclass
class XMEISettings:
    """What builds an XMEI-Qwen: the model config plus the feature facts of stage 1."""

    llm_path: str
    visual_size: int  # feature widths, frames and clips: read from the store's attributes
    audio_size: int
    num_frames: int
    num_audio_clips: int
    caption_vocab_size: int
    caption_tokens: int
    num_video_query_token: int = 32
    num_audio_query_token: int = 32
    query_mode: str = "language"
    qformer_hidden_size: int = 768
    qformer_num_layers: int = 2
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    qformer_dropout: float = 0.1
    cross_attention_freq: int = 1
    lora_r: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=list)
    lora_modules_to_save: list[str] = field(default_factory=list)
    frozen_llm: bool = False
    use_lora: bool = True
    gradient_checkpointing: bool = False
    prompt_format: str = "chat"
    max_length: int = 1024

    @classmethod
    def from_config(cls, cfg, **features: Any) -> "XMEISettings":
        """``features``: visual_size, audio_size, num_frames, num_audio_clips, caption_vocab_size,
        caption_tokens (from a store's attributes, or an encoder's config)."""
        model = asdict(cfg.model)
        keys = {f.name for f in fields(cls)}
        return cls(llm_path=str(cfg.model.llama_model_path), **features,
                   **{k: v for k, v in model.items() if k in keys and k != "llm_path"})

    def lqformer(self, modality: str) -> LQFormerConfig:
        video = modality == "video"
        return LQFormerConfig(
            feature_size=self.visual_size if video else self.audio_size,
            num_positions=self.num_frames if video else self.num_audio_clips,
            caption_vocab_size=self.caption_vocab_size, num_caption_tokens=self.caption_tokens,
            num_queries=self.num_video_query_token if video else self.num_audio_query_token,
            query_mode=self.query_mode, hidden_size=self.qformer_hidden_size, num_layers=self.qformer_num_layers,
            num_heads=self.qformer_num_heads, intermediate_size=self.qformer_intermediate_size,
            dropout=self.qformer_dropout, cross_attention_freq=self.cross_attention_freq)


def _load_llm(path: str, device: torch.device):
    """The LLM straight onto ``device`` in its dtype (bf16 on a GPU): the weights are read shard by
    shard into place, so no rank holds a full host copy of a 7B model first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(path, dtype=llm_dtype(device), device_map={"": device})
    return llm, AutoTokenizer.from_pretrained(path)


class XMEIQwen(nn.Module):
    def __init__(self, settings: XMEISettings, llm: nn.Module | None = None, tokenizer=None,
                 device: torch.device | str = "cpu"):
        """Wrap ``llm``/``tokenizer`` (loaded from ``settings.llm_path`` onto ``device`` when not
        given); the LQ-Formers and projections are put on the LLM's device."""
        super().__init__()
        if llm is None or tokenizer is None:
            llm, tokenizer = _load_llm(settings.llm_path, torch.device(device))
        self.settings, self.tokenizer = settings, tokenizer
        missing = [t for t in PLACEHOLDER_TOKENS if t not in tokenizer.get_vocab()]
        if missing:  # a real Qwen tokenizer lacks them
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(t)
                                for m, t in zip(MODALITIES, (VIDEO_TOKEN, AUDIO_TOKEN))}
        self.llm = self._wrap_llm(llm)
        hidden = llm.config.hidden_size
        self.video_lqformer = LQFormer(settings.lqformer("video"))
        self.audio_lqformer = LQFormer(settings.lqformer("audio"))
        self.video_proj = nn.Linear(settings.qformer_hidden_size, hidden)
        self.audio_proj = nn.Linear(settings.qformer_hidden_size, hidden)
        for module in self.trainable_modules().values():
            module.to(llm.get_input_embeddings().weight.device)
        if settings.gradient_checkpointing:
            self.video_lqformer.gradient_checkpointing = self.audio_lqformer.gradient_checkpointing = True
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def _wrap_llm(self, llm: nn.Module) -> nn.Module:
        s = self.settings
        llm.requires_grad_(not s.frozen_llm and not s.use_lora)  # trained whole only without adapter
        if s.frozen_llm or not s.use_lora:
            return llm
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                          target_modules=list(s.lora_target_modules), modules_to_save=list(s.lora_modules_to_save) or None,
                          task_type="CAUSAL_LM")
        return get_peft_model(llm, lora)

    # ------------------------------------------------------------------ forward

    def modality_tokens(self, batch: dict[str, torch.Tensor], output_attentions: bool = False):
        """{"video": (B, Qv, E), "audio": (B, Qa, E)} in the LLM's embedding space, and the
        LQ-Former outputs (for their cross-attention weights)."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        tokens, outputs = {}, {}
        for m, lqformer, proj in ((MODALITIES[0], self.video_lqformer, self.video_proj),
                                  (MODALITIES[1], self.audio_lqformer, self.audio_proj)):
            out = lqformer(batch[m].float(), batch[f"{m}_caption_ids"], batch[f"{m}_caption_mask"], output_attentions)
            tokens[m], outputs[m] = proj(out.last_hidden_state).to(dtype), out
        return tokens, outputs

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings (B, L, E) with the modality tokens at the placeholder runs."""
        embeds = self.llm.get_input_embeddings()(batch["input_ids"])
        tokens, _ = self.modality_tokens(batch)
        for m, values in tokens.items():
            where = batch["input_ids"] == self.placeholder_ids[m]  # (B, L)
            counts = where.sum(1)
            if not (counts == values.shape[1]).all():
                raise ValueError(f"each sample needs exactly {values.shape[1]} {m} placeholder tokens, "
                                 f"found {counts.tolist()}")
            embeds = embeds.masked_scatter(where[..., None], values)  # row-major: query order kept
        return embeds

    def forward(self, batch: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None):
        """Causal-LM output; ``loss`` over the target tokens when ``batch`` has ``labels``: their mean,
        or their sum divided by ``num_items_in_batch`` when given (the target tokens of a whole
        optimizer step, all micro-batches and ranks, so each token weighs the same)."""
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return self.llm(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"],
                        labels=batch.get("labels"), **extra)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], generation_config) -> torch.Tensor:
        """Generated token ids (B, new tokens) after the prompts in ``batch`` (left-padded), under
        ``generation_config`` (a transformers GenerationConfig, see xmei.generate)."""
        return self.llm.generate(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"],
                                 generation_config=generation_config)

    # ------------------------------------------------------------------ checkpoints

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"video_lqformer": self.video_lqformer, "audio_lqformer": self.audio_lqformer,
                "video_proj": self.video_proj, "audio_proj": self.audio_proj}

    def save_checkpoint(self, folder: str | Path, config: dict | None = None) -> None:
        """Write the checkpoint folder; ``config`` (the resolved run config) goes to config.yaml."""
        import yaml
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for name, module in self.trainable_modules().items() for k, v in module.state_dict().items()}
        save_file(weights, folder / CHECKPOINT_FILES["trainable"])
        if hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(folder / CHECKPOINT_FILES["adapter"])
        elif not self.settings.frozen_llm:  # the whole LLM trained
            self.llm.save_pretrained(folder / CHECKPOINT_FILES["llm"])
            self.tokenizer.save_pretrained(folder / CHECKPOINT_FILES["llm"])
        (folder / CHECKPOINT_FILES["settings"]).write_text(json.dumps(asdict(self.settings), indent=1) + "\n")
        if config is not None:
            (folder / CHECKPOINT_FILES["config"]).write_text(yaml.safe_dump(config, sort_keys=False))

    @classmethod
    def from_checkpoint(cls, folder: str | Path, llm: str | None = None, trainable: bool = False,
                        device: torch.device | str = "cpu") -> "XMEIQwen":
        """Restore a checkpoint onto ``device``; ``llm`` overrides the base LLM folder recorded in it."""
        from peft import PeftModel

        folder = Path(folder)
        settings = XMEISettings(**json.loads((folder / CHECKPOINT_FILES["settings"]).read_text()))
        if llm is not None:
            settings.llm_path = str(llm)
        full = folder / CHECKPOINT_FILES["llm"]
        base, tokenizer = _load_llm(str(full) if full.is_dir() else settings.llm_path, torch.device(device))
        adapter = folder / CHECKPOINT_FILES["adapter"]
        model = cls(XMEISettings(**{**asdict(settings), "use_lora": False, "frozen_llm": True}), base, tokenizer)
        model.settings = settings
        if adapter.is_dir():  # the adapter's weights load onto the base model's device
            model.llm = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
        elif full.is_dir():
            model.llm.requires_grad_(trainable)
        model.load_trainable(folder)
        return model

    def load_trainable(self, folder: str | Path) -> None:
        """Load the LQ-Formers and projections of a checkpoint folder, checking every key."""
        from safetensors.torch import load_file

        weights = load_file(Path(folder) / CHECKPOINT_FILES["trainable"])
        for name, module in self.trainable_modules().items():
            part = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
            result = module.load_state_dict(part, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"{folder}: {name} weights missing {result.missing_keys}, "
                                 f"unexpected {result.unexpected_keys}")
