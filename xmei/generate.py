"""Generation from a checkpoint: over a store split (`xmei eval`) or one raw clip (`xmei predict`).

Prompts are left-padded into batches and decoded with the KV cache, greedily (``num_beams`` 1)
or by beam search; the answer is parsed into emotion / intent / explanation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from xmei.data import EpochSampler, StoreSamples
from xmei.model import XMEIQwen
from xmei.parse import parse_answer
from xmei.prompt import PromptBuilder

__all__ = ["GenerationSettings", "answer", "generate_store", "prompt_batch"]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    num_beams: int = 1  # 1: greedy
    batch_size: int = 16


def prompt_batch(model: XMEIQwen, samples: list[dict], builder: PromptBuilder) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids (generation appends on the right) and the samples' features."""
    prompts = [builder.prompt(s["texts"]["subtitle"]) for s in samples]
    longest = max(len(p) for p in prompts)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(p)
        mask[i, longest - len(p):] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in ("video", "audio", "video_caption_ids", "video_caption_mask", "audio_caption_ids", "audio_caption_mask"):
        batch[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
    return batch


@torch.no_grad()
def answer(model: XMEIQwen, batch: dict[str, torch.Tensor], settings: GenerationSettings) -> list[str]:
    """The generated answer text of each sample (special tokens dropped)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(batch, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                         do_sample=False, use_cache=True,
                         eos_token_id=model.tokenizer.eos_token_id)
    return model.tokenizer.batch_decode(out, skip_special_tokens=True)


def generate_store(model: XMEIQwen, store: Path, emotions, intents, settings: GenerationSettings,
                   progress: Callable[[int], None] | None = None,
                   zero_features: bool = False) -> tuple[list[dict], float]:
    """Predictions for every ok clip of ``store`` (in store order) and clips/s. ``zero_features``
    replaces the video and audio features by zeros (the ablation: what do the media carry?)."""
    model.eval()
    s = model.settings
    builder = PromptBuilder(model.tokenizer, s.num_video_query_token, s.num_audio_query_token, s.prompt_format,
                            s.max_length)
    data = StoreSamples([store])
    loader = DataLoader(data, batch_sampler=BatchSampler(EpochSampler(data, 0, shuffle=False), settings.batch_size,
                                                         drop_last=False), collate_fn=list)
    rows, start = [], time.perf_counter()
    for samples in loader:
        batch = prompt_batch(model, samples, builder)
        if zero_features:
            batch["video"], batch["audio"] = torch.zeros_like(batch["video"]), torch.zeros_like(batch["audio"])
        for sample, text in zip(samples, answer(model, batch, settings)):
            parsed = parse_answer(text, emotions, intents)
            t = sample["texts"]
            rows.append({"video_id": t["video_id"], "text": text, "emotion": parsed.emotion, "intent": parsed.intent,
                         "explanation": parsed.explanation, "ref_emotion": t["emotion"], "ref_intent": t["intent"],
                         "ref_explanation": t["explanation"]})
        if progress:
            progress(len(samples))
    return rows, len(rows) / max(time.perf_counter() - start, 1e-9)
