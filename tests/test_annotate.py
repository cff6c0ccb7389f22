"""`xmei annotate` (pipeline.annotate): a folder of real mp4s from the synthetic corpus, copied into
nested folders with sidecars of each kind, subtitle tables, the tiny Whisper, and files that must be
left out; its output accepted by `xmei validate --unlabeled`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from faults import xmei
from pipeline.annotate import (PRESETS, AsrError, SubtitleError, SubtitleTable, Transcriber, _windows, annotate,
                               find_subtitle, sidecar_text, write_annotated)
from pipeline.annotations import check_annotations
from pipeline.decode import SAMPLE_RATE

SRT = ("1\n00:00:01,000 --> 00:00:02,500\n<i>Well,</i> I <font color=\"red\">never</font>\n\n"
       "2\r\n00:00:02,500 --> 00:00:04,000 X1:40 X2:600\r\n{\\an8}said that\r\n\r\nthe cue goes on\n\n")
VTT = ("WEBVTT - a title\nKind: captions\n\nNOTE a comment\nthat spans lines\n\nSTYLE\n::cue { color: red }\n\n"
       "intro\n00:01.000 --> 00:02.000 align:start position:10%\n<v Bob>Tom &amp; <c.loud>Jerry</c></v>\n\n"
       "00:02.000 --> 00:03.000\nran <00:02.500>away\n")


def _clips(corpus: Path, n: int, audio_mode: str | None = None) -> list[Path]:
    """The first ``n`` corpus videos (of that audio mode, if given), in video_id order."""
    plans = json.loads((corpus / "synth.json").read_text())["clips"]
    return [corpus / "videos" / f"{p['video_id']}.mp4" for p in plans if audio_mode in (None, p["audio_mode"])][:n]


@pytest.fixture(scope="module")
def folder(corpus, tmp_path_factory) -> Path:
    """A folder as a user has one: nested, mixed suffixes and sidecars, a CSV's clip, a wav beside
    one clip, a text file named .mp4, two files giving one video_id, a sidecar that is not UTF-8."""
    root = tmp_path_factory.mktemp("videos")
    with_track = _clips(corpus, 7, "file+track")
    put = {"a/one.mp4": with_track[0], "a/b/two.MOV": with_track[1], "three.mkv": with_track[2],
           "meld/dia4_utt2.mp4": with_track[3], "four.webm": with_track[4], "five.mp4": with_track[5],
           "dup/x.mp4": with_track[6], "dup/x.avi": with_track[6], "latin/six.mp4": with_track[6]}
    for name, source in put.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / name)
    (root / "a/one.srt").write_text(SRT)
    (root / "a/b/two.vtt").write_text(VTT)
    (root / "three.txt").write_text("  plain\n transcript \n")
    (root / "four.srt").write_text("")  # empty: the next source is asked
    shutil.copy(corpus / "audios" / f"{with_track[5].stem}.wav", root / "five.wav")
    (root / "latin/six.srt").write_bytes("1\n00:00:01,000 --> 00:00:02,000\ncaf\u00e9\n".encode("latin-1"))
    (root / "notes.mp4").write_text("not a video at all\n")
    (root / "readme.md").write_text("not a video, not looked at\n")
    return root


@pytest.fixture(scope="module")
def asr(tiny_models) -> Transcriber:
    return Transcriber(tiny_models / "asr", device="cpu", batch_size=4, max_new_tokens=8)


def test_sidecars_keep_only_the_spoken_text(tmp_path):
    for name, text in (("a.srt", SRT), ("a.vtt", VTT), ("a.txt", "line one\n\n  line   two\n")):
        (tmp_path / name).write_text(text)
    assert sidecar_text(tmp_path / "a.srt") == "Well, I never said that the cue goes on"
    assert sidecar_text(tmp_path / "a.vtt") == "Tom & Jerry ran away"
    assert sidecar_text(tmp_path / "a.txt") == "line one line two"
    (tmp_path / "b.srt").write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\nna\xefve\n")
    with pytest.raises(SubtitleError, match=r"b\.srt \(the subtitle file\) is not UTF-8 text: byte 34 .* save it as UTF-8"):
        sidecar_text(tmp_path / "b.srt")


def test_subtitle_tables_of_both_presets_and_custom_columns(tmp_path):
    mer = tmp_path / "transcription.csv"
    mer.write_text("\ufeffname,chinese,english\nsample_01,你好,Hello there\nsample_02.mp4,再见,Good  bye\n",
                   encoding="utf-8")
    table = SubtitleTable.read([mer], PRESETS["mer"])
    assert table.texts == {"sample_01": "Hello there", "sample_02": "Good bye"}  # a video suffix dropped
    assert SubtitleTable.read([mer], PRESETS["mer"], text_column="chinese").texts["sample_01"] == "你好"
    meld = tmp_path / "dev_sent_emo.csv"
    meld.write_text('Sr No.,Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\n'
                    '1,"Oh, my God!",Joey,surprise,0,3\n2,"No, no.",Ross,neutral,12,0\n')
    assert SubtitleTable.read([meld], PRESETS["meld"]).texts == {"dia0_utt3": "Oh, my God!", "dia12_utt0": "No, no."}
    custom = tmp_path / "mine.csv"
    custom.write_text("clip,said\nsub/a,first\nb,second\nb,other\n")
    table = SubtitleTable.read([custom], name_column="clip", text_column="said")
    assert table.texts == {"sub/a": "first"} and table.ambiguous == {"b": [f"{custom} line 3", f"{custom} line 4"]}
    assert table.lookup("sub/a", stem_is_unique=False) == "first"
    assert table.lookup("x/sub/a", stem_is_unique=True) is None  # a name is a video_id or a stem, no suffix of one
    with pytest.raises(SubtitleError, match=r"mine\.csv \(the subtitle table\) has no column 'name', no 'english'; "
                                            r"its columns are 'clip', 'said'"):
        SubtitleTable.read([custom], PRESETS["mer"])


def test_annotate_a_folder(folder, tmp_path):
    table = SubtitleTable.read([_meld_csv(tmp_path)], PRESETS["meld"])
    stages = []
    result = annotate(folder, table, progress=lambda stage, done, total: stages.append((stage, done, total)))
    rows = {r["video_id"]: r for r in result.records}
    assert list(rows) == ["a/b/two", "a/one", "five", "four", "meld/dia4_utt2", "three"]  # sorted by path
    assert {k: (r["subtitle_source"], r["subtitle"]) for k, r in rows.items()} == {
        "a/b/two": ("vtt", "Tom & Jerry ran away"), "a/one": ("srt", "Well, I never said that the cue goes on"),
        "five": ("none", ""), "four": ("none", ""), "meld/dia4_utt2": ("csv", "Hey."), "three": ("txt", "plain transcript")}
    assert rows["a/b/two"]["video_path"] == "a/b/two.MOV" and rows["five"]["audio_path"] == "five.wav"
    assert rows["a/one"]["audio_path"] == "" and rows["a/one"]["emotion"] == rows["a/one"]["explanation"] == ""
    assert result.sources() == {"srt": 1, "vtt": 1, "txt": 1, "csv": 1, "asr": 0, "none": 2}
    skipped = {s.path: (s.stage, s.reason) for s in result.skipped}
    assert set(skipped) == {"dup/x.avi", "dup/x.mp4", "latin/six.mp4", "notes.mp4"}
    assert skipped["dup/x.avi"] == ("video_id", "video_id 'dup/x' is also that of dup/x.mp4: rename one of them")
    assert skipped["notes.mp4"][0] == "video" and "cannot decode video" in skipped["notes.mp4"][1]
    assert skipped["latin/six.mp4"][0] == "subtitle" and "six.srt (the subtitle file) is not UTF-8" in skipped[
        "latin/six.mp4"][1]
    assert stages[-1] == ("probing", 8, 8)  # the 10 files less the two of one id

    out = tmp_path / "out" / "ann.json"
    assert write_annotated(result, out) == tmp_path / "out" / "ann.skipped.jsonl"
    assert [json.loads(line)["path"] for line in out.with_name("ann.skipped.jsonl").read_text().splitlines()] == \
        sorted(skipped)
    records, problems, summary = check_annotations(out, *_labels(), media_root=folder, labeled=False)
    assert not problems and len(records) == 6 and summary.extra_fields == ["subtitle_source"]


def test_sources_in_order_and_what_a_table_cannot_name(folder):
    """A sidecar wins over a table's row; a row names a video by video_id, or by a stem no other
    video has (dup/x.mp4 and dup/x.avi share theirs: noted, not used)."""
    table = SubtitleTable({"a/one": "from the table", "five": "Five.", "x": "which x?"})
    result = annotate(folder, table)
    rows = {r["video_id"]: r for r in result.records}
    assert rows["a/one"]["subtitle_source"] == "srt" and rows["five"]["subtitle"] == "Five."
    assert result.notes == ["subtitle table: 'x' is the stem of 2 videos: not used (name them by video_id)"]


def test_a_rerun_without_left_out_files_removes_the_old_list(folder, tmp_path):
    out = tmp_path / "ann.json"
    write_annotated(annotate(folder), out)
    assert out.with_name("ann.skipped.jsonl").is_file()
    nothing_left_out = annotate(folder / "a")
    assert write_annotated(nothing_left_out, out) is None and not out.with_name("ann.skipped.jsonl").exists()


def test_speech_recognition_with_the_tiny_whisper(folder, corpus, asr, tmp_path):
    """Whisper hears what clips without a sidecar or a CSV row hold: the wav beside five.mp4, the
    track of four.webm; a clip without any audio gets no text; random weights, so only the plumbing
    is checked: text, per-clip seconds, the same text for the same audio."""
    result = annotate(folder, None, asr)
    rows = {r["video_id"]: r for r in result.records}
    assert rows["five"]["subtitle_source"] == rows["four"]["subtitle_source"] == "asr"
    assert rows["five"]["subtitle"] and "<|" not in rows["five"]["subtitle"]
    assert rows["a/one"]["subtitle_source"] == "srt" and len(result.asr_seconds) == 3  # five, four, dia4_utt2
    assert all(s > 0 for s in result.asr_seconds)
    silent, = _clips(corpus, 1, "none")
    assert find_subtitle(silent, transcriber=asr) == ("", "none")
    assert find_subtitle(folder / "five.mp4", transcriber=asr) == (rows["five"]["subtitle"], "asr")
    assert find_subtitle(folder / "a/one.mp4", transcriber=asr)[1] == "srt"


def test_long_clips_are_heard_in_30_second_windows(folder, asr, tmp_path):
    """A 65 s clip is heard as three windows (30 + 30 + 5 s), its text theirs in order: the same
    as three clips of those windows in one batch of the same windows."""
    wave = np.random.default_rng(0).standard_normal(SAMPLE_RATE * 65).astype(np.float32) * 0.1
    pieces = _windows(wave)
    assert [len(w) for w in pieces] == [SAMPLE_RATE * 30] * 2 + [SAMPLE_RATE * 5]
    soundfile.write(tmp_path / "long.wav", wave, SAMPLE_RATE, subtype="FLOAT")  # float: read back exactly
    for i, piece in enumerate(pieces):
        soundfile.write(tmp_path / f"{i}.wav", piece, SAMPLE_RATE, subtype="FLOAT")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nonsense")
    video = folder / "five.mp4"
    one, bad = asr.transcribe([(video, tmp_path / "long.wav"), (video, broken)])
    apart = asr.transcribe([(video, tmp_path / f"{i}.wav") for i in range(3)])
    assert one.error is None and one.text == " ".join(" ".join(t.text for t in apart).split())
    assert len([t for t in apart if t.text]) >= 2  # it says something: the join is seen
    assert "broken.wav: cannot decode audio" in bad.error and bad.text == ""
    with pytest.raises(AsrError, match=r"no speech recognition: \S+/broken.wav: cannot decode audio"):
        find_subtitle(folder / "five.mp4", transcriber=asr, audio=broken)


def test_a_clip_whose_audio_whisper_cannot_read_stays_with_a_note(folder, asr, tmp_path):
    shutil.copy(folder / "five.mp4", tmp_path / "seven.mp4")
    (tmp_path / "seven.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    result = annotate(tmp_path, transcriber=asr)
    assert [(r["video_id"], r["audio_path"], r["subtitle_source"]) for r in result.records] == \
        [("seven", "seven.wav", "none")]
    assert not result.skipped and len(result.notes) == 1
    assert result.notes[0].startswith("seven.mp4: no speech recognition, the audio cannot be read (")
    assert "seven.wav: cannot decode audio" in result.notes[0]


def test_an_english_only_whisper_is_given_no_task(folder, tiny_models, tmp_path):
    """A *.en Whisper (is_multilingual false, no languages or tasks) transcribes as it is."""
    english = shutil.copytree(tiny_models / "asr", tmp_path / "asr.en")
    generation = json.loads((english / "generation_config.json").read_text())
    for key in ("lang_to_id", "task_to_id"):
        del generation[key]
    (english / "generation_config.json").write_text(json.dumps({**generation, "is_multilingual": False}))
    transcript, = Transcriber(english, device="cpu", max_new_tokens=4).transcribe([(folder / "five.mp4", None)])
    assert transcript.error is None and transcript.text


def test_the_command(folder, tiny_models, tmp_path):
    out = tmp_path / "ann.json"
    csv = _meld_csv(tmp_path)
    result = xmei("annotate", folder, "--out", out, "--models", tiny_models, "--subtitles", csv, "--preset", "meld",
                  "--asr-max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "speech recognition with" in result.stderr  # on by default: --models names a Whisper
    assert f"{out}: 6 clips (subtitles: srt 1, vtt 1, txt 1, csv 1, asr 2, none 0)" in result.stdout
    assert "4 file(s) left out" in result.stderr and "notes.mp4 (video): cannot decode video" in result.stderr
    assert "speech recognition: 2 clips" in result.stdout
    checked = xmei("validate", out, "--unlabeled", "--media-root", folder)
    assert checked.returncode == 0 and "6 records, 6 valid" in checked.stdout
    again = xmei("annotate", folder, "--out", out, "--no-asr")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    again = xmei("annotate", folder, "--out", out, "--no-asr", "--overwrite", "--models", tiny_models)
    assert again.returncode == 0 and "asr 0, none 3" in again.stdout
    wrong = xmei("annotate", folder, "--out", tmp_path / "b.json", "--subtitles", csv, "--preset", "mer")
    assert wrong.returncode == 1 and "has no column 'name', no 'english'" in wrong.stderr
    assert not (tmp_path / "b.json").exists()
    lonely = xmei("annotate", folder, "--out", tmp_path / "b.json", "--preset", "meld")
    assert lonely.returncode == 2 and "--subtitles" in lonely.stderr
    unset = xmei("annotate", folder, "--out", tmp_path / "b.json", "--asr")
    assert unset.returncode == 2 and "model.asr_path: not set" in unset.stderr
    (tmp_path / "empty").mkdir()
    empty = xmei("annotate", tmp_path / "empty", "--out", tmp_path / "b.json")
    assert empty.returncode == 1 and "no readable video under" in empty.stderr and not (tmp_path / "b.json").exists()
    folder_out = xmei("annotate", folder, "--out", tmp_path, "--overwrite")
    assert folder_out.returncode == 2 and f"{tmp_path} is a folder" in folder_out.stderr
    help_text = xmei("annotate", "--help", env={"COLUMNS": "400"}).stdout
    assert "mer (MER2023-2025" in help_text and "meld (MELD" in help_text


def _meld_csv(folder: Path) -> Path:
    path = folder / "test_sent_emo.csv"
    path.write_text("Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n"
                    "1,Hey.,Ross,neutral,neutral,4,2\n2,Unused.,Rachel,joy,positive,9,9\n")
    return path


def _labels():
    from xmei.config import Config

    cfg = Config()
    return cfg.emotions, cfg.intents
