"""Decoding a clip: sampled frames (decord, else PyAV) and 16 kHz mono audio (soundfile / PyAV +
librosa).

No ffmpeg binary is needed: decord and PyAV carry their own decoders. decord is fast at random
access but rejects some valid videos (odd sizes such as 48x320 or 16x16); PyAV then decodes the
same frame indices sequentially, so a clip fails only when both decoders fail. Every failure is a
:class:`MediaError` naming the file and what went wrong; nothing is ever replaced by zeros or
by another clip. A clip with no audio at all (an empty ``audio_path`` and no track in the
video) is not an error: :func:`read_audio` returns None and the store flags it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xmei.errors import UserError

__all__ = ["SAMPLE_RATE", "MediaError", "audio_windows", "clip_seconds", "frame_indices", "read_audio", "read_frames",
           "window_starts"]

SAMPLE_RATE = 16_000
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg"}


class MediaError(UserError, RuntimeError):
    def __init__(self, path: Path | str, stage: str, reason: str):
        self.path, self.stage, self.reason = Path(path), stage, reason
        super().__init__(f"{path}: {reason}")


def frame_indices(total: int, n: int) -> np.ndarray:
    """``n`` frame indices spread uniformly over ``total`` frames (the middle of ``n`` equal
    segments); a clip shorter than ``n`` frames repeats frames."""
    return ((np.arange(n) + 0.5) * total / n).astype(np.int64)


def clip_seconds(path: Path) -> float:
    """The video's length in seconds without decoding a frame: the container's duration, else
    (a webcam's WebM often has none) the end of its last video packet. A MediaError when PyAV
    cannot open it as a video."""
    import av

    if not path.is_file():
        raise MediaError(path, "video", "missing video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            if container.duration:
                return container.duration / av.time_base
            stream = container.streams.video[0]
            ends = [p.pts + (p.duration or 0) for p in container.demux(stream) if p.pts is not None]
    except Exception as err:  # PyAV's own errors, or the ValueError above
        reason = getattr(err, "strerror", None) or _first_line(err)  # PyAV's strerror leaves the path out
        raise MediaError(path, "video", f"cannot read the video: {reason}") from None
    if not ends:
        raise MediaError(path, "video", "the video has no frames")
    return float(max(ends) * stream.time_base)


def read_frames(path: Path, n: int) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB frames sampled uniformly over the video: decord, else PyAV."""
    if not path.is_file():
        raise MediaError(path, "video", "missing video file")
    try:
        frames = _decord_frames(path, n)
    except Exception as decord_err:  # decord raises its own DECORDError, RuntimeError, ...
        try:
            frames = _pyav_frames(path, n)
        except Exception as pyav_err:
            reason = f"decord: {_first_line(decord_err)}; PyAV: {_first_line(pyav_err)}"
            raise MediaError(path, "video", f"cannot decode video ({reason})") from None
    if frames.ndim != 4 or frames.shape[0] != n or frames.shape[-1] != 3:
        raise MediaError(path, "video", f"decoded frames have shape {frames.shape}, expected ({n}, H, W, 3)")
    return frames


def _decord_frames(path: Path, n: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    total = len(reader)
    if total == 0:
        raise ValueError("the video has no frames")
    return reader.get_batch(frame_indices(total, n).tolist()).asnumpy()  # (n, H, W, 3)


def _pyav_frames(path: Path, n: int) -> np.ndarray:
    """The frames decord would give, by decoding in order: the same :func:`frame_indices` over
    the container's frame count (the packet count where the container does not store it)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if total == 0:
        raise ValueError("the video has no frames")
    picked, decoded = _pyav_decode(path, frame_indices(total, n))
    if len(picked) < n:  # fewer frames decode than the container said: sample what there is
        if decoded == 0:
            raise ValueError("the video has no frames")
        picked, _ = _pyav_decode(path, frame_indices(decoded, n))
    return np.stack(picked)  # (n, H, W, 3)


def _pyav_decode(path: Path, indices: np.ndarray) -> tuple[list[np.ndarray], int]:
    """RGB frames at ``indices`` (sorted, may repeat) and how many frames were decoded."""
    import av

    picked: list[np.ndarray] = []
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # as decord: one decode process per core, one clip each
        for frame in container.decode(stream):
            hits = int((indices == decoded).sum())
            if hits:
                picked += [frame.to_ndarray(format="rgb24")] * hits
            decoded += 1
            if decoded > indices[-1]:
                break
    return picked, decoded


def read_audio(audio_path: Path | None, video_path: Path) -> np.ndarray | None:
    """16 kHz mono float32 waveform from ``audio_path``, else from the video's own track;
    None when ``audio_path`` is None and the video has no audio track."""
    if audio_path is not None:
        if not audio_path.is_file():
            raise MediaError(audio_path, "audio", "missing audio file")
        wave, rate = _read_file(audio_path)
        source = audio_path
    else:
        if not video_path.is_file():
            raise MediaError(video_path, "audio", "missing video file")
        decoded = _read_track(video_path)
        if decoded is None:
            return None
        wave, rate = decoded
        source = video_path
    if wave.size == 0:
        raise MediaError(source, "audio", "the audio is empty")
    if not np.isfinite(wave).all():
        raise MediaError(source, "audio", "the audio holds NaN or Inf samples")
    if rate != SAMPLE_RATE:
        import librosa

        wave = librosa.resample(wave, orig_sr=rate, target_sr=SAMPLE_RATE)
    return wave.astype(np.float32)


def audio_windows(wave: np.ndarray, n: int, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows of ``seconds`` spread evenly over the waveform, zero-padded when the clip
    is shorter: ((n, samples) float32, (n,) int32 real samples per window)."""
    size = int(round(seconds * SAMPLE_RATE))
    windows = np.zeros((n, size), np.float32)
    if len(wave) <= size:
        windows[:, :len(wave)] = wave
        return windows, np.full(n, len(wave), np.int32)
    for i, start in enumerate(window_starts(len(wave), n, size)):
        windows[i] = wave[start:start + size]
    return windows, np.full(n, size, np.int32)


def window_starts(samples: int, n: int, size: int) -> np.ndarray:
    """First sample of each of ``n`` windows of ``size`` samples spread evenly over ``samples``
    (all at 0 when the clip is no longer than one window)."""
    return np.linspace(0, max(samples - size, 0), n).round().astype(np.int64)


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        import soundfile

        try:
            wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
        except Exception as err:
            raise MediaError(path, "audio", f"cannot decode audio: {_first_line(err)}") from None
        return wave.mean(axis=1), rate
    decoded = _read_track(path)  # any other container: its first audio stream
    if decoded is None:
        raise MediaError(path, "audio", "the audio file has no audio stream")
    return decoded


def _read_track(path: Path) -> tuple[np.ndarray, int] | None:
    """Mono float32 samples and rate of the first audio stream (PyAV); None when there is none."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            # one resampler for every frame: float planar mono at the stream's own rate
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
            chunks = [out.to_ndarray()[0] for frame in container.decode(stream) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray()[0] for out in resampler.resample(None)]
    except Exception as err:
        raise MediaError(path, "audio", f"cannot decode audio track: {_first_line(err)}") from None
    if not chunks:
        raise MediaError(path, "audio", "the audio track holds no samples")
    return np.concatenate(chunks).astype(np.float32), rate


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
