"""`xmei annotate`: a folder of raw videos -> unlabeled annotation records, with a subtitle each.

Every video under the folder (``VIDEO_SUFFIXES``, any case, recursive, in sorted path order)
becomes one record of the 11 published fields (pipeline.annotations), labels and texts other than
the subtitle empty, plus ``subtitle_source``. ``video_id`` is the path relative to the folder
without its suffix, ``video_path`` relative to the folder (the media root of the output),
``audio_path`` a same-named ``.wav`` beside the video, else "" (the video's own track).

A clip's subtitle comes from the first of these that gives a non-empty text (``SOURCES``):

1. a sidecar beside the video with its stem: ``.srt``, then ``.vtt``, then ``.txt`` (cue numbers,
   timings, WebVTT headers, NOTE/STYLE/REGION blocks, cue settings and inline tags dropped; the
   cue texts joined with spaces; a ``.txt`` is taken as it is, whitespace collapsed);
2. a row of the subtitle tables (``--subtitles FILE.csv``, :class:`SubtitleTable`): its name equals
   the video_id, else the video's stem when no other video has that stem;
3. speech recognition (:class:`Transcriber`, a Whisper folder) on the wav beside it, else its track;
4. none: the subtitle stays empty, source "none".

Nothing is silently dropped or replaced: a file that no decoder reads (probed by decoding one
frame, decord, else PyAV), two files giving one video_id, and a sidecar that is not UTF-8 are each
left out with a reason (:class:`Skipped`); a clip whose audio speech recognition cannot read keeps
an empty subtitle and a note saying why. A subtitle table that lacks a column is an error.

Process model: one process. Probing and sidecars go clip by clip; Whisper is loaded once and
transcribes the clips left in batches of 30 s windows, on ``run.device``.
"""
from __future__ import annotations

import csv
import html
import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.annotations import FIELDS
from pipeline.decode import SAMPLE_RATE, MediaError, read_audio, read_frames
from xmei.errors import UserError, read_text, write_whole

__all__ = ["PRESETS", "SOURCES", "VIDEO_SUFFIXES", "AsrError", "FolderAnnotations", "Preset", "Skipped",
           "SubtitleError", "SubtitleTable", "Transcriber", "Transcript", "annotate", "find_subtitle", "find_videos",
           "measure_asr", "sidecar_text", "write_annotated"]

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
SIDECAR_SUFFIXES = (".srt", ".vtt", ".txt")  # in the order they are looked for
SOURCES = ("srt", "vtt", "txt", "csv", "asr", "none")
WINDOW_S = 30  # Whisper hears 30 s at a time (3000 mel frames): longer clips go in windows
# OpenAI's decoding stops at 224 tokens, half of Whisper's 448 text positions (the bound also ends a
# random model's text, which no end-of-text token would)
MAX_NEW_TOKENS = 224
PROMPT_TOKENS = ("<|startoftranscript|>", "<|lang|>", "<|transcribe|>", "<|notimestamps|>")  # before the text


class SubtitleError(UserError, ValueError):
    """A subtitle file or table that cannot be used; the message names it."""


class AsrError(UserError, RuntimeError):
    """The speech recognition model cannot be loaded or run where asked; the message names it."""


# ---------------------------------------------------------------------------------------------
# sidecars

_TAG = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # <i>, <font ...>, WebVTT <v Name>/<c.x>/<00:01.000>, SSA {\an8}
_CUE_NUMBER = re.compile(r"\d+")


def sidecar_text(path: Path) -> str:
    """The spoken text of a subtitle file (.srt, .vtt or .txt; see the module docstring), a
    SubtitleError naming it when it is not UTF-8."""
    text = read_text(path, "the subtitle file", SubtitleError, "save it as UTF-8 (e.g. iconv -t UTF-8)")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _words(text)
    kept = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        timing = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if timing is not None:
            kept += lines[timing + 1:]  # the cue number / identifier before it, the settings on it, dropped
        elif suffix == ".srt":  # a cue's text after a blank line inside it, or a lone cue number
            kept += [line for line in lines if not _CUE_NUMBER.fullmatch(line.strip())]
        # .vtt: a block without timing is the WEBVTT header, a NOTE, STYLE or REGION block
    words = _words(" ".join(kept))
    return html.unescape(words) if suffix == ".vtt" else words  # WebVTT escapes &amp; &lt; &gt;


def _words(text: str) -> str:
    return " ".join(_TAG.sub("", text).split())


def _sidecar(video: Path) -> Path | None:
    """The first sidecar of the video (SIDECAR_SUFFIXES, lower or upper case), if any."""
    for suffix in SIDECAR_SUFFIXES:
        for spelled in (suffix, suffix.upper()):
            path = video.with_suffix(spelled)
            if path.is_file():
                return path
    return None


def _wav_beside(video: Path) -> Path | None:
    return next((p for p in (video.with_suffix(".wav"), video.with_suffix(".WAV")) if p.is_file()), None)


# ---------------------------------------------------------------------------------------------
# subtitle tables

@dataclass(frozen=True)
class Preset:
    """Where a dataset's subtitle table keeps the clip name and the text."""

    name_columns: tuple[str, ...]
    name_format: str  # the clip name from the name columns' values, in order
    text_column: str


PRESETS = {
    # MER2023-2025 transcription.csv / subtitle_chieng.csv: name, chinese, english
    "mer": Preset(("name",), "{0}", "english"),
    # MELD {train,dev,test}_sent_emo.csv: clips dia{Dialogue_ID}_utt{Utterance_ID}.mp4
    "meld": Preset(("Dialogue_ID", "Utterance_ID"), "dia{0}_utt{1}", "Utterance"),
}


@dataclass
class SubtitleTable:
    """Clip name -> subtitle, from one or more CSV files.

        table = SubtitleTable.read([Path("train_sent_emo.csv")], PRESETS["meld"])
        table.lookup("dia0_utt1", stem_is_unique=True)   # -> "...", or None

    A name given different texts (within a file or across files) is ambiguous: it is never used,
    and ``ambiguous`` says where it came from."""

    texts: dict[str, str]
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # name -> "FILE line N" of each text

    @classmethod
    def read(cls, files: Sequence[Path], preset: Preset | None = None, name_column: str | None = None,
             text_column: str | None = None) -> SubtitleTable:
        """The tables of ``files``. The name comes from ``name_column`` if given, else the preset's,
        else a column "name"; the text from ``text_column``, else the preset's, else "text"."""
        if name_column is not None:
            names, form = (name_column,), "{0}"
        else:
            names, form = (preset.name_columns, preset.name_format) if preset else (("name",), "{0}")
        text_column = text_column or (preset.text_column if preset else "text")
        table, seen = cls({}), {}
        for path in files:
            for line, name, text in _rows(Path(path), names, form, text_column):
                where = f"{path} line {line}"
                if name in seen and table.texts.get(name, text) != text:
                    table.ambiguous.setdefault(name, [seen[name]]).append(where)
                table.texts.setdefault(name, text)
                seen.setdefault(name, where)
        for name in table.ambiguous:
            del table.texts[name]
        return table

    def lookup(self, video_id: str, stem_is_unique: bool) -> str | None:
        """The text named by the video_id, else by the video's stem when it is unique."""
        if video_id in self.texts:
            return self.texts[video_id]
        stem = video_id.rsplit("/", 1)[-1]
        return self.texts.get(stem) if stem_is_unique else None


def _rows(path: Path, names: tuple[str, ...], form: str, text_column: str):
    """(line, clip name, text) of each row of a CSV file."""
    text = read_text(path, "the subtitle table", SubtitleError, "save it as UTF-8 (e.g. iconv -t UTF-8)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    lacking = [c for c in (*names, text_column) if c not in header]
    if lacking:
        raise SubtitleError(f"{path} (the subtitle table) has no column {', no '.join(map(repr, lacking))}; its "
                            f"columns are {', '.join(map(repr, header)) or 'none (an empty file)'} (choose them with "
                            f"--name-column / --text-column, or a --preset: {', '.join(PRESETS)})")
    for row in reader:
        name = form.format(*((row[c] or "").strip() for c in names))
        name = name[:-len(Path(name).suffix)] if Path(name).suffix.lower() in VIDEO_SUFFIXES else name
        yield reader.line_num, name, " ".join((row[text_column] or "").split())


# ---------------------------------------------------------------------------------------------
# speech recognition

@dataclass
class Transcript:
    text: str
    error: str | None = None  # why the clip's audio could not be read, naming the file (text then "")
    seconds: float = 0.0  # wall time spent on this clip: reading its audio and its share of the batches


class Transcriber:
    """A Whisper model from a local folder (save_pretrained's layout), loaded once.

        asr = Transcriber(Path("models/asr"), device="cpu")
        [t.text for t in asr.transcribe([(Path("a.mp4"), None), (Path("b.mp4"), Path("b.wav"))])]

    Audio is read as stage 1 reads it (pipeline.decode.read_audio: the audio file, else the video's
    own track, 16 kHz mono), cut into 30 s windows, and the windows of several clips go through
    Whisper together, ``batch_size`` at a time; a clip's text is its windows' texts in order.
    The language is Whisper's own guess per window; the task is transcription."""

    def __init__(self, folder: Path, device: str = "auto", batch_size: int = 8,
                 max_new_tokens: int | None = None):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor
        from transformers.utils import logging as hf_logging

        from pipeline.encoders import _load_checked
        from pipeline.farm import auto_dtype, local_device

        device = local_device(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise AsrError(f"speech recognition on {device}, but torch sees no GPU here (set run.device)")
        self.device, self.dtype = torch.device(device), getattr(torch, auto_dtype(device) or "float32")
        self.folder, self.batch_size = Path(folder), batch_size
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS
        started = time.perf_counter()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar inside the command's own
        try:
            self.processor = WhisperProcessor.from_pretrained(str(folder))
            self.model = _load_checked(WhisperForConditionalGeneration, str(folder), dtype=self.dtype)
        except (OSError, ValueError) as err:
            raise AsrError(f"{folder} (model.asr_path): cannot load a Whisper model: {err}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        room = self.model.config.max_target_positions - len(PROMPT_TOKENS)
        if self.max_new_tokens > room:
            raise AsrError(f"{self.max_new_tokens} new tokens per window: {folder} holds {room} after its prompt")
        self.load_seconds = time.perf_counter() - started

    def transcribe(self, clips: Sequence[tuple[Path, Path | None]],
                   progress: Callable[[int], None] | None = None) -> list[Transcript]:
        """One Transcript per (video, audio file or None) clip, in order; ``progress`` is called
        with the number of clips just done. A clip whose audio cannot be read gets its error."""
        results: list[Transcript] = []
        for start in range(0, len(clips), self.batch_size):
            group = clips[start:start + self.batch_size]
            results += self._group(group)
            if progress:
                progress(len(group))
        return results

    def _group(self, clips: Sequence[tuple[Path, Path | None]]) -> list[Transcript]:
        out, windows, owner = [], [], []  # windows: (samples,) float32 each; owner: its clip's index
        for i, (video, audio) in enumerate(clips):
            started = time.perf_counter()
            try:
                wave = read_audio(audio, video)
            except MediaError as err:
                out.append(Transcript("", str(err)))
            else:
                pieces = _windows(wave) if wave is not None else []  # None: no audio at all
                windows += pieces
                owner += [i] * len(pieces)
                out.append(Transcript(""))
            out[-1].seconds = time.perf_counter() - started
        texts: list[list[str]] = [[] for _ in clips]
        for start in range(0, len(windows), self.batch_size):
            started = time.perf_counter()
            chunk = windows[start:start + self.batch_size]
            for i, text in zip(owner[start:start + self.batch_size], self._generate(chunk)):
                texts[i].append(text)
                out[i].seconds += (time.perf_counter() - started) / len(chunk)
        for transcript, parts in zip(out, texts):
            transcript.text = " ".join(" ".join(parts).split())
        return out

    def _generate(self, windows: list[np.ndarray]) -> list[str]:
        import torch
        from transformers.utils import logging as hf_logging

        # an English-only Whisper (*.en) takes no task: it only transcribes English
        task = {"task": "transcribe"} if getattr(self.model.generation_config, "is_multilingual", False) else {}
        features = self.processor.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        inputs = features.input_features.to(self.device, self.dtype)  # (B, mel bins, 3000), padded to 30 s
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # Whisper's generate warns of its own config's max_length and mask, per call
        try:
            with torch.inference_mode():
                ids = self.model.generate(inputs, max_new_tokens=self.max_new_tokens, **task)
        finally:
            hf_logging.set_verbosity(verbosity)
        return self.processor.batch_decode(ids, skip_special_tokens=True)


def _windows(wave: np.ndarray) -> list[np.ndarray]:
    """The waveform in consecutive windows of WINDOW_S seconds (the last one shorter)."""
    size = WINDOW_S * SAMPLE_RATE
    return [wave[start:start + size] for start in range(0, len(wave), size)]


def measure_asr(folder: Path, clips: Sequence[tuple[Path, Path | None]], device: str = "auto",
                batch_size: int = 8) -> dict[str, float]:
    """Speech recognition's cost on ``clips``: the model's load time, then the wall time of
    transcribing them all and its share per clip (reading the audio included)."""
    asr = Transcriber(folder, device, batch_size)
    started = time.perf_counter()
    asr.transcribe(clips)
    seconds = time.perf_counter() - started
    return {"clips": len(clips), "load_s": asr.load_seconds, "seconds": seconds,
            "seconds_per_clip": seconds / max(len(clips), 1)}


# ---------------------------------------------------------------------------------------------
# one clip, and a folder

def find_subtitle(video: Path, table: SubtitleTable | None = None, transcriber: Transcriber | None = None,
                  audio: Path | None = None, name: str | None = None) -> tuple[str, str]:
    """(text, source) of one clip, from the first source that gives a text (module docstring):
    its sidecar, its row of ``table`` (by ``name``, default the video's stem), ``transcriber`` on
    ``audio`` (default the wav beside the video, else its track); else ("", "none"). A sidecar
    that is not UTF-8 is a SubtitleError, audio that Whisper cannot read an AsrError."""
    video = Path(video)
    text, source = _written_subtitle(video, table, name or video.stem, stem_is_unique=True)
    if source == "none" and transcriber is not None:
        transcript, = transcriber.transcribe([(video, audio or _wav_beside(video))])
        if transcript.error:
            raise AsrError(f"no speech recognition: {transcript.error}")
        if transcript.text:
            return transcript.text, "asr"
    return text, source


def _written_subtitle(video: Path, table: SubtitleTable | None, name: str, stem_is_unique: bool) -> tuple[str, str]:
    """(text, source) from the video's sidecar, else its row of ``table``; ("", "none") when neither
    gives a text."""
    sidecar = _sidecar(video)
    if sidecar is not None and (text := sidecar_text(sidecar)):
        return text, sidecar.suffix[1:].lower()
    if table is not None and (text := table.lookup(name, stem_is_unique)):
        return text, "csv"
    return "", "none"


@dataclass
class Skipped:
    path: str  # relative to the videos folder
    stage: str  # "video_id" | "video" | "subtitle"
    reason: str


@dataclass
class FolderAnnotations:
    """What :func:`annotate` made: the records (the 11 fields + subtitle_source, in path order),
    the files left out, and notes on clips kept without a subtitle they might have had."""

    records: list[dict[str, str]]
    skipped: list[Skipped]
    notes: list[str]
    asr_seconds: list[float]  # per transcribed clip

    def sources(self) -> dict[str, int]:
        counts = Counter(r["subtitle_source"] for r in self.records)
        return {source: counts.get(source, 0) for source in SOURCES}


def find_videos(folder: Path) -> list[Path]:
    """Every video file under ``folder`` (VIDEO_SUFFIXES in any case), sorted by relative path."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def annotate(folder: Path, table: SubtitleTable | None = None, transcriber: Transcriber | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> FolderAnnotations:
    """The records of every video under ``folder`` (see the module docstring). ``progress`` is
    called with (stage "probing" | "speech recognition", clips done, clips in that stage)."""
    folder = Path(folder)
    tell = progress or (lambda stage, done, total: None)
    skipped: list[Skipped] = []
    files = find_videos(folder)
    stems = Counter(path.stem for path in files)  # a table's row names a clip by its stem only when unique
    videos = _unique_ids(folder, files, skipped)
    readable = {}
    for done, (video_id, path) in enumerate(videos.items(), start=1):
        try:
            read_frames(path, 1)
        except MediaError as err:
            skipped.append(Skipped(_rel(path, folder), "video", err.reason))
        else:
            readable[video_id] = path
        tell("probing", done, len(videos))
    found: dict[str, tuple[str, str]] = {}  # video_id -> (text, source)
    for video_id, path in readable.items():
        try:
            found[video_id] = _written_subtitle(path, table, video_id, stems[path.stem] == 1)
        except SubtitleError as err:
            skipped.append(Skipped(_rel(path, folder), "subtitle", str(err)))
    notes = _table_notes(table, stems)
    asr_seconds = _transcribe(folder, readable, found, transcriber, notes, tell)
    records = [_record(folder, readable[video_id], video_id, *found[video_id]) for video_id in found]
    skipped.sort(key=lambda s: s.path)
    return FolderAnnotations(records, skipped, notes, asr_seconds)


def _table_notes(table: SubtitleTable | None, stems: Counter) -> list[str]:
    """What of the subtitle table was not used, and why."""
    if table is None:
        return []
    return [*(f"subtitle table: {name!r} has different texts at {', '.join(where)}: not used"
              for name, where in table.ambiguous.items()),
            *(f"subtitle table: {stem!r} is the stem of {count} videos: not used (name them by video_id)"
              for stem, count in stems.items() if count > 1 and stem in table.texts)]


def _unique_ids(folder: Path, videos: list[Path], skipped: list[Skipped]) -> dict[str, Path]:
    """video_id -> file; every file whose id another file has too is skipped, none kept."""
    ids = {path: _rel(path, folder)[:-len(path.suffix)] for path in videos}
    count = Counter(ids.values())
    for path, video_id in ids.items():
        if count[video_id] > 1:
            others = [_rel(p, folder) for p, i in ids.items() if i == video_id and p != path]
            skipped.append(Skipped(_rel(path, folder), "video_id", f"video_id {video_id!r} is also that of "
                                   f"{', '.join(others)}: rename one of them"))
    return {video_id: path for path, video_id in ids.items() if count[video_id] == 1}


def _transcribe(folder: Path, videos: dict[str, Path], found: dict[str, tuple[str, str]],
                transcriber: Transcriber | None, notes: list[str], tell: Callable[[str, int, int], None]) -> list[float]:
    """Speech recognition for the clips without a subtitle yet; their per-clip seconds."""
    wanted = [video_id for video_id, (_, source) in found.items() if source == "none"]
    if transcriber is None or not wanted:
        return []
    done = 0

    def advanced(clips: int) -> None:
        nonlocal done
        done += clips
        tell("speech recognition", done, len(wanted))

    transcripts = transcriber.transcribe([(videos[v], _wav_beside(videos[v])) for v in wanted], advanced)
    for video_id, transcript in zip(wanted, transcripts):
        if transcript.error:
            notes.append(f"{_rel(videos[video_id], folder)}: no speech recognition, the audio cannot be read "
                         f"({transcript.error}); kept with an empty subtitle")
        elif transcript.text:
            found[video_id] = transcript.text, "asr"
    return [t.seconds for t in transcripts]


def _record(folder: Path, path: Path, video_id: str, subtitle: str, source: str) -> dict[str, str]:
    wav = _wav_beside(path)
    row = dict.fromkeys(FIELDS, "")
    row.update(video_id=video_id, video_path=_rel(path, folder), audio_path=_rel(wav, folder) if wav else "",
               subtitle=subtitle)
    return {**row, "subtitle_source": source}


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def write_annotated(result: FolderAnnotations, out: Path) -> Path | None:
    """The records as a JSON list at ``out`` and the files left out as JSON lines at
    ``<out stem>.skipped.jsonl`` beside it (removed when none was: a rerun's list replaces the
    last one), each written whole; the skipped file's path, if written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_whole(out, json.dumps(result.records, indent=1, ensure_ascii=False) + "\n", "the annotations")
    skipped = out.with_name(f"{out.stem}.skipped.jsonl")
    if not result.skipped:
        skipped.unlink(missing_ok=True)
        return None
    rows = "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in result.skipped)
    return write_whole(skipped, rows, "the files left out")
