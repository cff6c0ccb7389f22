"""The Python API of prediction on raw clips: a checkpoint loaded once, clips in, typed results out.

    from xmei import Predictor
    predictor = Predictor.from_checkpoint("runs/demo/av_t/checkpoints/step_0000060", device="cuda")
    result = predictor.predict("clip.mp4", subtitle="Well, the train was late.")
    result.emotion, result.emotion_probs, result.explanation, result.visual_attention
    results = predictor.predict_many([{"video": "a.mp4", "subtitle": "Hi."}, {"video": "b.mp4", "subtitle": "No."}])

Process model: one process. The model (LQ-Formers, LoRA Qwen) loads once, on ``device``; the
frozen encoders load on first use, once, on extract.device, and a clip is decoded and encoded by
stage 1's own functions (pipeline.decode_pool.prepare, pipeline.encoders.Encoders), so its
features are those `xmei extract` would store. :meth:`Predictor.predict_many` decodes its clips
in a pool of decode processes (started on first use, kept until :meth:`Predictor.close`), encodes
them extract.batch_size at a time and generates run.batch_size_eval at a time. Every answer is
made by xmei.generate's ``answer`` and parsed by its ``_parsed``, as `xmei eval`'s are.
`xmei predict VIDEO` is :meth:`Predictor.predict`; bulk prediction over a store is xmei.predict.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from pipeline.annotate import Transcriber, find_subtitle
from pipeline.annotations import Record
from pipeline.decode import MediaError
from pipeline.decode_pool import Clip, DecodePool, Failure, Prepared, available_cores, prepare
from pipeline.encoders import (EncoderSettings, Encoders, encoder_identity, feature_specs, preparation,
                               tokenize_captions)
from pipeline.extract import MODEL_KEYS
from xmei.attention import attention_maps, audio_attention
from xmei.checkpoint import verify_checkpoint
from xmei.config import Config, load_config
from xmei.distributed import resolve_device, resolve_precision
from xmei.errors import UserError
from xmei.generate import GenerationSettings, _parsed, answer, label_constraint, prompt_batch
from xmei.model import XMEIQwen
from xmei.settings import check_fit, feature_facts

__all__ = ["Prediction", "PredictError", "Predictor", "check_clip_features", "checkpoint_config"]

GIVEN = "given"  # subtitle_source of a subtitle the caller (or the annotation file) gave


class PredictError(UserError, ValueError):
    """A clip that cannot be predicted (unreadable media, no subtitle): the message names it."""


@dataclass(frozen=True)
class Prediction:
    """One clip's answer. ``emotion`` / ``intent`` are None when the answer could not be parsed
    (free decoding only); ``*_probs``: label -> probability over the config's label set, None
    where they cannot be computed. ``visual_attention``: {query group: (F, P, P)} over each
    sampled frame's patch grid (a model with patch features of the video); ``audio_attention``:
    {query group: (W,)} over the audio windows (a model with audio, on a clip that has some);
    empty where the model has none (xmei.attention)."""

    video: str
    emotion: str | None
    intent: str | None
    emotion_probs: dict[str, float] | None
    intent_probs: dict[str, float] | None
    explanation: str | None
    text: str  # the raw answer
    cut_off: bool  # eval.max_new_tokens reached before the end of the answer
    has_audio: bool  # False: neither the video nor the audio file has a track (the learned no-audio context)
    subtitle: str
    subtitle_source: str  # "given", or where find_subtitle found it (srt, vtt, txt, asr, ...)
    subtitle_cut: bool  # cut to fit model.max_length, as in training
    without_descriptions: tuple[str, ...]  # the modalities whose LQ-Former answered without a description
    visual_attention: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    audio_attention: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Every field but the attention arrays, JSON-ready (`xmei predict --json`)."""
        return {"video": self.video, "emotion": self.emotion, "intent": self.intent,
                "emotion_probs": self.emotion_probs, "intent_probs": self.intent_probs,
                "explanation": self.explanation, "text": self.text, "cut_off": self.cut_off,
                "has_audio": self.has_audio, "subtitle": self.subtitle, "subtitle_source": self.subtitle_source,
                "subtitle_cut": self.subtitle_cut, "without_descriptions": list(self.without_descriptions)}


@dataclass(frozen=True)
class _Request:
    """A clip to predict; a subtitle None is found once the clip has been read (Predictor._answer)."""

    video: Path
    audio: Path | None
    subtitle: str | None
    subtitle_source: str
    video_description: str
    audio_description: str


def checkpoint_config(checkpoint: str | Path, config: str | Path | Config | None = None,
                      sets: Iterable[str] = (), models: str | Path | None = None) -> Config:
    """The config of a prediction with ``checkpoint``: ``config`` (a Config, or a YAML file),
    else the config.yaml saved with the checkpoint, else the defaults; then ``sets``
    ("section.key=value") and ``models`` (a folder as `xmei models tiny` writes). Every file of
    the checkpoint is checked first (a CheckpointError names a damaged one)."""
    verify_checkpoint(checkpoint, config=config is None)
    if isinstance(config, Config):
        if sets or models:
            raise ValueError("sets and models change a config read from a file; apply them to a Config yourself")
        return config
    if config is None and (Path(checkpoint) / "config.yaml").is_file():
        config = Path(checkpoint) / "config.yaml"
    return load_config(config, list(sets), models_dir=models)


def check_clip_features(cfg: Config, checkpoint: str | Path, source: str) -> None:
    """The features a clip extracted with ``cfg`` (from ``source``) has are those the checkpoint
    was trained on: a FeatureMismatch naming the difference otherwise, before a clip is decoded or
    a model loads (the encoders' configs are read, no weights); a missing model folder is a
    ConfigError naming its key."""
    settings = verify_checkpoint(checkpoint, config=False)
    cfg.require_paths(MODEL_KEYS)
    encoders = EncoderSettings.from_config(cfg)
    extracted = {"features": {k: {"shape": list(v.shape)} for k, v in feature_specs(encoders).items()},
                 "extract": cfg.extract.model_dump(),
                 "encoders": encoder_identity(encoders, str(cfg.model.caption_tokenizer_path))}  # as a store records
    check_fit(feature_facts(extracted), settings, checkpoint, f"a clip extracted with {source}",
              "predict with the checkpoint's own extract settings and encoders (its config.yaml, the default)")


class Predictor:
    """A checkpoint ready to predict raw clips (module docstring). ``attention`` false leaves the
    attention maps out (a little faster)."""

    def __init__(self, cfg: Config, checkpoint: str | Path, device: str | torch.device | None = None,
                 source: str = "the checkpoint's config", attention: bool = True):
        check_clip_features(cfg, checkpoint, source)
        self.cfg, self.checkpoint, self.attention = cfg, Path(checkpoint), attention
        self.device = device if isinstance(device, torch.device) else resolve_device(device or cfg.run.device)
        self.model = XMEIQwen.from_checkpoint(checkpoint, llm=cfg.model.llama_model_path, device=self.device,
                                              dtype=resolve_precision(cfg.run, self.device)).eval()
        self.builder = self.model.prompt_builder()
        self.generation = GenerationSettings.from_config(cfg)
        self.constraint = label_constraint(self.model, self.generation)  # a too short max_new_tokens: an error now
        self.encoder_settings = EncoderSettings.from_config(cfg)
        self._encoders: Encoders | None = None
        self._pool: DecodePool | None = None
        self._transcriber: Transcriber | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device | None = None,
                        config: str | Path | Config | None = None, sets: Iterable[str] = (),
                        models: str | Path | None = None, attention: bool = True) -> "Predictor":
        """Load ``checkpoint`` with its own config (see :func:`checkpoint_config`) onto ``device``
        (auto | cpu | cuda | cuda:N; default: the config's run.device). The config's warnings are
        Python warnings."""
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            cfg = checkpoint_config(checkpoint, config, sets, models)
        source = "the checkpoint's config" if config is None else f"config {config}"
        return cls(cfg, checkpoint, device, source + (" with sets" if sets else ""), attention)

    # ------------------------------------------------------------------ the clips

    def predict(self, video: str | Path, subtitle: str | None = None, audio: str | Path | None = None,
                video_description: str = "", audio_description: str = "",
                on_text: Callable[[str], None] | None = None) -> Prediction:
        """One clip (audio: its own track unless ``audio`` names a file). An unreadable file is a
        MediaError naming it; ``subtitle`` None: :meth:`subtitle_of` finds one. ``on_text(answer so
        far)`` is called as the answer is generated (greedy decoding; with beams, once at its end)."""
        request = self._request(video, subtitle, audio, video_description, audio_description)
        return self._answer([request], [self._prepare_one(request)], on_text)[0]

    def predict_many(self, records: Iterable[Mapping[str, Any] | Record],
                     media_root: str | Path | None = None) -> list[Prediction]:
        """Every clip of ``records``, in their order: dicts with the keys of :meth:`predict`
        (``video`` required), or annotation Records (their media paths under ``media_root``).
        Decoded in parallel, encoded and generated in batches; a clip that cannot be read is a
        PredictError naming it (after the others were decoded)."""
        requests = [self._from_record(r, Path(media_root or ".")) for r in records]
        if len(requests) <= 1:  # no decode processes for one clip
            return self._answer(requests, [self._prepare_one(r) for r in requests]) if requests else []
        prepared: list[Prepared] = []
        for i, result in self._decode_pool(len(requests)).map(
                (self._clip(r) for r in requests), 2 * self.encoder_settings.batch_size):
            if isinstance(result, Failure):
                raise PredictError(f"cannot read clip {i} ({requests[i].video}), {result.stage}: {result.reason}")
            prepared.append(result)
        step = self.generation.batch_size
        return [p for k in range(0, len(requests), step)
                for p in self._answer(requests[k:k + step], prepared[k:k + step])]

    def subtitle_of(self, video: Path, audio: Path | None = None) -> tuple[str, str]:
        """(subtitle, source) of a clip given none, by `xmei annotate`'s rules: a sidecar .srt / .vtt /
        .txt beside the video, else speech recognition with the Whisper of model.asr_path (loaded on
        first use, once), else ("", "none"): the model answers without a subtitle."""
        return find_subtitle(video, transcriber=self.transcriber, audio=audio)

    @property
    def transcriber(self) -> Transcriber | None:
        """The Whisper of model.asr_path, loaded on first use (None when the key is not set)."""
        if self._transcriber is None and self.cfg.model.asr_path is not None:
            self._transcriber = Transcriber(self.cfg.model.asr_path, self.cfg.run.device)
        return self._transcriber

    def _request(self, video, subtitle, audio, video_description: str, audio_description: str,
                 subtitle_source: str = GIVEN) -> _Request:
        return _Request(Path(video), Path(audio) if audio else None, subtitle, subtitle_source,
                        video_description or "", audio_description or "")

    def _with_subtitle(self, request: _Request) -> _Request:
        """``request`` with its subtitle: the given one, else :meth:`subtitle_of`'s."""
        if request.subtitle is not None:
            return request
        subtitle, source = self.subtitle_of(request.video, request.audio)
        return replace(request, subtitle=subtitle, subtitle_source=source)

    def _from_record(self, record: Mapping[str, Any] | Record, media_root: Path) -> _Request:
        """A dict of :meth:`Predictor.predict`'s keys, or an annotation Record, as a request."""
        if isinstance(record, Record):
            return self._request(record.video_file(media_root), record.subtitle, record.audio_file(media_root),
                                 record.video_description, record.audio_description)
        unknown = set(record) - {"video", "subtitle", "audio", "video_description", "audio_description",
                                 "subtitle_source"}
        if "video" not in record or unknown:
            raise PredictError(f"a record to predict needs 'video' and may have subtitle, audio, video_description, "
                               f"audio_description, subtitle_source; got {sorted(record)}")
        return self._request(record["video"], record.get("subtitle"), record.get("audio"),
                                 record.get("video_description", ""), record.get("audio_description", ""),
                                 record.get("subtitle_source", GIVEN))

    def close(self) -> None:
        """Stop the decode processes (a later predict_many starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ stage 1 on the clips

    def use_encoders_of(self, other: "Predictor") -> None:
        """Encode with ``other``'s frozen encoders (one copy in memory for both): their stage-1
        settings must be equal, so the features are the same."""
        if other.encoder_settings != self.encoder_settings:
            raise ValueError("the two predictors extract different features; each needs its own encoders")
        self._encoders = other.encoders

    @property
    def encoders(self) -> Encoders:
        if self._encoders is None:
            self._encoders = Encoders(self.encoder_settings)
        return self._encoders

    def _clip(self, request: _Request) -> Clip:
        return Clip(str(request.video), str(request.audio or ""), preparation(self.encoder_settings))

    def _prepare_one(self, request: _Request) -> Prepared:
        for kind, path in (("video", request.video), ("audio", request.audio)):
            if path is not None and path.is_dir():
                raise MediaError(path, kind, f"a folder, not the {kind} file")
        return prepare(self._clip(request))  # a bad file: a MediaError before the encoders load

    def _decode_pool(self, clips: int) -> DecodePool:
        if self._pool is None:
            self._pool = DecodePool(max(1, min(available_cores(), clips)))
        return self._pool

    def clip_features(self, video: str | Path, audio: str | Path | None = None, video_description: str = "",
                      audio_description: str = "") -> dict:
        """One clip's sample as the model reads it: its features exactly as `xmei extract` stores
        them (visual, audio, has_audio), its caption ids and masks (raises MediaError)."""
        request = self._request(video, "", audio, video_description, audio_description)
        return self.features([request], [self._prepare_one(request)])[0]

    def features(self, requests: list[_Request], prepared: list[Prepared]) -> list[dict]:
        """The samples of the clips, features as `xmei extract` stores them, encoded
        extract.batch_size at a time; an empty description is hidden (its caption mask zero), as
        caption dropout hides them in training."""
        step, encoded = self.encoder_settings.batch_size, {}
        for k in range(0, len(prepared), step):
            for name, values in self.encoders.encode(prepared[k:k + step]).items():
                encoded.setdefault(name, []).append(values)
        arrays = {name: np.concatenate(parts) for name, parts in encoded.items()}
        captions = tokenize_captions(str(self.cfg.model.caption_tokenizer_path),
                                     {"video": [r.video_description for r in requests],
                                      "audio": [r.audio_description for r in requests]},
                                     self.cfg.extract.caption_tokens)
        samples = []
        for i, r in enumerate(requests):
            sample = {"video": arrays["visual"][i], "audio": arrays["audio"][i],
                      "has_audio": int(arrays["has_audio"][i]),  # no audio at all: zeros, flagged, as in the store
                      **{k: v[i].copy() for k, v in captions.items()}, "texts": {"subtitle": r.subtitle}}
            for kind, text in (("video", r.video_description), ("audio", r.audio_description)):
                if not text.strip():
                    sample[f"{kind}_caption_mask"][:] = 0
            samples.append(sample)
        return samples

    # ------------------------------------------------------------------ stage 2

    def _answer(self, requests: list[_Request], prepared: list[Prepared],
                on_text: Callable[[str], None] | None = None) -> list[Prediction]:
        """The clips' predictions, once they were read (``prepared``): a clip given no subtitle gets
        one here, so an unreadable file is named as such, never as audio speech recognition cannot read.
        ``on_text``: one clip's answer so far, as it is generated (:meth:`predict`)."""
        requests = [self._with_subtitle(r) for r in requests]
        samples = self.features(requests, prepared)
        streamer = _TextStream(self.model.tokenizer, on_text) if on_text and self.generation.num_beams == 1 else None
        rows = answer_rows(self.model, samples, self.generation, self.constraint, self.cfg, self.builder, streamer)
        if on_text and streamer is None:
            on_text(rows[0]["text"])
        return [self._prediction(r, s, row) for r, s, row in zip(requests, samples, rows)]

    def _prediction(self, request: _Request, sample: dict, row: dict) -> Prediction:
        modalities = self.model.settings.modalities
        missing = tuple(kind for kind, text in (("video", request.video_description),
                                                ("audio", request.audio_description))
                        if kind in modalities and not text.strip())
        visual, heard = {}, {}
        if self.attention:
            clip = {**sample, "visual": sample["video"], "video_id": str(request.video)}  # as a store names them
            if "video" in modalities and np.asarray(sample["video"]).ndim == 3:  # (F, T, D): patch features
                visual = attention_maps(self.model, clip)
            if "audio" in modalities and sample["has_audio"]:
                heard = audio_attention(self.model, clip)
        return Prediction(
            video=str(request.video), emotion=row["emotion"], intent=row["intent"],
            emotion_probs=row.get("emotion_probs"), intent_probs=row.get("intent_probs"),
            explanation=row["explanation"], text=row["text"], cut_off=row["cut_off"],
            has_audio=bool(sample["has_audio"]), subtitle=request.subtitle, subtitle_source=request.subtitle_source,
            subtitle_cut=len(self.builder.prompt(request.subtitle, budget=sys.maxsize)) > self.builder.max_length,
            without_descriptions=missing, visual_attention=visual, audio_attention=heard)


def answer_rows(model: XMEIQwen, samples: list[dict], settings: GenerationSettings, constraint, cfg,
                builder, streamer=None) -> list[dict]:
    """The answer fields of each sample (text, cut_off, emotion, intent, explanation and, where
    xmei.generate computes them, emotion_probs / intent_probs): one batch through ``answer`` and
    ``_parsed``, as `xmei eval` makes them."""
    answers = answer(model, prompt_batch(model, samples, builder), settings, constraint, streamer)
    return [_parsed(one, cfg.emotions, cfg.intents) for one in answers]




class _TextStream(BaseStreamer):
    """Calls ``on_text`` with one sample's answer so far (special tokens dropped) as ``generate``
    makes it; the prompt was given as embeddings, so every id put here is a new one."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text, self.ids = tokenizer, on_text, []

    def put(self, value: torch.Tensor) -> None:  # (1, n) or (n,) ids
        new = value.reshape(-1).tolist()
        if new:
            self.ids += new
            self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        pass
