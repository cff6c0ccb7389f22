"""`xmei attention`: where the visual LQ-Former looks, as heatmaps over the sampled frames.

For a clip of a (patch-feature) store, the cross-attention weights of the visual LQ-Former,
(layers, heads, 32 queries, F * (1 + P*P) tokens), are averaged over layers and heads, split into
the caption queries (the first 16) and the learnable ones (the rest), averaged within each group,
and drawn over each of the F sampled frames' P x P patch grid (the CLS token is left out). Given
two checkpoints (language vs learned queries), their rows stand side by side in one PNG: the
seed's "Why LQ-Former?" figure, from a user's own model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.decode import read_frames
from stores import FeatureStore
from xmei.model import XMEIQwen

__all__ = ["attention_maps", "draw_attention"]


def attention_maps(model: XMEIQwen, clip: dict) -> dict[str, np.ndarray]:
    """{group name: (F, P, P) attention over each frame's patches} for one store clip."""
    if "video" not in model.settings.modalities:
        raise ValueError(f"attention maps are the visual LQ-Former's; this model uses only {model.settings.modalities}")
    device = next(model.video_lqformer.parameters()).device
    video = torch.as_tensor(np.asarray(clip["visual"]))[None].float().to(device)  # (1, F, T, D)
    if video.dim() != 4:
        raise ValueError("attention maps need patch features (extract.visual_tokens: patch), "
                         f"this store holds {tuple(video.shape[1:])} per clip")
    ids = torch.as_tensor(np.asarray(clip["video_caption_ids"]))[None].long().to(device)
    mask = torch.as_tensor(np.asarray(clip["video_caption_mask"]))[None].long().to(device)
    with torch.no_grad():
        out = model.video_lqformer.eval()(video, ids, mask, output_attentions=True)
    weights = torch.stack(out.cross_attentions).mean((0, 2))[0].float().cpu()  # (layers, B, heads, Q, K) -> (Q, K)
    frames, tokens = video.shape[1], video.shape[2]
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        raise ValueError(f"{tokens} tokens per frame is not CLS + a square patch grid")
    per_frame = weights.reshape(-1, frames, tokens)[:, :, 1:].reshape(-1, frames, side, side)  # (Q, F, P, P)
    language = model.settings.model.query_mode == "language"
    split = model.settings.features.caption_tokens if language else per_frame.shape[0] // 2
    names = ("caption queries", "learned queries") if language \
        else (f"queries 1-{split}", f"queries {split + 1}-{per_frame.shape[0]}")
    return {names[0]: per_frame[:split].mean(0).numpy(), names[1]: per_frame[split:].mean(0).numpy()}


def _crop(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """What CLIP's processor sees: shortest edge to ``size``, then a center crop."""
    image = Image.fromarray(frame)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def draw_attention(checkpoints: list[Path], store_path: Path, video_id: str, media_root: Path, out: Path,
                   device: torch.device | str = "cpu") -> Path:
    """One PNG: the sampled frames, then for each checkpoint (loaded onto ``device``) a row per query group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = FeatureStore(store_path)
    ids = [str(v) for v in store.read_whole("video_id")]
    if video_id not in ids:
        raise KeyError(f"{video_id!r} is not in {store_path}")
    clip = store[ids.index(video_id)]
    frames = read_frames(media_root / str(clip["video_path"]), np.asarray(clip["visual"]).shape[0])
    rows: list[tuple[str, np.ndarray | None]] = [("frames", None)]
    for checkpoint in checkpoints:
        model = XMEIQwen.from_checkpoint(checkpoint, device=device)
        for group, maps in attention_maps(model, clip).items():
            rows.append((f"{Path(checkpoint).name} ({model.settings.model.query_mode})\n{group}", maps))
    cols = len(frames)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(_crop(frames[c]))
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
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention_{video_id}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
