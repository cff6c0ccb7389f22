"""The LQ-Former (Language-Query Former): a small BERT-style transformer between a frozen
encoder and the LLM, one per modality.

Its queries are the embedded caption tokens of the clip's description (its own word + position
table over the caption tokenizer's vocab) followed by learnable query vectors; every layer
self-attends over the queries (caption padding masked) and cross-attends to the modality's
features, to which a learned position embedding per frame / audio clip is added first.
``query_mode="learned"`` gives the standard Q-Former (all queries learnable): the ablation.

A sample flagged absent (``present`` False: a clip without audio, whose stored features are
zeros) is given a learned ``absent`` vector (D,) in place of every one of its feature vectors;
the position embeddings are added to it as to real features, so the model sees "no audio"
rather than the features of silence, and whatever the zeros were does not matter.

Initialization as BERT / BLIP-2: Linear and Embedding weights, the learned queries and ``absent``
N(0, initializer_range), biases zero, LayerNorm weight 1 and bias 0. The caption word table may
then be replaced by a BERT checkpoint's (``load_caption_embeddings``).

Shapes: features (B, F, T, D) patch tokens or (B, F, D) pooled / audio; captions (B, C);
present (B,); output (B, Q, H) with Q = num_queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["LQFormer", "LQFormerConfig", "LQFormerOutput"]


@dataclass
class LQFormerConfig:
    feature_size: int  # width of the encoder features (1024 for ViT-L/14 and HuBERT-Large)
    num_positions: int  # frames / audio clips per sample (8)
    caption_vocab_size: int  # the caption tokenizer's vocab (30522 for bert-base-uncased)
    num_caption_tokens: int = 16
    num_queries: int = 32  # caption tokens + learned queries (language), or all learned
    query_mode: str = "language"
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    cross_attention_freq: int = 1
    layer_norm_eps: float = 1e-12  # BERT's
    initializer_range: float = 0.02  # std of the weights' normal init (BERT's, BLIP-2's)

    @property
    def num_learned_queries(self) -> int:
        return self.num_queries - (self.num_caption_tokens if self.query_mode == "language" else 0)


@dataclass
class LQFormerOutput:
    last_hidden_state: torch.Tensor  # (B, Q, H), after the output projection
    cross_attentions: tuple[torch.Tensor, ...] | None = None  # per cross-attention layer: (B, heads, Q, F*T)


class Attention(nn.Module):
    """Multi-head attention; keys/values may come from another width (cross-attention)."""

    def __init__(self, hidden: int, heads: int, kv_size: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(kv_size, hidden)
        self.v_proj = nn.Linear(kv_size, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, Q, H), context (B, K, kv_size), key_mask (B, K) bool, True = attend."""
        b, q, _ = x.shape
        k = context.shape[1]

        def split(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, n, hd)

        query, key, value = split(self.q_proj(x), q), split(self.k_proj(context), k), split(self.v_proj(context), k)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K)
        drop = self.dropout if self.training else 0.0
        if need_weights:
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, heads, Q, K)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, drop, self.training) @ value
        else:
            weights = None
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, q, -1)  # (B, Q, H)
        return self.o_proj(out), weights


class LQFormerLayer(nn.Module):
    """Post-norm BERT layer: self-attention, cross-attention (optional), feed-forward."""

    def __init__(self, config: LQFormerConfig, has_cross_attention: bool):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = Attention(h, config.num_heads, h, config.dropout)
        self.self_attn_norm = nn.LayerNorm(h, eps=eps)
        self.cross_attn = Attention(h, config.num_heads, config.feature_size, config.dropout) \
            if has_cross_attention else None
        self.cross_attn_norm = nn.LayerNorm(h, eps=eps) if has_cross_attention else None
        self.fc1 = nn.Linear(h, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, query_mask: torch.Tensor, features: torch.Tensor,
                need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, _ = self.self_attn(x, x, query_mask)
        x = self.self_attn_norm(x + self.dropout(attended))
        weights = None
        if self.cross_attn is not None:
            attended, weights = self.cross_attn(x, features, None, need_weights)
            x = self.cross_attn_norm(x + self.dropout(attended))
        x = self.mlp_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))
        return x, weights


class LQFormer(nn.Module):
    def __init__(self, config: LQFormerConfig):
        super().__init__()
        if config.query_mode not in ("language", "learned"):
            raise ValueError(f"query_mode must be 'language' or 'learned', got {config.query_mode!r}")
        if config.num_learned_queries < 0:
            raise ValueError(f"{config.num_queries} queries cannot hold {config.num_caption_tokens} caption tokens")
        self.config = config
        h = config.hidden_size
        if config.query_mode == "language":  # the learned mode has no caption queries, so no table
            self.word_embeddings = nn.Embedding(config.caption_vocab_size, h)
            self.position_embeddings = nn.Embedding(config.num_caption_tokens, h)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_learned_queries, h))
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        # per-dimension statistics of the training features (set by the trainer, saved with the
        # weights): frozen encoders' features share a large common component that would
        # otherwise drown the differences between clips
        self.register_buffer("feature_mean", torch.zeros(config.feature_size))
        self.register_buffer("feature_std", torch.ones(config.feature_size))
        self.feature_norm = nn.LayerNorm(config.feature_size)
        self.absent = nn.Parameter(torch.empty(config.feature_size))  # a sample's context when it has none
        self.feature_positions = nn.Embedding(config.num_positions, config.feature_size)  # per frame / clip
        self.layers = nn.ModuleList(
            LQFormerLayer(config, has_cross_attention=i % config.cross_attention_freq == 0)
            for i in range(config.num_layers))
        self.output_proj = nn.Linear(h, h)
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        nn.init.normal_(self.absent, std=config.initializer_range)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's: normal(0, initializer_range) weights, zero biases, LayerNorm (1, 0)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def load_caption_embeddings(self, folder: str | Path) -> None:
        """Copy the word embeddings (V, H) of a BERT checkpoint folder (the caption tokenizer's
        model, e.g. bert-base-uncased) into the caption word table."""
        from transformers import AutoModel

        c = self.config
        if c.query_mode != "language":
            raise ValueError(f"{folder}: query_mode {c.query_mode!r} has no caption word table to load into")
        table = AutoModel.from_pretrained(str(folder)).get_input_embeddings().weight  # (V, H)
        vocab, width = table.shape
        if vocab != c.caption_vocab_size:
            raise ValueError(f"{folder}: word embeddings for {vocab} tokens, but the caption tokenizer has "
                             f"{c.caption_vocab_size}; use the BERT the captions were tokenized with")
        if width != c.hidden_size:
            raise ValueError(f"{folder}: word embeddings {width} wide, but the LQ-Former is {c.hidden_size} wide; "
                             f"set model.qformer_hidden_size to {width} (bert-base is 768)")
        self.word_embeddings.weight.copy_(table)

    @torch.no_grad()
    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension mean and std (D,) of the training features."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-6))

    def queries(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query embeddings (B, Q, H) and their self-attention mask (B, Q) bool."""
        b = caption_ids.shape[0]
        learned = self.query_tokens.expand(b, -1, -1)
        if self.config.query_mode == "learned":
            return learned, torch.ones(b, learned.shape[1], dtype=torch.bool, device=learned.device)
        keep = caption_mask.bool()  # (B, C)
        positions = torch.arange(caption_ids.shape[1], device=caption_ids.device)
        # a padded position carries no word: whatever id sits under the mask changes nothing
        words = self.word_embeddings(caption_ids) * keep[..., None]
        captions = words + self.position_embeddings(positions)[None]  # (B, C, H)
        mask = torch.cat([keep, torch.ones(b, learned.shape[1], dtype=torch.bool, device=keep.device)], 1)
        return torch.cat([captions, learned], 1), mask

    def forward(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
                output_attentions: bool = False, *, present: torch.Tensor | None = None) -> LQFormerOutput:
        """``present`` (B,) bool or 0/1: False gives the sample the learned ``absent`` context in
        place of its features; None: all present."""
        if features.dim() == 3:
            features = features[:, :, None, :]  # (B, F, D) -> (B, F, 1, D)
        b, f, t, d = features.shape
        if f != self.config.num_positions or d != self.config.feature_size:
            raise ValueError(f"features of shape {tuple(features.shape)}, expected "
                             f"(B, {self.config.num_positions}, [tokens,] {self.config.feature_size})")
        if present is None:
            present = torch.ones(b, dtype=torch.bool, device=features.device)
        elif present.shape != (b,):
            raise ValueError(f"present of shape {tuple(present.shape)}, expected ({b},): one flag per sample")
        positions = self.feature_positions(torch.arange(f, device=features.device))  # (F, D)
        standard = self.feature_norm((features - self.feature_mean) / self.feature_std)  # (B, F, T, D)
        # always through `where`, so `absent` takes part in every step (a zero gradient when all
        # are present), as DistributedDataParallel expects of every parameter
        keep = present.to(features.device).bool()[:, None, None, None]  # (B, 1, 1, 1)
        standard = torch.where(keep, standard, self.absent)
        context = (standard + positions[None, :, None, :]).reshape(b, f * t, d)  # (B, F*T, D)
        x, mask = self.queries(caption_ids, caption_mask)
        x = self.dropout(self.embed_norm(x))
        weights = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, w = checkpoint(layer, x, mask, context, output_attentions, use_reentrant=False)
            else:
                x, w = layer(x, mask, context, output_attentions)
            if w is not None:
                weights.append(w)
        return LQFormerOutput(self.output_proj(x), tuple(weights) if output_attentions else None)
