"""Generation from a checkpoint: over a store split (`xmei eval`) or one raw clip (`xmei predict`).

Prompts are left-padded into batches and decoded with the KV cache, greedily (``num_beams`` 1)
or by beam search, under a generation config built here in full (never the LLM folder's
generation_config.json); the answer is parsed into emotion / intent / explanation. An answer
with no end-of-turn token among its ``max_new_tokens`` is flagged ``cut_off``.

Constrained (the default, ``eval.constrained``), the emotion and intent words can only be labels
of the sets (xmei.constrain), so no answer is invalid; the explanation is free. ``compare_free``
decodes every batch freely as well, into each row's ``free`` answer, for results.json's
``free_decoding`` (same checkpoint, same clips).

Every answer carries its label probabilities (xmei.probabilities: the constrained decoder's own
distribution over the label trie, in the answer's context), computed from the same batch and the
generated ids in one more pass, constrained or not; a row holds them as ``emotion_probs`` and
``intent_probs`` ({label: probability} in label-set order).

Under ``torchrun`` the store's batches (the very batches of one process) are dealt out, batch j
to rank j % world, and rank 0 puts every rank's rows back in store order: the same predictions
as one process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader
from transformers import GenerationConfig, LogitsProcessorList

from xmei.constrain import LabelConstraint
from xmei.data import StoreSamples
from xmei.distributed import Distributed
from xmei.errors import UserError
from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS
from xmei.model import XMEIQwen
from xmei.parse import parse_answer
from xmei.probabilities import label_probabilities
from xmei.prompt import PromptBuilder

__all__ = ["Answer", "GenerationError", "GenerationSettings", "answer", "generate_store", "generation_config",
           "label_constraint", "prompt_batch"]


class GenerationError(UserError, ValueError):
    """Generation settings that cannot work (e.g. too few new tokens for the constrained head)."""


@dataclass(frozen=True)
class GenerationSettings:
    """What the generation config is built from (eval.* of the run config), the batch size, and
    the labels that constrained decoding admits (the config's label sets)."""

    max_new_tokens: int = 128
    num_beams: int = 1  # 1: greedy
    batch_size: int = 16
    constrained: bool = True  # emotion and intent only from the labels below; False: free decoding
    emotions: tuple[str, ...] = DEFAULT_EMOTIONS  # generate_store takes them from its label sets
    intents: tuple[str, ...] = DEFAULT_INTENTS

    @classmethod
    def from_config(cls, cfg, batch_size: int | None = None) -> "GenerationSettings":
        """eval.max_new_tokens, eval.num_beams, eval.constrained, (unless given) run.batch_size_eval,
        and the labels."""
        return cls(cfg.eval.max_new_tokens, cfg.eval.num_beams,
                   cfg.run.batch_size_eval if batch_size is None else batch_size,
                   cfg.eval.constrained, cfg.emotions.labels, cfg.intents.labels)


class Answer(NamedTuple):
    text: str  # special tokens dropped
    cut_off: bool  # max_new_tokens reached without an end-of-turn token
    # {label: probability} over the label sets in their order (xmei.probabilities); None: not computable
    emotion_probs: dict[str, float] | None = None
    intent_probs: dict[str, float] | None = None


def generation_config(model: XMEIQwen, settings: GenerationSettings) -> GenerationConfig:
    """Greedy or beam search with every field that shapes the answer set here, and installed as the
    base LLM's own ``generation_config`` as well: ``generate()`` fills each field left unset in
    the config it is given from the model's, which comes from the LLM folder's file."""
    tokenizer = model.tokenizer
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=False,
        temperature=1.0, top_k=50, top_p=1.0,  # sampling only: the library's neutral defaults
        repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=1,
        eos_token_id=tokenizer.eos_token_id,  # the end of the assistant's turn (<|im_end|> for Qwen chat)
        pad_token_id=tokenizer.pad_token_id, use_cache=True)
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm  # under peft
    llm.generation_config = config
    return config


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
    for key in [k for k in samples[0] if k != "texts"]:  # the model's modalities, their captions, has_audio
        batch[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
    return batch


def label_constraint(model: XMEIQwen, settings: GenerationSettings) -> LabelConstraint | None:
    """The constraint of ``settings``' labels on the model's tokenizer; None when decoding freely.
    A ``max_new_tokens`` too short for the answer head is an error (the head would be cut)."""
    if not settings.constrained:
        return None
    constraint = LabelConstraint(model.tokenizer, settings.emotions, settings.intents)
    if settings.max_new_tokens < constraint.depth:
        raise GenerationError(f"eval.max_new_tokens {settings.max_new_tokens} cannot hold the answer head that "
                         f"constrained decoding writes ({constraint.depth} tokens): raise it, or decode freely "
                         "(eval.constrained=false)")
    return constraint


def _label_trie(model: XMEIQwen, settings: GenerationSettings) -> LabelConstraint | None:
    """The trie of ``settings``' labels for the probabilities of a free answer; None when this
    tokenizer cannot spell the heads apart (constrained decoding would refuse to start)."""
    try:
        return LabelConstraint(model.tokenizer, settings.emotions, settings.intents)
    except ValueError:
        return None


@torch.no_grad()
def answer(model: XMEIQwen, batch: dict[str, torch.Tensor], settings: GenerationSettings,
           constraint: LabelConstraint | None = None, streamer=None) -> list[Answer]:
    """The generated answer of each sample, with its label probabilities, on the model's device.
    ``constraint``: the trie of ``settings``' labels (default: built here), which constrains the
    answer under ``settings.constrained`` and is what the probabilities are over either way.
    ``streamer``: a transformers streamer given the new ids as they come (one sample, greedy)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    config = generation_config(model, settings)
    if constraint is None:
        constraint = label_constraint(model, settings) if settings.constrained else _label_trie(model, settings)
    extra = {"logits_processor": LogitsProcessorList([constraint.processor()])} if settings.constrained else {}
    if streamer is not None:
        extra["streamer"] = streamer
    ids = model.generate(batch, config, **extra)  # (B, new tokens); rows that ended are padded
    texts = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
    ended = (ids == config.eos_token_id).any(1).tolist()
    probs = label_probabilities(model, batch, ids, constraint) if constraint else [(None, None)] * len(texts)
    return [Answer(text, not end, *p) for text, end, p in zip(texts, ended, probs)]


def generate_store(model: XMEIQwen, store: Path, emotions, intents, settings: GenerationSettings,
                   progress: Callable[[int, int], None] | None = None, zero_features: bool = False,
                   dist: Distributed | None = None, compare_free: bool = False, hide_captions: bool = False,
                   ignore_has_audio: bool = False) -> tuple[list[dict] | None, float]:
    """Predictions for every ok clip of ``store`` in store order, and clips/s over all ranks.
    Constrained decoding admits the labels of ``emotions`` / ``intents`` (the sets it parses
    with); ``compare_free`` (constrained only) adds each clip's freely decoded answer as the row's
    ``free``: {text, cut_off, emotion, intent, explanation}. ``progress(done, total)`` counts this
    rank's clips. ``zero_features`` replaces the model's video / audio features by zeros (the
    ablation: what do the media carry?); ``hide_captions`` hides every description (as on a raw
    clip); ``ignore_has_audio`` tells the model every clip has audio (its absent-audio context
    unused). With ``dist`` of several ranks, rank 0 gets every rank's rows; the others get None."""
    if compare_free and not settings.constrained:
        raise ValueError("compare_free compares constrained answers with free ones, but settings.constrained is False")
    settings = replace(settings, emotions=emotions.labels, intents=intents.labels)
    constraint = label_constraint(model, settings) or _label_trie(model, settings)  # once for every batch
    dist = dist or Distributed(0, 1, 0, next(model.parameters()).device)
    model.eval()
    builder = model.prompt_builder()
    data = StoreSamples([store], modalities=model.settings.modalities)
    batches = list(BatchSampler(range(len(data)), settings.batch_size, drop_last=False))  # as one process has them
    mine = list(range(dist.rank, len(batches), dist.world))
    loader = DataLoader(data, batch_sampler=[batches[j] for j in mine], collate_fn=list)
    parts, done, total = [], 0, sum(len(batches[j]) for j in mine)
    dist.barrier()
    start = time.perf_counter()
    for j, samples in zip(mine, loader):
        batch = prompt_batch(model, samples, builder)
        if zero_features:
            for m in model.settings.modalities:
                batch[m] = torch.zeros_like(batch[m])
        if hide_captions:
            for m in model.settings.modalities:
                batch[f"{m}_caption_mask"] = torch.zeros_like(batch[f"{m}_caption_mask"])
        if ignore_has_audio:
            batch["has_audio"] = torch.ones_like(batch["has_audio"])
        answers = answer(model, batch, settings, constraint)
        free = answer(model, batch, replace(settings, constrained=False), constraint) if compare_free \
            else [None] * len(samples)
        rows = []
        for sample, one, free_one in zip(samples, answers, free):
            t = sample["texts"]
            rows.append({"video_id": t["video_id"], **_parsed(one, emotions, intents), "ref_emotion": t["emotion"],
                         "ref_intent": t["intent"], "ref_explanation": t["explanation"]})
            if free_one is not None:
                rows[-1]["free"] = _parsed(free_one, emotions, intents)
        parts.append((j, rows))
        done += len(rows)
        if progress:
            progress(done, total)
    gathered = dist.gather(parts)  # rank 0: every rank's [(batch index, rows), ...]
    if not dist.main:
        return None, 0.0
    ordered = sorted((part for rank_parts in gathered for part in rank_parts), key=lambda part: part[0])
    rows = [row for _, batch_rows in ordered for row in batch_rows]
    return rows, len(rows) / max(time.perf_counter() - start, 1e-9)


def _parsed(one: Answer, emotions, intents) -> dict:
    """A prediction row's answer fields: text, cut_off, emotion, intent, explanation, and
    emotion_probs / intent_probs where the answer has them."""
    parsed = parse_answer(one.text, emotions, intents)
    probs = {f"{kind}_probs": p for kind, p in (("emotion", one.emotion_probs), ("intent", one.intent_probs))
             if p is not None}
    return {"text": one.text, "cut_off": one.cut_off, "emotion": parsed.emotion, "intent": parsed.intent,
            "explanation": parsed.explanation, **probs}
