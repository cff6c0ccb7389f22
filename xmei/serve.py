"""`xmei serve`: checkpoints answering a user's own clip, with the evidence, behind a web page.

Process model: one process. At start every checkpoint loads once onto run.device as a
:class:`~xmei.predictor.Predictor` (the very path of `xmei predict` and the Python API, so an
answer here is the one `xmei eval` would score), with the first one's Whisper for transcripts;
checkpoints whose stage-1 settings agree share one set of frozen encoders. The page (xmei.serve_page, Gradio) hands each request to
:meth:`Service.answers` one at a time (its queue, concurrency 1: the models share one device):

    check the clip (a video PyAV can open, at most serve.max_seconds long)
    -> for each checkpoint in turn: its answer, the text streamed as it is generated
       (Predictor.predict's ``on_text``, from a generation thread the request waits for)
    -> the answer with its evidence: the sampled frames under the visual LQ-Former's attention,
       the waveform with the audio windows coloured by the audio LQ-Former's (xmei.report's
       strips), and the whole answer as a JSON file.

A request the server cannot answer (not a video, too long, unreadable media) is a
:class:`ServeError` whose message the page shows; what is only worth knowing (no audio track,
no subtitle, no description) rides with the answer as notes.
"""
from __future__ import annotations

import json
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.decode import MediaError, clip_seconds, read_audio, read_frames
from xmei.config import Config
from xmei.errors import UserError, write_whole
from xmei.predictor import Prediction, Predictor
from xmei.report import attention_strip, audio_strip, frames_strip

__all__ = ["Answered", "Model", "Partial", "ServeError", "Service", "model_name"]

log = logging.getLogger("xmei.serve")  # one line per answer (`xmei serve` prints them)
KEEP_ANSWERS_S = 3600  # an answer's JSON file is kept this long (a long-running server stays small)


class ServeError(UserError, ValueError):
    """A request the server cannot answer: the message says why, and what it takes instead."""


@dataclass(frozen=True)
class Model:
    """A checkpoint the server answers with; ``name`` heads its column on the page."""

    name: str
    checkpoint: Path
    predictor: Predictor

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.predictor.model.settings.modalities

    @property
    def cfg(self) -> Config:
        return self.predictor.cfg


@dataclass(frozen=True)
class Partial:
    """Model ``index``'s answer so far, while it is generated."""

    index: int
    text: str


@dataclass(frozen=True)
class Answered:
    """Model ``index``'s whole answer: the prediction, its notes and its evidence."""

    index: int
    name: str
    checkpoint: Path
    prediction: Prediction
    notes: tuple[str, ...]
    frames: Image.Image | None  # the sampled frames; under the attention of each query group where the model sees them
    audio: Image.Image | None  # the waveform, the windows coloured by attention where the model hears them
    seconds: float = 0.0  # generation and drawing
    json_path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The prediction's fields (xmei.predictor.Prediction.to_json), its attention arrays as
        nested lists ({query group: (F, P, P)} and {query group: (W,)}), the checkpoint and the notes."""
        p = self.prediction
        return {"checkpoint": str(self.checkpoint), "name": self.name, **p.to_json(),
                "visual_attention": {k: np.asarray(v).round(6).tolist() for k, v in p.visual_attention.items()},
                "audio_attention": {k: np.asarray(v).round(6).tolist() for k, v in p.audio_attention.items()},
                "notes": list(self.notes)}


def model_name(checkpoint: Path) -> str:
    """``RUN/checkpoints/step_N`` -> "RUN/step_N" (the folder's own name otherwise)."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return f"{checkpoint.parent.parent.name}/{checkpoint.name}"
    return checkpoint.name


class Service:
    """The models behind the page, loaded once (module docstring).

        service = Service.load([Path("runs/demo/runs/avt/checkpoints/step_0000350")])
        for event in service.answers(Path("clip.mp4"), "Well, the train was late."):
            ...  # Partial(index, text) while generating, then Answered(index, ...) per checkpoint
    """

    def __init__(self, models: Sequence[Model]):
        if not models:
            raise ValueError("a service needs at least one checkpoint")
        self.models = list(models)
        self.max_seconds = self.models[0].cfg.serve.max_seconds
        self.files = Path(tempfile.mkdtemp(prefix="xmei-serve-"))  # the answers' JSON files
        self._requests = 0

    @classmethod
    def load(cls, checkpoints: Sequence[Path], device: str | None = None, config: Path | None = None,
             sets: Sequence[str] = (), models: Path | None = None) -> "Service":
        """Each checkpoint with its own config (xmei.predictor.checkpoint_config), then ``sets``
        and ``models``; serve.max_seconds is the first checkpoint's."""
        loaded: list[Model] = []
        names = [model_name(c) for c in checkpoints]
        for i, checkpoint in enumerate(checkpoints):
            predictor = Predictor.from_checkpoint(checkpoint, device, config, sets, models)
            shared = [m.predictor for m in loaded if m.predictor.encoder_settings == predictor.encoder_settings]
            if shared:
                predictor.use_encoders_of(shared[0])
            else:
                predictor.encoders  # noqa: B018 - loaded now, not by the first request
            name = names[i] if names.count(names[i]) == 1 else f"{names[i]} ({i + 1})"
            loaded.append(Model(name, Path(checkpoint), predictor))
        loaded[0].predictor.transcriber  # noqa: B018 - its Whisper (when configured) loaded now, for transcripts
        return cls(loaded)

    def close(self) -> None:
        for model in self.models:
            model.predictor.close()
        shutil.rmtree(self.files, ignore_errors=True)

    # ------------------------------------------------------------------ a request

    def check_clip(self, video: Path | str | None) -> float:
        """The clip's length in seconds; a ServeError when there is no clip, it is no video PyAV
        can open, or it is longer than serve.max_seconds."""
        if video is None or not str(video).strip():
            raise ServeError("no clip: upload a video or record one")
        try:
            seconds = clip_seconds(Path(video))
        except MediaError as err:
            raise ServeError(f"{Path(video).name} is not a video this server can read ({err.reason})") from None
        if seconds > self.max_seconds:
            raise ServeError(f"{Path(video).name} is {seconds:.1f} s long; this server takes clips up to "
                             f"{self.max_seconds:g} s (serve.max_seconds): cut the moment to answer")
        return seconds

    def transcript(self, video: Path | str) -> tuple[str, str]:
        """(subtitle, source) by `xmei annotate`'s rules (sidecar, else speech recognition with
        model.asr_path, else ("", "none")), after :meth:`check_clip`."""
        self.check_clip(video)
        try:
            return self.models[0].predictor.subtitle_of(Path(video))
        except UserError as err:  # audio speech recognition cannot read
            raise ServeError(f"no transcript of {Path(video).name}: {err}") from None

    def answers(self, video: Path | str | None, subtitle: str = "", video_description: str = "",
                audio_description: str = "", subtitle_source: str = "given") -> Iterator[Partial | Answered]:
        """Each model's answer to the clip in turn: Partial events while it generates, then its
        Answered. A ServeError before any model runs when the clip cannot be answered.
        ``subtitle_source``: where the subtitle came from ("given", or :meth:`transcript`'s source)."""
        self.check_clip(video)
        video = Path(video)
        self._requests += 1
        request = self._requests
        evidence = _Evidence(video)
        for index, model in enumerate(self.models):
            started = time.perf_counter()
            prediction = yield from self._generate(index, model, video, subtitle or "", video_description or "",
                                                   audio_description or "")
            prediction = replace(prediction, subtitle_source=subtitle_source if prediction.subtitle else "none")
            frames, audio = evidence.images(model, prediction)
            answered = Answered(index, model.name, model.checkpoint, prediction,
                                _notes(model, prediction, evidence), frames, audio, time.perf_counter() - started)
            self._forget_old_answers()
            path = self.files / f"answer_{request:05d}_{index}.json"
            write_whole(path, json.dumps(answered.to_json(), indent=1) + "\n", "an answer's JSON file")  # full disk: a message
            log.info("answered %s with %s: %s / %s in %.1f s", video.name, model.name, prediction.emotion,
                     prediction.intent, answered.seconds)
            yield replace(answered, json_path=path)

    def _forget_old_answers(self) -> None:
        """The JSON files of answers older than KEEP_ANSWERS_S go (the page's links to them are
        Gradio's copies, which its own cache cleaning removes as old)."""
        now = time.time()
        for old in self.files.glob("answer_*.json"):
            if now - old.stat().st_mtime > KEEP_ANSWERS_S:
                old.unlink(missing_ok=True)

    def _generate(self, index: int, model: Model, video: Path, subtitle: str, video_description: str,
                  audio_description: str):
        """Partial events from a generation thread, which is always waited for (a request the
        client left still holds the device until its model is done); returns the Prediction."""
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                events.put(("done", model.predictor.predict(
                    video, subtitle, None, video_description, audio_description,
                    on_text=lambda text: events.put(("text", text)))))
            except BaseException as err:  # noqa: BLE001 - handed to the request, raised there
                events.put(("error", err))

        worker = threading.Thread(target=work, name=f"xmei-serve-{index}", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = events.get()
                if kind == "text":
                    yield Partial(index, value)
                elif kind == "error":
                    if isinstance(value, MediaError):
                        raise ServeError(f"cannot read {video.name}: {value.reason}") from None
                    raise value
                else:
                    return value
        finally:
            worker.join()


class _Evidence:
    """What a request draws from its clip, read once however many models answer it."""

    def __init__(self, video: Path):
        self.video = video
        self._frames: dict[int, np.ndarray] = {}
        self._wave: tuple[np.ndarray | None, str] | None = None

    def frames(self, n: int) -> np.ndarray:  # (n, H, W, 3) uint8, as stage 1 samples them
        if n not in self._frames:
            self._frames[n] = read_frames(self.video, n)
        return self._frames[n]

    def wave(self) -> tuple[np.ndarray | None, str]:
        """(16 kHz waveform or None, why not)."""
        if self._wave is None:
            try:
                wave = read_audio(None, self.video)
                self._wave = (wave, "" if wave is not None else "the clip has no audio track")
            except MediaError as err:
                self._wave = (None, f"its audio cannot be read ({err.reason})")
        return self._wave

    def images(self, model: Model, prediction: Prediction) -> tuple[Image.Image | None, Image.Image | None]:
        extract = model.cfg.extract
        frames = self.frames(extract.num_frames)
        if prediction.visual_attention:
            shown = attention_strip(frames, prediction.visual_attention)
        else:
            shown = frames_strip(frames)
        wave, _ = self.wave()
        audio = None if wave is None else audio_strip(wave, extract.num_audio_clips, extract.audio_clip_seconds,
                                                      prediction.audio_attention or None)
        return shown, audio


def _notes(model: Model, prediction: Prediction, evidence: _Evidence) -> tuple[str, ...]:
    """What the reader of this answer should know about how it was made."""
    notes = []
    if not prediction.subtitle.strip():
        notes.append("no subtitle: the model answered without one")
    elif prediction.subtitle_cut:
        notes.append("the subtitle was cut to fit model.max_length tokens, as in training")
    if not prediction.has_audio:
        _, why = evidence.wave()
        notes.append(f"no audio: {why or 'the clip has no audio track'}; "
                     + ("the model answered with its learned no-audio context" if "audio" in model.modalities
                        else "this model does not hear audio anyway"))
    if prediction.without_descriptions:
        notes.append(f"no {' or '.join(prediction.without_descriptions)} description: those LQ-Formers "
                     "answered from their learned queries alone")
    if "video" in model.modalities and not prediction.visual_attention:
        notes.append("the frames are shown without attention (the model reads pooled visual features)")
    if "video" not in model.modalities:
        notes.append("this model does not see the frames (shown for reference)")
    if "audio" not in model.modalities and prediction.has_audio:
        notes.append("this model does not hear the audio (its waveform is shown for reference)")
    if prediction.cut_off:
        notes.append("the answer was cut off at eval.max_new_tokens")
    if prediction.emotion_probs is None:
        notes.append("label probabilities unavailable for this answer")
    return tuple(notes)
