"""Decoding: sampled frames, audio from files and tracks, windows; every failure named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipeline.decode import SAMPLE_RATE, MediaError, audio_windows, frame_indices, read_audio, read_frames
from pipeline.synth import write_mp4


def test_frame_indices_spread_uniformly_and_repeat_for_short_clips():
    assert frame_indices(80, 8).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert frame_indices(1, 8).tolist() == [0] * 8


def test_audio_windows_spread_over_long_clips_and_pad_short_ones():
    wave = np.arange(5 * SAMPLE_RATE, dtype=np.float32)
    windows, lengths = audio_windows(wave, 8, 2.0)
    assert windows.shape == (8, 32000) and lengths.tolist() == [32000] * 8
    assert windows[0, 0] == 0 and windows[-1, -1] == wave[-1]  # first and last window touch the ends
    short = np.ones(12000, np.float32)
    windows, lengths = audio_windows(short, 8, 2.0)
    assert lengths.tolist() == [12000] * 8 and windows[:, 12000:].sum() == 0 and windows[:, :12000].all()


def test_audio_from_file_track_and_none(tmp_path):
    t = np.arange(int(1.5 * 44100)) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", np.stack([tone, tone], 1), 44100)  # stereo 44.1 kHz
    wave = read_audio(tmp_path / "a.wav", tmp_path / "unused.mp4")
    assert wave.dtype == np.float32 and abs(len(wave) - 24000) <= 1  # resampled to 16 kHz, mono
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * SAMPLE_RATE / len(wave)
    assert abs(peak - 440) < 2

    frames = np.zeros((10, 64, 64, 3), np.uint8)
    write_mp4(tmp_path / "with.mp4", frames, 10, tone[:16000].copy())
    write_mp4(tmp_path / "without.mp4", frames, 10, None)
    assert len(read_audio(None, tmp_path / "with.mp4")) >= 16000
    assert read_audio(None, tmp_path / "without.mp4") is None  # no audio at all: not an error


def test_bad_media_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(MediaError, match="missing video file") as err:
        read_frames(tmp_path / "gone.mp4", 8)
    assert err.value.stage == "video" and err.value.path == tmp_path / "gone.mp4"
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(MediaError, match=r"junk.mp4: cannot decode video"):
        read_frames(tmp_path / "junk.mp4", 8)
    with pytest.raises(MediaError, match="missing audio file") as err:
        read_audio(tmp_path / "gone.wav", tmp_path / "junk.mp4")
    assert err.value.stage == "audio"
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + bytes(100))
    with pytest.raises(MediaError, match=r"junk.wav: cannot decode audio"):
        read_audio(tmp_path / "junk.wav", tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match=r"junk.mp4: cannot decode audio track"):
        read_audio(None, tmp_path / "junk.mp4")


def test_frames_decode_at_their_own_size(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (30, 96, 128, 3), dtype=np.uint8)
    write_mp4(tmp_path / "v.mp4", frames, 15, None)
    got = read_frames(Path(tmp_path / "v.mp4"), 8)
    assert got.shape == (8, 96, 128, 3) and got.dtype == np.uint8
