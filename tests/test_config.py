from __future__ import annotations

from pathlib import Path

import pytest

from xmei.config import ConfigError, ConfigWarning, MODEL_SUBDIRS, load_config

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "tests" / "data" / "published_config.yaml"  # verbatim copy of shared/


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_published_config_loads_with_a_warning_naming_ignored_keys():
    with pytest.warns(ConfigWarning) as caught:
        cfg = load_config(PUBLISHED)
    message = str(caught[0].message)
    for key in ("model.model_type", "model.ckpt", "datasets.mercaptionplus.data_type", "run.task"):
        assert key in message
    # published keys keep their meaning and YAML 1.2 floats such as 1e-5 read as floats
    assert cfg.run.init_lr == 1e-5 and isinstance(cfg.run.init_lr, float)
    assert cfg.run.warmup_lr == 1e-6 and cfg.run.warmup_steps == 5000 and cfg.run.max_epoch == 60
    assert cfg.model.lora_r == 64 and cfg.model.frozen_llm is False and cfg.run.amp is True
    assert cfg.model.num_video_query_token == 32 and cfg.model.llama_model == "Qwen25"
    assert cfg.datasets["mercaptionplus"].face_or_frame == "multiframe"


@pytest.mark.parametrize("name", ["tiny.yaml", "xmei_qwen.yaml"])
def test_shipped_configs_load_without_warnings(name, recwarn):
    cfg = load_config(ROOT / "configs" / name)
    assert not [w for w in recwarn if issubclass(w.category, ConfigWarning)]
    assert cfg.emotions.labels[0] == "happy" and len(cfg.intents) == 9
    assert cfg.model.visual_encoder_path is not None


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = write(tmp_path, """
model:
  lora_r: sixty-four
  colour: blue
run:
  init_lr: [1]
  amp: "yes"
  max_epoch: 0
datasets:
  mine: {media_root: 3}
surplus: {}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for expected in ("model.lora_r: expected int, got str 'sixty-four'", "model.colour: unknown key",
                     "run.init_lr: expected float", "run.amp: expected bool", "datasets.mine.media_root",
                     "surplus: unknown key"):
        assert expected in text


def test_value_checks_run_once_types_are_right(tmp_path):
    with pytest.raises(ConfigError, match=r"run.max_epoch: must be >= 1"):
        load_config(write(tmp_path, "run: {max_epoch: 0}"))
    with pytest.raises(ConfigError, match=r"run.min_lr: 0.1 is above run.init_lr"):
        load_config(write(tmp_path, "run: {min_lr: 0.1, init_lr: 1e-3}"))
    with pytest.raises(ConfigError, match=r"face_or_frame: only 'multiframe'"):
        load_config(write(tmp_path, "datasets: {d: {face_or_frame: face}}"))


def test_label_sets_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"labels.emotions: the emotion label set repeats \['sad'\]"):
        load_config(write(tmp_path, "labels: {emotions: [sad, Sad, happy]}"))
    with pytest.raises(ConfigError, match=r"labels.intents: intent synonym 'ask' points to 'asking'"):
        load_config(write(tmp_path, "labels: {intent_synonyms: {ask: asking}}"))
    cfg = load_config(write(tmp_path, "labels: {emotions: [Joy, Grief], emotion_synonyms: {glad: joy}}"))
    assert cfg.emotions.labels == ("joy", "grief")  # order as configured
    assert cfg.emotions.normalize("  GLAD ") == "joy"


def test_overrides_are_typed_like_the_file():
    cfg = load_config(None, ["run.init_lr=1e-4", "run.warmup_steps=7", "run.amp=false",
                             "run.iters_per_epoch=null", "datasets.d.media_root=/tmp",
                             "model.llama_model_path=/x/y"])
    assert cfg.run.init_lr == 1e-4 and cfg.run.warmup_steps == 7 and cfg.run.amp is False
    assert cfg.run.iters_per_epoch is None and cfg.datasets["d"].media_root == Path("/tmp")
    assert cfg.model.llama_model_path == Path("/x/y")
    with pytest.raises(ConfigError, match=r"run.warmup_steps: expected int or float, got str 'many'"):
        load_config(None, ["run.warmup_steps=many"])
    assert load_config(None, ["run.warmup_steps=0.03"]).run.warmup_steps == 0.03  # a fraction of the run
    with pytest.raises(ConfigError, match=r"run.warmup_steps: a count of steps \(an integer\) or a fraction"):
        load_config(None, ["run.warmup_steps=2.5"])
    assert load_config(None, ["run.device=cuda:1"]).run.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"run.device: 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"):
        load_config(None, ["run.device=gpu0"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(None, ["warmup_steps=3"])
    with pytest.raises(ConfigError, match=r"run.nope: unknown key"):
        load_config(None, ["run.nope=3"])


def test_models_dir_overrides_checkpoint_paths(tmp_path):
    for sub in MODEL_SUBDIRS:
        (tmp_path / sub).mkdir()
    cfg = load_config(ROOT / "configs" / "xmei_qwen.yaml", models_dir=tmp_path)
    assert cfg.model.visual_encoder_path == tmp_path / "visual_encoder"
    assert cfg.model.acoustic_encoder_path == tmp_path / "audio_encoder"
    assert cfg.model.llama_model_path == tmp_path / "llm"
    assert cfg.model.caption_tokenizer_path == tmp_path / "caption_tokenizer"
    assert cfg.model.asr_path == tmp_path / "asr"
    (tmp_path / "asr").rmdir()  # optional: a models folder made before there was one keeps the config's
    assert load_config(None, ["model.asr_path=/w"], models_dir=tmp_path).model.asr_path == Path("/w")
    assert load_config(None, models_dir=tmp_path).model.asr_path is None
    (tmp_path / "llm").rmdir()
    with pytest.raises(ConfigError, match=r"missing subfolder\(s\) \['llm'\]"):
        load_config(None, models_dir=tmp_path)


def test_missing_paths_name_their_keys(tmp_path):
    cfg = load_config(None, [f"model.visual_encoder_path={tmp_path}"])
    with pytest.raises(ConfigError, match="model.visual_encoder_path: .* is not a model folder .* no config.json"):
        cfg.require_paths(["model.visual_encoder_path"])
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text("{}")
    cfg.require_paths(["model.visual_encoder_path"])
    with pytest.raises(ConfigError) as err:
        cfg.require_paths(["model.visual_encoder_path", "model.llama_model_path"])
    assert "model.llama_model_path: not set" in str(err.value)
    cfg = load_config(None, ["model.llama_model_path=/no/such/dir"])
    with pytest.raises(ConfigError, match=r"model.llama_model_path: /no/such/dir does not exist"):
        cfg.require_paths(["model.llama_model_path"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_resolved_config_round_trips_and_hashes(tmp_path):
    import yaml

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    again = load_config(write(tmp_path, yaml.safe_dump(cfg.to_dict())))
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(ROOT / "configs" / "tiny.yaml", ["run.seed=1"]).hash() != cfg.hash()
