"""`xmei predict`: one raw clip through stage 1's own functions and a checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.decode import MediaError
from pipeline.decode_pool import Clip, prepare
from pipeline.encoders import EncoderSettings, Encoders, preparation, tokenize_captions
from xmei.distributed import resolve_precision
from xmei.generate import GenerationSettings, answer, prompt_batch
from xmei.model import XMEIQwen
from xmei.parse import parse_answer

__all__ = ["clip_features", "predict_clip"]


def clip_features(cfg, video: Path, audio: Path | None, video_description: str, audio_description: str) -> dict:
    """The features of one clip, exactly as `xmei extract` stores them (raises MediaError); an
    empty description is hidden (its caption mask zero), as caption dropout hides them in training."""
    for kind, path in (("video", video), ("audio", audio)):
        if path is not None and Path(path).is_dir():
            raise MediaError(path, kind, f"a folder, not the {kind} file")
    settings = EncoderSettings.from_config(cfg)
    prepared = prepare(Clip(str(video), str(audio or ""), preparation(settings)))  # a bad file: before models load
    features = Encoders(settings).encode([prepared])
    captions = tokenize_captions(str(cfg.model.caption_tokenizer_path),
                                 {"video": [video_description], "audio": [audio_description]},
                                 cfg.extract.caption_tokens)
    sample = {"video": features["visual"][0], "audio": features["audio"][0],
              "has_audio": int(features["has_audio"][0]),  # no audio at all: zeros, flagged, as in the store
              **{k: v[0] for k, v in captions.items()}}
    for kind, text in (("video", video_description), ("audio", audio_description)):
        if not text.strip():  # no description: hidden, as caption dropout hides them in training
            sample[f"{kind}_caption_mask"][:] = 0
    return sample


def predict_clip(cfg, checkpoint: Path, video: Path, audio: Path | None, subtitle: str, video_description: str = "",
                 audio_description: str = "", device: torch.device | str = "cpu") -> dict:
    """Emotion, intent and explanation of one clip; the model on ``device`` (the encoders on
    extract.device). ``has_audio`` false: neither the video nor ``audio`` has a track (the model
    uses its learned no-audio context); ``subtitle_cut``: the subtitle was cut to fit
    model.max_length, as in training."""
    sample = clip_features(cfg, video, audio, video_description, audio_description)
    sample["texts"] = {"subtitle": subtitle}
    model = XMEIQwen.from_checkpoint(checkpoint, llm=cfg.model.llama_model_path, device=device,
                                     dtype=resolve_precision(cfg.run, device)).eval()
    builder = model.prompt_builder()
    batch = prompt_batch(model, [sample], builder)
    subtitle_cut = len(builder.prompt(subtitle, budget=sys.maxsize)) > builder.max_length
    text, cut_off = answer(model, batch, GenerationSettings.from_config(cfg, 1))[0]
    parsed = parse_answer(text, cfg.emotions, cfg.intents)
    missing = [kind for kind, text in (("video", video_description), ("audio", audio_description))
               if kind in model.settings.modalities and not text.strip()]
    return {"video": str(video), "emotion": parsed.emotion, "intent": parsed.intent,
            "explanation": parsed.explanation, "text": text, "cut_off": cut_off, "has_audio": bool(sample["has_audio"]),
            "without_descriptions": missing, "subtitle_cut": subtitle_cut}
