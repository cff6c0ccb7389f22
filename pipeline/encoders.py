"""The frozen stage-1 encoders: CLIP vision, HuBERT and the caption tokenizer, from local folders.

Real checkpoints (openai/clip-vit-large-patch14, facebook/hubert-large-ls960-ft,
bert-base-uncased) and the tiny ones of `xmei models tiny` load through the same
``from_pretrained(dir)`` calls. Preprocessing is resolved from the checkpoint's own processor
configs (:func:`preparation`), so it cannot drift from the weights; the decode processes do the
heavy part, the encoders rescale and normalize on their device.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.farm import PRECISIONS, auto_dtype, check_dtype, local_device
from pipeline.preprocess import AudioPreprocess, FramePreprocess, Preparation
from stores import FeatureSpec

if TYPE_CHECKING:
    from pipeline.decode_pool import Prepared

__all__ = ["EncoderSettings", "Encoders", "encoder_identity", "feature_specs", "machine_fault", "preparation",
           "tokenize_captions"]

# what torch (2.13) says, lower case, when the memory, the GPU or its driver fails: the machine's fault, not a clip's
MEMORY_FAULTS = ("out of memory", "can't allocate memory")
DEVICE_FAULTS = ("cuda error", "cublas_status", "cudnn_status", "cudnn error", "nccl", "hip error",
                 "device-side assert", "no cuda gpus are available", "nvidia driver", "cuda driver",
                 "cuda-capable device")


@dataclass(frozen=True)
class EncoderSettings:
    """Everything a worker needs to rebuild the encoders: plain values, picklable."""

    visual_path: str
    audio_path: str
    visual_name: str
    audio_name: str
    visual_tokens: str  # "patch" | "pooled"
    num_frames: int
    num_audio_clips: int
    audio_clip_seconds: float
    audio_layers: int
    batch_size: int
    device: str  # "auto" | "cpu" | "cuda" | "cuda:N"; a worker given its own GPU uses that one
    decode_workers: int = 0  # decode processes; 0: the worker's share of its node's cores
    compute_dtype: str = ""  # bfloat16 | float16 | float32; "": what extract.precision auto gives here

    @classmethod
    def from_config(cls, cfg) -> "EncoderSettings":
        x = cfg.extract
        return cls(visual_path=str(Path(cfg.model.visual_encoder_path).resolve()),
                   audio_path=str(Path(cfg.model.acoustic_encoder_path).resolve()),
                   visual_name=cfg.model.visual_encoder, audio_name=cfg.model.acoustic_encoder,
                   visual_tokens=x.visual_tokens, num_frames=x.num_frames, num_audio_clips=x.num_audio_clips,
                   audio_clip_seconds=x.audio_clip_seconds, audio_layers=x.audio_layers,
                   batch_size=x.batch_size, device=x.device, decode_workers=x.decode_workers,
                   compute_dtype=PRECISIONS.get(x.precision, ""))

    def key(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:16]


def _vision_config(path: str):
    """The CLIPVisionConfig of a full CLIPModel folder (the real checkpoint) or of a vision-only
    one (the tiny set), with the projection width of the checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type != "clip":
        return config
    vision = config.vision_config
    # the vision sub-config keeps its own default projection_dim (512); the checkpoint's is above it
    vision.projection_dim = config.projection_dim
    return vision


def _load_checked(cls, path: str, **kwargs):
    """from_pretrained, then an error if any weight of the model was missing or reshaped
    (weights of other heads in the folder, e.g. CLIP's text tower, are fine)."""
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise ValueError(f"{path}: {cls.__name__} weights missing or of another shape: {bad[:5]}")
    return model


def feature_specs(settings: EncoderSettings) -> dict[str, FeatureSpec]:
    """Per-clip shapes and dtypes of what the encoders produce, read from the configs alone."""
    from transformers import AutoConfig

    vision = _vision_config(settings.visual_path)
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + CLS: 257 for ViT-L/14 at 224
    visual = (settings.num_frames, tokens, vision.hidden_size) if settings.visual_tokens == "patch" \
        else (settings.num_frames, vision.projection_dim)
    audio_hidden = AutoConfig.from_pretrained(settings.audio_path).hidden_size
    return {
        "visual": FeatureSpec(visual, "float16"),
        "audio": FeatureSpec((settings.num_audio_clips, audio_hidden), "float16"),
        "audio_lengths": FeatureSpec((settings.num_audio_clips,), "int32"),  # real samples per window
        "has_audio": FeatureSpec((), "uint8"),  # 0: no audio at all, audio features are zeros
    }


def encoder_identity(settings: EncoderSettings, caption_tokenizer: str) -> dict[str, Any]:
    """Names, folders and config hashes of the encoders, for the store's attributes."""
    def digest(folder: str, names: tuple[str, ...]) -> str:
        h = hashlib.sha256()
        for name in names:
            file = Path(folder) / name
            if file.is_file():
                h.update(name.encode() + file.read_bytes())
        return h.hexdigest()[:16]

    configs = ("config.json", "preprocessor_config.json")
    return {
        "visual": {"name": settings.visual_name, "path": settings.visual_path,
                   "config_sha256": digest(settings.visual_path, configs)},
        "audio": {"name": settings.audio_name, "path": settings.audio_path,
                  "config_sha256": digest(settings.audio_path, configs)},
        "caption_tokenizer": {"path": caption_tokenizer,
                              "config_sha256": digest(caption_tokenizer, ("tokenizer.json", "vocab.txt"))},
    }


def tokenize_captions(tokenizer_path: str, captions: dict[str, list[str]], length: int) -> dict[str, np.ndarray]:
    """``{kind: texts}`` -> ``{kind}_caption_ids`` and ``{kind}_caption_mask``, (N, length) int32
    each, truncated / padded to ``length`` by the caption tokenizer. A description is text: a
    ``[SEP]`` or ``[PAD]`` written in it is tokenized as those characters, not as the token; only
    the tokenizer's own [CLS] ... [SEP] and padding are special."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    arrays = {}
    for kind, texts in captions.items():
        out = tokenizer(texts, max_length=length, truncation=True, padding="max_length", return_tensors="np",
                        split_special_tokens=True)
        arrays[f"{kind}_caption_ids"] = out["input_ids"].astype(np.int32)
        arrays[f"{kind}_caption_mask"] = out["attention_mask"].astype(np.int32)
    return arrays


def preparation(settings: EncoderSettings) -> Preparation:
    """What the decode processes do to a clip, from the checkpoints' own processor configs."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    # only the processor's settings are read: the PIL backend holds them without torchvision
    image_processor = AutoImageProcessor.from_pretrained(settings.visual_path, backend="pil")
    return Preparation(frames=FramePreprocess.from_processor(image_processor),
                       audio=AudioPreprocess.from_processor(AutoFeatureExtractor.from_pretrained(settings.audio_path)),
                       num_frames=settings.num_frames, num_audio_clips=settings.num_audio_clips,
                       audio_clip_seconds=settings.audio_clip_seconds)


def machine_fault(err: BaseException) -> str | None:
    """Whose fault an encoder error is: "memory" (out of memory), "device" (any other failure of
    the GPU or its driver: a CUDA error, a device-side assert, a GPU gone), or None: the clip's."""
    import torch

    text = str(err).lower()
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(m in text for m in MEMORY_FAULTS):
        return "memory"
    if isinstance(err, getattr(torch, "AcceleratorError", ())) or any(m in text for m in DEVICE_FAULTS):
        return "device"
    return None


class Encoders:
    """The frozen CLIP and HuBERT of one worker, loaded once, eval mode, no gradients.

    They compute in ``settings.compute_dtype`` (extract.precision; auto: fp32 on CPU, bf16 on a GPU
    that has it, else fp16); a GPU that cannot is a FarmError. Outputs are float16 numpy.
    """

    def __init__(self, settings: EncoderSettings):
        import torch
        from transformers import CLIPVisionModelWithProjection, HubertModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a worker's log is no place for "Loading weights" bars
        self.settings = settings
        device = local_device(settings.device)  # a worker pinned to its GPU uses that one
        dtype = settings.compute_dtype or auto_dtype(device) or "float32"  # None: a GPU torch will refuse below
        check_dtype(device, dtype)
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.preparation = preparation(settings)
        self.visual = _load_checked(CLIPVisionModelWithProjection, settings.visual_path,
                                    config=_vision_config(settings.visual_path), dtype=self.dtype)
        self.audio = _load_checked(HubertModel, settings.audio_path, dtype=self.dtype)
        for model in (self.visual, self.audio):
            model.to(self.device).eval().requires_grad_(False)

    def encode(self, clips: list[Prepared]) -> dict[str, np.ndarray]:
        """Prepared clips (see pipeline.decode_pool) -> what the store holds for them, by array:
        visual (B, F, ...), audio (B, W, D) and audio_lengths (B, W), zeros for a clip without
        audio, has_audio (B,)."""
        n, windows = len(clips), self.settings.num_audio_clips
        out = {"visual": self.encode_frames(np.concatenate([c.pixels for c in clips])),
               "audio": np.zeros((n, windows, self.audio.config.hidden_size), np.float16),
               "audio_lengths": np.zeros((n, windows), np.int32),
               "has_audio": np.array([c.audio is not None for c in clips], np.uint8)}
        heard = np.flatnonzero(out["has_audio"])
        if len(heard):
            out["audio"][heard] = self.encode_audio(np.concatenate([clips[i].audio for i in heard]),
                                                    np.concatenate([clips[i].audio_mask for i in heard]))
            out["audio_lengths"][heard] = np.stack([clips[i].audio_lengths for i in heard])
        return out

    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        """(B * F, 3, h, w) uint8, resized and cropped -> (B, F, 257, D) patch tokens or (B, F, P)
        pooled embeddings; rescaled and normalized here, on the encoder's device."""
        import torch

        with torch.inference_mode():
            pixels = self.preparation.frames.normalize(torch.from_numpy(pixels).to(self.device))
            out = self.visual(pixel_values=pixels.to(self.dtype))
            features = out.last_hidden_state if self.settings.visual_tokens == "patch" else out.image_embeds
        features = features.float().cpu().numpy().astype(np.float16)
        return features.reshape(-1, self.settings.num_frames, *features.shape[1:])  # (B, F, ...)

    def encode_audio(self, input_values: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(B * W, samples) normalized windows and their mask -> (B, W, D): per window, the mean
        of the last ``audio_layers`` hidden states, then the mean over the window's real frames."""
        import torch

        with torch.inference_mode():
            mask = torch.from_numpy(attention_mask).to(self.device)
            values = torch.from_numpy(input_values).to(self.device, self.dtype)
            out = self.audio(values, attention_mask=mask if self.preparation.audio.use_mask else None,
                             output_hidden_states=True)
            hidden = torch.stack(out.hidden_states[-self.settings.audio_layers:]).float().mean(0)  # (N, T, D)
            frames = self.audio._get_feat_extract_output_lengths(mask.sum(-1)).clamp(min=1)  # (N,) real frames
            valid = (torch.arange(hidden.shape[1], device=self.device)[None, :] < frames[:, None]).float()
            pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # (N, D)
        pooled = pooled.cpu().numpy().astype(np.float16)
        return pooled.reshape(-1, self.settings.num_audio_clips, pooled.shape[-1])  # (B, W, D)
