"""`xmei attention`: where the LQ-Formers look, over the sampled frames and the audio windows.

For a clip of a (patch-feature) store, the cross-attention weights of the visual LQ-Former,
(layers, heads, 32 queries, F * (1 + P*P) tokens), are averaged over layers and heads, split into
the caption queries (the first 16) and the learnable ones (the rest), averaged within each group,
and drawn over each of the F sampled frames' P x P patch grid (the CLS token is left out). Given
two checkpoints (language vs learned queries), their rows stand side by side in one PNG: the
seed's "Why LQ-Former?" figure, from a user's own model.

The audio LQ-Former attends to one pooled token per audio window (W of them): its weights, split
into the same two groups, shade each window over the clip's waveform in a second PNG. A model of
one modality gets the PNG of that modality.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.decode import SAMPLE_RATE, read_audio, read_frames, window_starts
from stores import FeatureStore
from xmei.errors import write_whole
from xmei.model import LQFormers, XMEIQwen

__all__ = ["attention_maps", "audio_attention", "center_crop", "draw_attention"]


def attention_maps(model: XMEIQwen | LQFormers, clip: dict) -> dict[str, np.ndarray]:
    """{group name: (F, P, P) attention over each frame's patches} for one store clip."""
    if "video" not in model.settings.modalities:
        raise ValueError(f"attention maps are the visual LQ-Former's; this model uses only {model.settings.modalities}")
    device = next(model.video_lqformer.parameters()).device
    video = torch.as_tensor(np.asarray(clip["visual"]))[None].float().to(device)  # (1, F, T, D)
    if video.dim() != 4:
        raise ValueError("attention maps need patch features (extract.visual_tokens: patch), "
                         f"this store holds {tuple(video.shape[1:])} per clip")
    weights = _cross_attention(model, "video", video, clip)
    frames, tokens = video.shape[1], video.shape[2]
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        raise ValueError(f"{tokens} tokens per frame is not CLS + a square patch grid")
    per_frame = weights.reshape(-1, frames, tokens)[:, :, 1:].reshape(-1, frames, side, side)  # (Q, F, P, P)
    return _groups(model, per_frame)


def audio_attention(model: XMEIQwen | LQFormers, clip: dict) -> dict[str, np.ndarray]:
    """{group name: (W,) attention over the audio windows} for one store clip with audio."""
    if "audio" not in model.settings.modalities:
        raise ValueError(f"audio attention is the audio LQ-Former's; this model uses only {model.settings.modalities}")
    if not int(clip["has_audio"]):
        raise ValueError(f"{clip['video_id']} has no audio: its audio LQ-Former attends to the learned "
                         "no-audio context, not to windows of a waveform")
    device = next(model.audio_lqformer.parameters()).device
    audio = torch.as_tensor(np.asarray(clip["audio"]))[None].float().to(device)  # (1, W, D)
    return _groups(model, _cross_attention(model, "audio", audio, clip))  # (Q, W) -> {group: (W,)}


def _cross_attention(model: XMEIQwen | LQFormers, modality: str, features: torch.Tensor, clip: dict) -> torch.Tensor:
    """The LQ-Former's cross-attention weights averaged over layers and heads: (Q, keys)."""
    lqformer = getattr(model, f"{modality}_lqformer").eval()
    device = features.device
    ids = torch.as_tensor(np.asarray(clip[f"{modality}_caption_ids"]))[None].long().to(device)
    mask = torch.as_tensor(np.asarray(clip[f"{modality}_caption_mask"]))[None].long().to(device)
    with torch.no_grad():
        out = lqformer(features, ids, mask, output_attentions=True)
    return torch.stack(out.cross_attentions).mean((0, 2))[0].float().cpu()  # (layers, B, heads, Q, K) -> (Q, K)


def _groups(model: XMEIQwen | LQFormers, per_query: torch.Tensor) -> dict[str, np.ndarray]:
    """The queries' maps (Q, ...) averaged within the caption and learned groups (or two halves)."""
    language = model.settings.model.query_mode == "language"
    split = model.settings.features.caption_tokens if language else per_query.shape[0] // 2
    names = ("caption queries", "learned queries") if language \
        else (f"queries 1-{split}", f"queries {split + 1}-{per_query.shape[0]}")
    return {names[0]: per_query[:split].mean(0).numpy(), names[1]: per_query[split:].mean(0).numpy()}


def center_crop(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """What CLIP's processor sees: shortest edge to ``size``, then a center crop."""
    image = Image.fromarray(frame)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def draw_attention(checkpoints: list[Path], store_path: Path, video_id: str, media_root: Path, out: Path,
                   device: torch.device | str = "cpu") -> tuple[list[Path], list[str]]:
    """The PNGs for one clip, each checkpoint loaded onto ``device``: ``attention_<id>.png`` (the
    sampled frames, then a row per checkpoint and query group) when a model uses video, and
    ``audio_attention_<id>.png`` (the waveform, then the windows shaded by attention) when one uses
    audio (only their LQ-Formers load, not the LLM). Returns the paths written and a note for each
    map that could not be drawn; a clip with no map at all is a ValueError giving the reasons."""
    store = FeatureStore(store_path)
    ids = [str(v) for v in store.read_whole("video_id")]
    if video_id not in ids:
        raise KeyError(f"{video_id!r} is not in {store_path}")
    clip = store[ids.index(video_id)]
    rows: dict[str, list[tuple[str, np.ndarray]]] = {"video": [], "audio": []}
    notes = []
    for checkpoint in checkpoints:
        model = LQFormers.from_checkpoint(checkpoint, device=device)
        for modality, maps_of in (("video", attention_maps), ("audio", audio_attention)):
            if modality not in model.settings.modalities:
                continue
            try:
                maps = maps_of(model, clip)
            except ValueError as e:
                notes.append(f"{Path(checkpoint).name}: {e}")
                continue
            rows[modality] += [(f"{_name(Path(checkpoint))} ({model.settings.model.query_mode})\n{group}", m)
                               for group, m in maps.items()]
    if not rows["video"] and not rows["audio"]:
        raise ValueError(f"no attention map for {video_id}: " + "; ".join(notes))
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if rows["video"]:
        frames = read_frames(media_root / str(clip["video_path"]), np.asarray(clip["visual"]).shape[0])
        paths.append(_draw_frames(frames, rows["video"], video_id, out / f"attention_{video_id}.png"))
    if rows["audio"]:
        audio_path = str(clip["audio_path"])
        wave = read_audio(media_root / audio_path if audio_path else None, media_root / str(clip["video_path"]))
        size = int(round(float(store.attrs["extract"]["audio_clip_seconds"]) * SAMPLE_RATE))
        paths.append(_draw_windows(wave, size, rows["audio"], video_id, out / f"audio_attention_{video_id}.png"))
    return paths, notes


def _name(checkpoint: Path) -> str:
    """RUN/step_N for a checkpoint inside a run's checkpoints/ folder, else the folder's name."""
    return f"{checkpoint.parents[1].name}/{checkpoint.name}" if checkpoint.parent.name == "checkpoints" \
        else checkpoint.name


def _draw_frames(frames: np.ndarray, rows: list[tuple[str, np.ndarray]], video_id: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [("frames", None), *rows]
    cols = len(frames)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(center_crop(frames[c]))
            if maps is not None:
                heat = maps[c] / max(float(maps[c].max()), 1e-12)
                ax.imshow(heat, cmap="jet", alpha=0.5, extent=(0, 224, 224, 0), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {c + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"visual LQ-Former cross-attention: {video_id}", fontsize=9)
    return _save(fig, path)


def _draw_windows(wave: np.ndarray, size: int, rows: list[tuple[str, np.ndarray]], video_id: str, path: Path) -> Path:
    """The waveform, then per query group one lane per window (windows overlap on a short clip):
    a bar over the window's span, coloured by its attention relative to the strongest window and
    labelled with its share of the group's attention in percent."""
    import matplotlib.pyplot as plt

    windows = len(rows[0][1])
    starts = window_starts(len(wave), windows, size) / SAMPLE_RATE
    width = size / SAMPLE_RATE
    fig, axes = plt.subplots(1 + len(rows), 1, figsize=(12.8, 1.5 * (1 + len(rows))), squeeze=False,
                             sharex=True)
    axes = axes[:, 0]
    axes[0].plot(np.arange(len(wave)) / SAMPLE_RATE, wave, color="0.4", linewidth=0.4)
    axes[0].set_ylabel("waveform", fontsize=7)
    axes[0].set_yticks([])
    for ax, (label, weights) in zip(axes[1:], rows):
        strongest = max(float(weights.max()), 1e-12)
        ax.barh(np.arange(windows), width, left=starts, height=0.8, color=plt.cm.jet(weights / strongest),
                alpha=0.7)
        for w, start in enumerate(starts):
            ax.text(start + width / 2, w, f"{w + 1}: {100 * weights[w] / max(weights.sum(), 1e-12):.0f}%",
                    fontsize=6, ha="center", va="center")
        ax.set_ylim(windows - 0.5, -0.5)
        ax.set_yticks([])
        ax.set_title(label.replace("\n", ": "), fontsize=7, loc="left")
    axes[-1].set_xlim(0, max(len(wave) / SAMPLE_RATE, starts[-1] + width))
    axes[-1].set_xlabel("seconds", fontsize=8)
    fig.suptitle(f"audio LQ-Former cross-attention over the {windows} audio windows: {video_id}", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """The figure as ``path`` (its suffix the format), whole or not at all."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_whole(path, lambda partial: fig.savefig(partial, dpi=100, format=path.suffix[1:]),
                           "an attention map")
    finally:
        plt.close(fig)
