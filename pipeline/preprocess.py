"""What the encoders' processors do to a clip, on tensors, resolved once from the checkpoints.

The checkpoint's own processors (CLIPImageProcessor, Wav2Vec2FeatureExtractor) work image by
image through PIL and lists; in a decode process that costs more than the decode. Here their
configs are read once into two small frozen dataclasses (plain values: they travel to the decode
processes and into the store's attributes), and the transforms are built from them:

    frames (F, H, W, 3) uint8 --resize_crop (decode process)--> (F, 3, h, w) uint8
                              --normalize (encoder device)----> (F, 3, h, w) float
    windows (W, S) float32    --AudioPreprocess.apply---------> (W, S) float32 + (W, S) mask

The resize is the processor's (shortest edge, aspect kept, the long side truncated as
``int(size * long / short)``), antialiased bicubic / bilinear interpolation on uint8 as PIL does
it, then the processor's center crop. Equality with the
processors themselves, within rounding, is tested on camera-like frames (tests/test_preprocess.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xmei.errors import UserError

__all__ = ["AudioPreprocess", "FramePreprocess", "Preparation", "PreprocessError"]

# PIL's resampling codes (what preprocessor_config.json stores) -> torch interpolate modes
RESAMPLE = {2: "bilinear", 3: "bicubic"}


class PreprocessError(UserError, ValueError):
    """A processor config this module cannot reproduce on tensors."""


def _size(value: Any) -> dict[str, int]:
    """A processor's size / crop_size (dict, SizeDict or int) as a plain dict of its set keys."""
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


@dataclass(frozen=True)
class FramePreprocess:
    """CLIP's image processing: resize, center crop, rescale, normalize."""

    shortest_edge: int | None  # resize so the short side has this length, or (size) to exactly:
    size: tuple[int, int] | None  # (height, width); neither: no resize
    resample: str  # "bicubic" | "bilinear"
    crop: tuple[int, int] | None  # center crop (height, width); None: no crop
    rescale: float  # 1/255, or 1.0 when the processor does not rescale
    mean: tuple[float, float, float]  # (0, 0, 0) and std (1, 1, 1) when it does not normalize
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor) -> "FramePreprocess":
        """From a loaded image processor (AutoImageProcessor.from_pretrained(checkpoint))."""
        name = type(processor).__name__
        shortest = size = None
        if processor.do_resize:
            given = _size(processor.size)
            if "shortest_edge" in given and len(given) == 1:
                shortest = given["shortest_edge"]
            elif set(given) == {"height", "width"}:
                size = (given["height"], given["width"])
            else:
                raise PreprocessError(f"{name}: resize to {given} is not supported (shortest_edge or height+width)")
        resample = RESAMPLE.get(int(processor.resample))
        if resample is None:
            raise PreprocessError(f"{name}: resample {processor.resample} is not supported "
                                  f"(PIL codes {sorted(RESAMPLE)}: {sorted(RESAMPLE.values())})")
        crop = None
        if processor.do_center_crop:
            given = _size(processor.crop_size)
            crop = (given["height"], given["width"])
        if getattr(processor, "do_pad", False):
            raise PreprocessError(f"{name}: padding is not supported")
        normalize = processor.do_normalize
        return cls(shortest_edge=shortest, size=size, resample=resample, crop=crop,
                   rescale=float(processor.rescale_factor) if processor.do_rescale else 1.0,
                   mean=tuple(float(m) for m in processor.image_mean) if normalize else (0.0, 0.0, 0.0),
                   std=tuple(float(s) for s in processor.image_std) if normalize else (1.0, 1.0, 1.0))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, as the processor computes it."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def resize_crop(self, frames: np.ndarray) -> np.ndarray:
        """(F, H, W, 3) uint8 -> (F, 3, h, w) uint8: resized (antialiased, rounded as PIL rounds)
        and center-cropped. Runs in a decode process, on one thread."""
        import torch
        import torch.nn.functional as F

        # (F, 3, H, W) uint8 in channels-last memory: torch's vectorized uint8 antialias kernels
        # take it directly, ~20x faster than on floats and rounded as PIL rounds (tested)
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        shape = self.resized_shape(*pixels.shape[-2:])
        if shape != tuple(pixels.shape[-2:]):
            pixels = F.interpolate(pixels, size=shape, mode=self.resample, antialias=True, align_corners=False)
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        return pixels.contiguous().numpy()

    def normalize(self, pixels):
        """(N, 3, h, w) uint8 tensor -> float32 tensor on the same device: rescaled, normalized."""
        import torch

        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() * self.rescale - mean) / std


def _center_crop(pixels, height: int, width: int):
    """(F, 3, H, W) -> (F, 3, height, width): the middle, zero-padded where the image is smaller
    (the processor's offsets: top = (H - height) // 2, padding split with the extra row below)."""
    import torch.nn.functional as F

    rows, cols = pixels.shape[-2:]
    if rows < height or cols < width:
        pad_rows, pad_cols = max(height - rows, 0), max(width - cols, 0)
        top, left = (pad_rows + 1) // 2, (pad_cols + 1) // 2
        pixels = F.pad(pixels, (left, pad_cols - left, top, pad_rows - top))
        rows, cols = pixels.shape[-2:]
    top, left = (rows - height) // 2, (cols - width) // 2
    return pixels[..., top:top + height, left:left + width]


@dataclass(frozen=True)
class AudioPreprocess:
    """HuBERT's feature extractor: per window, zero mean and unit variance over its real samples."""

    sampling_rate: int
    normalize: bool
    padding_value: float
    use_mask: bool  # the checkpoint's model takes an attention mask (return_attention_mask)

    @classmethod
    def from_processor(cls, extractor) -> "AudioPreprocess":
        """From a loaded feature extractor (AutoFeatureExtractor.from_pretrained(checkpoint))."""
        return cls(sampling_rate=int(extractor.sampling_rate), normalize=bool(extractor.do_normalize),
                   padding_value=float(extractor.padding_value),
                   use_mask=bool(getattr(extractor, "return_attention_mask", True)))

    def apply(self, windows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, S) float32 windows, (W,) real samples each -> (input values (W, S) float32,
        attention mask (W, S) int32); padding past a window's real samples is ``padding_value``."""
        real = np.arange(windows.shape[1])[None, :] < np.maximum(lengths, 1)[:, None]  # (W, S)
        values = windows.astype(np.float32, copy=True)
        if self.normalize:
            count = real.sum(1, keepdims=True)
            mean = (values * real).sum(1, keepdims=True) / count
            var = (((values - mean) * real) ** 2).sum(1, keepdims=True) / count
            values = (values - mean) / np.sqrt(var + 1e-7)
        values[~real] = self.padding_value
        return values.astype(np.float32), real.astype(np.int32)


@dataclass(frozen=True)
class Preparation:
    """Everything a decode process needs besides the clip's files: plain values, small to send."""

    frames: FramePreprocess
    audio: AudioPreprocess
    num_frames: int
    num_audio_clips: int
    audio_clip_seconds: float
