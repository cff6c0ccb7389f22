"""`xmei predict`: one raw clip through stage 1's own functions and a checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.decode_pool import Clip, prepare
from pipeline.encoders import EncoderSettings, Encoders, tokenize_captions
from xmei.generate import GenerationSettings, answer, prompt_batch
from xmei.model import XMEIQwen
from xmei.parse import parse_answer
from xmei.prompt import PromptBuilder

__all__ = ["clip_features", "predict_clip"]


def clip_features(cfg, video: Path, audio: Path | None, video_description: str, audio_description: str) -> dict:
    """The features of one clip, exactly as `xmei extract` stores them (raises MediaError)."""
    encoders = Encoders(EncoderSettings.from_config(cfg))
    features = encoders.encode([prepare(Clip(str(video), str(audio or ""), encoders.preparation))])
    captions = tokenize_captions(str(cfg.model.caption_tokenizer_path),
                                 {"video": [video_description], "audio": [audio_description]},
                                 cfg.extract.caption_tokens)
    # no audio at all: zeros, flagged, as in the store
    return {"video": features["visual"][0], "audio": features["audio"][0], "has_audio": int(features["has_audio"][0]),
            **{k: v[0] for k, v in captions.items()}}


def predict_clip(cfg, checkpoint: Path, video: Path, audio: Path | None, subtitle: str, video_description: str = "",
                 audio_description: str = "", device: torch.device | str = "cpu") -> dict:
    """Emotion, intent and explanation of one clip; the model on ``device`` (the encoders on
    extract.device)."""
    sample = clip_features(cfg, video, audio, video_description, audio_description)
    sample["texts"] = {"subtitle": subtitle}
    model = XMEIQwen.from_checkpoint(checkpoint, device=device).eval()
    s = model.settings
    builder = PromptBuilder(model.tokenizer, s.num_video_query_token, s.num_audio_query_token, s.prompt_format,
                            s.max_length)
    text, cut_off = answer(model, prompt_batch(model, [sample], builder), GenerationSettings.from_config(cfg, 1))[0]
    parsed = parse_answer(text, cfg.emotions, cfg.intents)
    return {"video": str(video), "emotion": parsed.emotion, "intent": parsed.intent,
            "explanation": parsed.explanation, "text": text, "cut_off": cut_off, "has_audio": bool(sample["has_audio"])}
