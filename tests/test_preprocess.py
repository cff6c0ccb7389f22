"""Preprocessing on tensors equals the checkpoints' own processors (PIL / lists) within rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.preprocess import AudioPreprocess, FramePreprocess, PreprocessError
from pipeline.synth import camera_frames

# (width, height): camera sizes, a portrait phone strip, tiny, odd, and exactly the crop
SIZES = [(1920, 1080), (1280, 720), (48, 320), (16, 16), (225, 223), (224, 224)]


@pytest.fixture(scope="module")
def processors(tiny_models):
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    return (AutoImageProcessor.from_pretrained(tiny_models / "visual_encoder"),
            AutoFeatureExtractor.from_pretrained(tiny_models / "audio_encoder"))


@pytest.mark.parametrize("width,height", SIZES)
def test_frames_equal_the_image_processor(processors, width, height):
    image_processor, _ = processors
    frames = np.stack(list(camera_frames(width, height, 4, seed=width)))
    want = image_processor(images=list(frames), return_tensors="pt")["pixel_values"]
    prep = FramePreprocess.from_processor(image_processor)
    got = prep.normalize(torch.from_numpy(prep.resize_crop(frames)))
    assert got.shape == want.shape == (4, 3, 224, 224)
    level = 1 / 255 / min(prep.std)  # one uint8 step after normalization
    diff = (got - want).abs()
    assert diff.max() <= 2 * level + 1e-6  # rounding of the resize: at most two steps, rarely
    assert diff.mean() < 0.05 * level


def test_other_sizes_and_flags_follow_the_processor():
    from transformers import CLIPImageProcessor

    frames = np.stack(list(camera_frames(320, 200, 2)))
    for kwargs in ({"size": {"height": 100, "width": 150}, "do_center_crop": False, "resample": 2},
                   {"do_normalize": False, "crop_size": {"height": 300, "width": 300}},  # crop past the image: padded
                   {"do_resize": False, "crop_size": {"height": 64, "width": 96}}):
        processor = CLIPImageProcessor(**kwargs)
        want = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        prep = FramePreprocess.from_processor(processor)
        got = prep.normalize(torch.from_numpy(prep.resize_crop(frames)))
        assert got.shape == want.shape, kwargs
        assert (got - want).abs().max() <= 2 / 255 / min(prep.std) + 1e-6, kwargs


def test_a_processor_it_cannot_reproduce_is_refused():
    from transformers import CLIPImageProcessor

    with pytest.raises(PreprocessError, match="resample 1 is not supported"):
        FramePreprocess.from_processor(CLIPImageProcessor(resample=1))  # Lanczos


def test_audio_windows_equal_the_feature_extractor(processors):
    _, extractor = processors
    rng = np.random.default_rng(0)
    lengths = np.array([32000, 100, 0, 1, 31999, 5000], np.int32)  # whole, short, empty, one sample
    windows = rng.normal(0, 0.1, (len(lengths), 32000)).astype(np.float32)
    for window, n in zip(windows, lengths):
        window[max(n, 1):] = 0
    want = extractor([w[:max(int(n), 1)] for w, n in zip(windows, lengths)], sampling_rate=16000,
                     padding="max_length", max_length=32000, return_attention_mask=True, return_tensors="np")
    values, mask = AudioPreprocess.from_processor(extractor).apply(windows, lengths)
    np.testing.assert_allclose(values, want["input_values"], atol=1e-5)
    np.testing.assert_array_equal(mask, want["attention_mask"])
