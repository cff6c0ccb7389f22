"""A synthetic JX4MEI corpus of real media, in the published layout.

    OUT/videos/synth_00000.mp4     H.264 (+ AAC track for most clips)
    OUT/audios/synth_00000.wav     16 kHz mono PCM (absent where the audio is the video's track)
    OUT/annotations/{train,val,test}.json

The labels are carried by the media, so a model has to use them:
- **emotion is seen**: a drawn face whose color, mouth shape, brows and motion depend on
  the emotion (with per-clip jitter of color, size, place and background);
- **intent is heard**: voiced "syllables" whose pitch register, contour within a syllable,
  rate and timbre depend on the intent (with per-clip jitter of pitch and tempo).
Subtitles, descriptions, reasons and explanations come from templates that mention the cues
only partly and noisily: a description names the true cue about a third of the time and a
random one sometimes, so text alone cannot give the labels.

Clips last 1-6 s at several frame rates and sizes. Audio sources vary as they do in real
annotations: a wav file and an AAC track (most clips), a wav file and a silent mp4, only the
video's track (empty ``audio_path``), and a few clips with no audio at all (no track and an
empty ``audio_path``). Everything is a function of (seed, clip index): deterministic.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.annotations import Record, write_annotations
from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS, LabelSet

__all__ = ["ClipPlan", "SAMPLE_RATE", "camera_corpus", "camera_frames", "plan_corpus", "render_clip", "synth_corpus",
           "write_camera_mp4"]

SAMPLE_RATE = 16_000
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
SIZES = ((160, 120), (192, 144), (176, 176), (224, 168), (256, 192))  # (width, height), even for yuv420p
FRAME_RATES = (10, 12, 15, 24, 25)
# audio source of a clip -> probability (has wav file, has AAC track in the mp4)
AUDIO_MODES = {"file+track": 0.68, "file": 0.14, "track": 0.14, "none": 0.04}

# What each emotion looks like: base color, mouth, brows, motion; and the words texts use.
LOOKS = {
    "happy":    dict(color=(245, 200, 40), mouth="smile", brows="none", motion="bounce",
                     words=("a yellow face", "a wide smile", "a head bobbing up and down")),
    "surprise": dict(color=(250, 140, 200), mouth="open", brows="raised", motion="zoom",
                     words=("a pink face", "a wide-open mouth", "a face popping toward the camera")),
    "sad":      dict(color=(70, 110, 225), mouth="frown", brows="sad", motion="droop",
                     words=("a blue face", "a down-turned mouth", "a slowly sinking head")),
    "disgust":  dict(color=(110, 175, 60), mouth="wavy", brows="flat", motion="lean",
                     words=("a green face", "a twisted mouth", "a head leaning away")),
    "anger":    dict(color=(225, 40, 40), mouth="tight", brows="angry", motion="shake",
                     words=("a red face", "a clenched mouth", "a hard-shaking head")),
    "fear":     dict(color=(150, 90, 205), mouth="small_o", brows="raised", motion="tremble",
                     words=("a purple face", "a small round mouth", "a trembling face")),
    "neutral":  dict(color=(165, 165, 165), mouth="line", brows="none", motion="still",
                     words=("a grey face", "a straight mouth", "a head held still")),
}
# What each intent sounds like: pitch register (Hz), contour within a syllable, syllables per
# second, number of harmonics; and the words texts use. Registers are ~16% apart and jitter
# by 4%, so even a time-averaged spectrum separates them.
SOUNDS = {
    "questioning":   dict(register=150, contour="rise", rate=2.0, harmonics=3,
                          words=("a voice rising at the end", "slow rising tones")),
    "agreeing":      dict(register=175, contour="double", rate=4.0, harmonics=2,
                          words=("short paired hums", "a quick two-beat rhythm")),
    "acknowledging": dict(register=205, contour="fall", rate=1.5, harmonics=4,
                          words=("single falling notes", "a calm falling voice")),
    "encouraging":   dict(register=240, contour="steps_up", rate=5.0, harmonics=2,
                          words=("quick rising steps", "a lively fast rhythm")),
    "consoling":     dict(register=280, contour="slow_fall", rate=1.0, harmonics=1,
                          words=("a soft slow descent", "long gentle tones")),
    "suggesting":    dict(register=325, contour="rise_fall", rate=2.5, harmonics=3,
                          words=("an up-and-down lilt", "tones that rise then fall")),
    "wishing":       dict(register=380, contour="vibrato", rate=1.2, harmonics=2,
                          words=("a long wavering note", "a dreamy vibrato")),
    "sympathizing":  dict(register=440, contour="steps_down", rate=3.0, harmonics=3,
                          words=("gently falling steps", "a descending pattern")),
    "neutral":       dict(register=510, contour="flat", rate=3.5, harmonics=2,
                          words=("an even monotone", "steady flat tones")),
}

SUBTITLE_OPENERS = ("Well,", "So,", "Listen,", "Okay,", "You know,", "Honestly,", "Look,", "Right,")
SUBTITLE_BODIES = (
    "I saw the results this morning", "we talked about the trip yesterday", "the meeting moved to Friday",
    "she brought the package over", "they finished the project early", "the train was late again",
    "my brother called about dinner", "the shop closes at six", "we could paint the kitchen",
    "the game starts in an hour", "he forgot the keys at home", "the weather changed so fast",
)
SUBTITLE_HINTS = {  # a weak lexical hint of the intent, used in a quarter of the subtitles
    "questioning": "did you hear about it?", "agreeing": "yes, exactly, I think so too.",
    "acknowledging": "okay, I got it.", "encouraging": "you can do this, keep going!",
    "consoling": "it is not your fault.", "suggesting": "maybe we should try again.",
    "wishing": "I hope it all works out.", "sympathizing": "that must have been hard for you.",
    "neutral": "that is how it went.",
}
GENERIC_VIDEO = ("A cartoon face looks at the camera.", "A drawn face fills the middle of the frame.",
                 "A round face appears in front of a plain background.")
GENERIC_AUDIO = ("A voice makes a series of tones.", "Someone hums a few notes.",
                 "Tones can be heard in the clip.")
EXPLANATIONS = (
    "The speaker shows {emotion} through {look}, and the voice, with {sound}, signals {intent}, "
    "so the {emotion} feeling comes with a {intent} intent",
    "With {look}, the speaker feels {emotion}; the voice, with {sound}, points to {intent}, "
    "which is why they co-occur",
    "The {emotion} emotion is visible in {look} while the voice, with {sound}, is {intent}",
    "Because the speaker feels {emotion}, seen in {look}, they turn to {intent}, heard as {sound}",
)


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip; a pure function of (seed, index)."""

    index: int
    video_id: str
    split: str
    emotion: str
    intent: str
    duration: float  # seconds
    fps: int
    width: int
    height: int
    audio_mode: str  # a key of AUDIO_MODES
    seed: int  # per-clip seed for the renderers


def plan_corpus(n: int, seed: int) -> list[ClipPlan]:
    """Labels, sizes, durations, audio modes and splits of ``n`` clips."""
    if n < len(SPLITS):
        raise ValueError(f"--n must be at least {len(SPLITS)} (one clip per split), got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cuts = np.cumsum([round(n * frac) for _, frac in SPLITS[:-1]])
    split_of = np.empty(n, dtype=object)
    for (name, _), part in zip(SPLITS, np.split(order, cuts)):
        split_of[part] = name
    modes, probs = list(AUDIO_MODES), list(AUDIO_MODES.values())
    plans = []
    for i in range(n):
        width, height = SIZES[rng.integers(len(SIZES))]
        plans.append(ClipPlan(
            index=i, video_id=f"synth_{i:05d}", split=str(split_of[i]),
            emotion=DEFAULT_EMOTIONS[rng.integers(len(DEFAULT_EMOTIONS))],
            intent=DEFAULT_INTENTS[rng.integers(len(DEFAULT_INTENTS))],
            duration=round(float(rng.uniform(1.0, 6.0)), 2),
            fps=int(FRAME_RATES[rng.integers(len(FRAME_RATES))]),
            width=int(width), height=int(height),
            audio_mode=modes[rng.choice(len(modes), p=probs)],
            seed=int(rng.integers(2**31)),
        ))
    return plans


def clip_texts(plan: ClipPlan) -> dict[str, str]:
    """Subtitle, descriptions, reasons and explanation of a clip: partial, noisy cues."""
    rng = np.random.default_rng([plan.seed, 1])
    look, sound = LOOKS[plan.emotion]["words"], SOUNDS[plan.intent]["words"]

    def mention(true_words: tuple[str, ...], table: dict, generic: tuple[str, ...], template: str) -> str:
        roll = rng.random()
        if roll < 0.35:
            return template.format(true_words[rng.integers(len(true_words))])
        if roll < 0.5:  # noise: the cue of a random label, right only by chance
            words = list(table.values())[rng.integers(len(table))]["words"]
            return template.format(words[rng.integers(len(words))])
        return generic[rng.integers(len(generic))]

    body = SUBTITLE_BODIES[rng.integers(len(SUBTITLE_BODIES))]
    opener = SUBTITLE_OPENERS[rng.integers(len(SUBTITLE_OPENERS))]
    hint = SUBTITLE_HINTS[plan.intent] if rng.random() < 0.25 else ""
    subtitle = " ".join(x for x in (opener, body + ("," if hint else "."), hint) if x)
    if plan.audio_mode == "none":
        audio_description = "No sound can be heard."
    else:
        audio_description = mention(sound, SOUNDS, GENERIC_AUDIO, "The audio has {}.")
    look_word, sound_word = look[rng.integers(len(look))], sound[rng.integers(len(sound))]
    template = EXPLANATIONS[rng.integers(len(EXPLANATIONS))]
    return dict(
        subtitle=subtitle,
        video_description=mention(look, LOOKS, GENERIC_VIDEO, "The video shows {}."),
        audio_description=audio_description,
        emotion_reason=f"The speaker has {look_word}, which suggests {plan.emotion}.",
        intent_reason=f"The voice has {sound_word}, which suggests {plan.intent}.",
        explanation=template.format(emotion=plan.emotion, intent=plan.intent, look=look_word, sound=sound_word),
    )


def text_corpus(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """The texts a corpus of ``n`` clips would hold (no media): for training a tiny tokenizer."""
    for plan in plan_corpus(n, seed):
        yield from clip_texts(plan).values()


# ----------------------------------------------------------------------------- pictures

def _face_sprite(emotion: str, radius: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RGB face (2r, 2r, 3) uint8 and its alpha mask (2r, 2r) bool."""
    look = LOOKS[emotion]
    size = 2 * radius
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (xx - radius) / radius, (yy - radius) / radius  # face coordinates in [-1, 1]
    alpha = u**2 + (v / 1.1) ** 2 <= 1.0
    color = np.clip(np.array(look["color"]) + rng.integers(-15, 16, 3), 0, 255).astype(np.uint8)
    img = np.zeros((size, size, 3), np.uint8)
    img[alpha] = color
    eyes = ((u - 0.38) ** 2 + (v + 0.3) ** 2 < 0.012) | ((u + 0.38) ** 2 + (v + 0.3) ** 2 < 0.012)
    mouth = _mouth(look["mouth"], u, v)
    brows = _brows(look["brows"], u, v)
    img[(eyes | mouth | brows) & alpha] = (25, 20, 20)  # features in dark ink
    return img, alpha


def _mouth(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    span = np.abs(u) < 0.45
    if shape == "smile":
        return span & (np.abs(v - (0.53 - 0.9 * u**2)) < 0.06)  # corners up
    if shape == "frown":
        return span & (np.abs(v - (0.42 + 0.9 * u**2)) < 0.06)  # corners down
    if shape == "open":
        r = u**2 + ((v - 0.45) / 1.3) ** 2
        return (r < 0.07) & (r > 0.03)
    if shape == "small_o":
        r = u**2 + (v - 0.45) ** 2
        return (r < 0.02) & (r > 0.008)
    if shape == "wavy":
        return span & (np.abs(v - (0.45 + 0.08 * np.sin(u * 14))) < 0.05)
    if shape == "tight":
        return (np.abs(u) < 0.3) & (np.abs(v - 0.45) < 0.08)
    return span & (np.abs(v - 0.45) < 0.035)  # "line"


def _brows(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    side = (np.abs(u) > 0.2) & (np.abs(u) < 0.55)
    if kind == "raised":
        return side & (np.abs(v + 0.62) < 0.04)
    if kind == "angry":  # slanting down toward the nose
        return side & (np.abs(v + 0.55 - 0.35 * (0.55 - np.abs(u))) < 0.04)
    if kind == "sad":  # slanting up toward the nose
        return side & (np.abs(v + 0.45 + 0.35 * (0.55 - np.abs(u))) < 0.04)
    if kind == "flat":
        return side & (np.abs(v + 0.5) < 0.035)
    return np.zeros_like(u, dtype=bool)


def _offset(motion: str, t: float, radius: int, phase: float) -> tuple[float, float, float]:
    """(dx, dy, scale) of the face at time ``t`` seconds."""
    if motion == "bounce":
        return 0.0, -0.25 * radius * abs(math.sin(2.5 * t + phase)), 1.0
    if motion == "zoom":
        return 0.0, 0.0, 1.0 + 0.18 * abs(math.sin(2.0 * t + phase))
    if motion == "droop":
        return 0.0, 0.3 * radius * min(t / 3.0, 1.0), 1.0
    if motion == "lean":
        return -0.3 * radius * math.sin(min(t, 1.5) / 1.5 * math.pi / 2), 0.0, 1.0
    if motion == "shake":
        return 0.2 * radius * math.sin(25.0 * t + phase), 0.0, 1.0
    if motion == "tremble":
        return 0.05 * radius * math.sin(40.0 * t + phase), 0.05 * radius * math.cos(33.0 * t), 1.0
    return 0.0, 0.0, 1.0  # "still"


def render_frames(plan: ClipPlan) -> np.ndarray:
    """The clip's frames, (T, H, W, 3) uint8."""
    rng = np.random.default_rng([plan.seed, 2])
    h, w = plan.height, plan.width
    base = int(min(w, h) * rng.uniform(0.26, 0.34))
    # Background: a dim random color with a fixed texture (never as bright as a face).
    background = (rng.integers(10, 70, 3)[None, None, :] + rng.integers(0, 20, (h, w, 1))).astype(np.uint8)
    zoom = LOOKS[plan.emotion]["motion"] == "zoom"
    sprites = {s: _face_sprite(plan.emotion, round(base * s), np.random.default_rng([plan.seed, 3]))
               for s in ((1.0, 1.06, 1.12, 1.18) if zoom else (1.0,))}
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.06, 0.06) * h
    phase = rng.uniform(0, 2 * math.pi)
    count = max(1, round(plan.duration * plan.fps))
    frames = np.empty((count, h, w, 3), np.uint8)
    for i in range(count):
        dx, dy, scale = _offset(LOOKS[plan.emotion]["motion"], i / plan.fps, base, phase)
        img, alpha = sprites[min(sprites, key=lambda s: abs(s - scale))]
        frames[i] = background
        _paste(frames[i], img, alpha, round(cx + dx), round(cy + dy))
    return frames


def _paste(frame: np.ndarray, img: np.ndarray, alpha: np.ndarray, cx: int, cy: int) -> None:
    """Draw ``img`` where ``alpha`` is set, centered at (cx, cy), clipped to the frame."""
    size = img.shape[0]
    top, left = cy - size // 2, cx - size // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, frame.shape[0]), min(left + size, frame.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    region = frame[y0:y1, x0:x1]
    sub = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    region[alpha[sub]] = img[sub][alpha[sub]]


# ----------------------------------------------------------------------------- sounds

def _contour(kind: str, x: np.ndarray) -> np.ndarray:
    """Pitch ratio over one syllable, ``x`` in [0, 1)."""
    return {
        "rise": 1.0 + 0.3 * x**2,
        "fall": 1.15 - 0.3 * x,
        "slow_fall": 1.1 - 0.2 * x,
        "rise_fall": 1.0 + 0.25 * np.sin(np.pi * x),
        "vibrato": 1.0 + 0.05 * np.sin(2 * np.pi * 6 * x),
        "double": np.where(x < 0.5, 1.0, 1.08),
        "steps_up": 1.0 + 0.1 * np.floor(3 * x),
        "steps_down": 1.2 - 0.1 * np.floor(3 * x),
        "flat": np.ones_like(x),
    }[kind]


def render_audio(plan: ClipPlan) -> np.ndarray:
    """The clip's audio, (samples,) float32 at 16 kHz, peak 0.5."""
    rng = np.random.default_rng([plan.seed, 4])
    sound = SOUNDS[plan.intent]
    n = int(round(plan.duration * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    register = sound["register"] * rng.uniform(0.96, 1.04)
    period = 1.0 / (sound["rate"] * rng.uniform(0.9, 1.1))
    start = rng.uniform(0, 0.3 * period)
    local = ((t - start) % period) / period  # position within the current syllable, [0, 1)
    voiced = (t >= start) & (local < 0.72)
    freq = register * _contour(sound["contour"], local / 0.72)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, sound["harmonics"] + 1))
    ramp = np.clip(np.minimum(local, 0.72 - local) * period / 0.02, 0, 1)  # 20 ms attack/release
    audio = wave * ramp * voiced + 0.01 * rng.standard_normal(n)
    return (0.5 * audio / np.max(np.abs(audio))).astype(np.float32)


# ----------------------------------------------------------------------------- files

# MB-tree off: with it, x264 (the one in PyAV's wheel, core 165) reads memory it never wrote
# (valgrind: an uninitialised value from its lookahead's stack used as a table index in the MB-tree
# quantizer offsets), so a clip's bytes depended on what its process had done before: 2 workers
# and 1 gave different corpora now and then. tests/test_synth.py checks the bytes against dirtied memory.
X264_OPTIONS = {"crf": "26", "preset": "veryfast", "mbtree": "0"}


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None) -> None:
    """H.264 video (+ AAC 16 kHz mono when ``audio`` is given), bit-exact for equal inputs,
    whatever the process did before (see X264_OPTIONS)."""
    import av

    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.options = X264_OPTIONS
        video.codec_context.thread_count = 1  # one process per core renders clips
        # every stream must exist before the first packet is muxed (the header is written then)
        track = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if audio is not None else None
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(_yuv420p(frame), format="yuv420p")
            picture.pts = i
            out.mux(video.encode(picture))
        out.mux(video.encode())
        if track is not None:
            chunk = av.AudioFrame.from_ndarray(audio[None, :], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = SAMPLE_RATE, 0
            out.mux(track.encode(chunk))
            out.mux(track.encode())


def _yuv420p(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (3H/2, W) planar YUV 4:2:0, BT.601 limited range, in integer arithmetic.

    Exact integer arithmetic, so the encoder's input is a function of the frame alone. (It was
    moved here from swscale when corpora differed now and then; swscale was not the cause, x264
    was: see X264_OPTIONS.)
    """
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., k].astype(np.int32) for k in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    # chroma from the mean of each 2x2 block, (H/2, W/2)
    r2, g2, b2 = (((c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]) + 2) >> 2 for c in (r, g, b))
    u = ((-38 * r2 - 74 * g2 + 112 * b2 + 128) >> 8) + 128
    v = ((112 * r2 - 94 * g2 - 18 * b2 + 128) >> 8) + 128
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
    return planes.astype(np.uint8)


def camera_frames(width: int, height: int, count: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``count`` (height, width, 3) uint8 frames that look like a handheld camera's: a lit
    backdrop with soft texture panning slowly, a head-like ellipse moving across, sensor noise.
    Their statistics (smooth areas, edges, mild noise) are those of real footage, so decode and
    resize costs are realistic, unlike noise frames that no codec compresses."""
    rng = np.random.default_rng(seed)
    pad = 64  # the backdrop is wider than the frame: the camera pans over it
    y, x = np.ogrid[0:height, 0:width + pad]
    light = 150 + 60 * np.cos(np.pi * (x / (width + pad) - 0.3)) * np.cos(np.pi * (y / height - 0.4))
    texture = sum(8 * np.sin(x / (5 + 13 * k) + rng.uniform(0, 6)) * np.sin(y / (7 + 11 * k) + rng.uniform(0, 6))
                  for k in range(3))
    backdrop = ((light + texture)[..., None] * rng.uniform(0.75, 1.0, 3)).clip(0, 255).astype(np.int16)
    noise = rng.normal(0, 3, (3, height, width, 3)).round().astype(np.int16)  # a few grains, cycled
    ry, rx = max(int(0.3 * height), 1), max(int(0.12 * width), 1)  # the head's half axes
    hy, hx = np.ogrid[-ry:ry, -rx:rx]
    head = (hy / ry) ** 2 + (hx / rx) ** 2 < 1  # (2ry, 2rx)
    skin = np.array([200, 150, 120], np.int16)
    for i in range(count):
        t = i / max(count - 1, 1)
        shift = int(round(pad * t))
        frame = backdrop[:, shift:shift + width] + noise[i % len(noise)]  # (H, W, 3) int16
        top, left = int(height * (0.5 + 0.05 * math.sin(6 * t))) - ry, int(width * (0.3 + 0.4 * t)) - rx
        box = frame[max(top, 0):top + 2 * ry, max(left, 0):left + 2 * rx]
        inside = head[max(-top, 0):max(-top, 0) + box.shape[0], max(-left, 0):max(-left, 0) + box.shape[1]]
        box[inside] = (box[inside] + skin) // 2
        yield frame.clip(0, 255).astype(np.uint8)


def write_camera_mp4(path: Path, width: int, height: int, fps, seconds: float, rate: int,
                     volume: float = 0.2, seed: int = 0) -> None:
    """An mp4 as cameras and phones write them: H.264 frames from :func:`camera_frames` and
    stereo AAC at ``rate`` (44.1/48 kHz) holding a 300 Hz tone at ``volume`` (0: digital silence)."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "23"}
        audio = out.add_stream("aac", rate=rate, layout="stereo")
        for i, frame in enumerate(camera_frames(width, height, int(seconds * float(fps)), seed)):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = i
            out.mux(video.encode(picture))
        out.mux(video.encode())
        t = np.arange(int(seconds * rate)) / rate
        tone = (volume * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
        chunk = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        chunk.sample_rate, chunk.pts = rate, 0
        out.mux(audio.encode(chunk))
        out.mux(audio.encode())


CAMERA = ((1920, 1080, 30, 48000), (1280, 720, 25, 44100))  # (width, height, fps, audio rate)
CAMERA_SECONDS = (5.0, 10.0, 15.0)


def camera_corpus(folder: Path, files: int, rounds: int) -> tuple[Record, list[Record]]:
    """``files`` + 1 camera-like mp4s in ``folder`` (kept: written once), alternating 1080p and
    720p, 5, 10 or 15 s, and their records: (the first file's, a warm-up; ``rounds`` records of
    each other file, round after round, so that a benchmark has many clips from a few files)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(files + 1):
        width, height, fps, rate = CAMERA[i % len(CAMERA)]
        seconds = CAMERA_SECONDS[(i // len(CAMERA)) % len(CAMERA_SECONDS)]
        names.append(f"camera_{i:02d}_{height}p_{seconds:.0f}s.mp4")
        if not (folder / names[-1]).is_file():
            write_camera_mp4(folder / f"partial_{names[-1]}", width, height, fps, seconds, rate, seed=i)
            (folder / f"partial_{names[-1]}").rename(folder / names[-1])

    def record(name: str, video_id: str) -> Record:
        return Record(video_id=video_id, video_path=name, audio_path="", subtitle="Hi.", emotion="neutral",
                      intent="neutral", video_description="", audio_description="", emotion_reason="",
                      intent_reason="", explanation="")

    return record(names[0], "warmup"), [record(name, f"{name[:-4]}_r{k}") for k in range(rounds) for name in names[1:]]


def render_clip(plan: ClipPlan, out: Path) -> Record:
    """Write the clip's media under ``out`` and return its annotation record."""
    import soundfile

    audio = render_audio(plan) if plan.audio_mode != "none" else None
    video_path = f"videos/{plan.video_id}.mp4"
    write_mp4(out / video_path, render_frames(plan), plan.fps, audio if "track" in plan.audio_mode else None)
    audio_path = ""
    if plan.audio_mode.startswith("file"):
        audio_path = f"audios/{plan.video_id}.wav"
        soundfile.write(out / audio_path, audio, SAMPLE_RATE, subtype="PCM_16")
    return Record(video_id=plan.video_id, video_path=video_path, audio_path=audio_path,
                  emotion=plan.emotion, intent=plan.intent, **clip_texts(plan))


def synth_corpus(out: str | Path, n: int, seed: int, emotions: LabelSet, intents: LabelSet,
                 workers: int | None = None, overwrite: bool = False,
                 progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Render ``n`` clips into ``out`` (published layout); returns clips per split.

    ``emotions``/``intents`` are the configured label sets: they must hold the labels this
    generator draws (MC-EIU's). ``progress`` is called with the number of clips just done.
    """
    out = Path(out)
    for kind, have, need in (("emotion", emotions, DEFAULT_EMOTIONS), ("intent", intents, DEFAULT_INTENTS)):
        missing = [x for x in need if x not in have.labels]
        if missing:
            raise ValueError(f"synth draws the MC-EIU {kind} labels, but the configured set lacks {missing}")
    if (out / "annotations").is_dir() and any((out / "annotations").iterdir()):
        if not (out / "synth.json").is_file():
            raise FileExistsError(f"{out} holds annotations that synth did not write; choose another folder")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a synthetic corpus; choose another folder or pass --overwrite")
        for sub in ("videos", "audios", "annotations"):  # synth's own output only
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("videos", "audios", "annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plans = plan_corpus(n, seed)
    workers = workers or min(os.cpu_count() or 1, 8)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        records = []
        for record in pool.map(render_clip, plans, [out] * n, chunksize=4):
            records.append(record)
            if progress:
                progress(1)
    counts = {}
    for split, _ in SPLITS:
        chosen = [r for p, r in zip(plans, records) if p.split == split]
        write_annotations(out / "annotations" / f"{split}.json", chosen)
        counts[split] = len(chosen)
    manifest = dict(generator="xmei synth", n=n, seed=seed, splits=counts, audio_modes=AUDIO_MODES,
                    clips=[asdict(p) for p in plans])
    (out / "synth.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return counts
