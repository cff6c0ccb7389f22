"""Tests for pipeline.tiny_models: reload offline, shapes, tokenizer layout, determinism."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest

from pipeline.tiny_models import build_tiny_models
from xmei.config import MODEL_SUBDIRS
from xmei.prompt import PLACEHOLDER_TOKENS

# Runs in a fresh interpreter so the offline variables are set before transformers imports.
RELOAD_SNIPPET = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoImageProcessor,
        AutoModelForCausalLM, AutoTokenizer, CLIPVisionModelWithProjection, HubertModel)
    root = sys.argv[1]
    res = {}
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    vis = root + "/visual_encoder"
    res["clip_model_type"] = AutoConfig.from_pretrained(vis).model_type
    proc = AutoImageProcessor.from_pretrained(vis)
    clip = CLIPVisionModelWithProjection.from_pretrained(vis).eval()
    image = Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8))
    pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = clip(pixel_values=pixels)
    res["clip_pixels"] = list(pixels.shape)
    res["clip_hidden"] = list(out.last_hidden_state.shape)
    res["clip_embeds"] = list(out.image_embeds.shape)

    aud = root + "/audio_encoder"
    fe = AutoFeatureExtractor.from_pretrained(aud)
    hubert = HubertModel.from_pretrained(aud).eval()
    res["hubert_frames"] = {}
    for seconds in (1, 2):
        wave = rng.standard_normal(16000 * seconds).astype("float32")
        batch = fe(wave, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            out = hubert(**batch, output_hidden_states=True)
        res["hubert_mask"] = "attention_mask" in batch
        res["hubert_states"] = len(out.hidden_states)
        res["hubert_frames"][seconds] = out.last_hidden_state.shape[1]
        res["hubert_hidden"] = out.last_hidden_state.shape[2]

    llm = root + "/llm"
    tok = AutoTokenizer.from_pretrained(llm)
    lm = AutoModelForCausalLM.from_pretrained(llm).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "<Video><ImageHere></Video> hi"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = lm(input_ids=ids["input_ids"]).logits
    res["llm_ids"] = list(ids["input_ids"].shape)
    res["llm_logits"] = list(logits.shape)
    res["llm_len_tok"] = len(tok)
    res["llm_gen"] = [lm.generation_config.eos_token_id, lm.generation_config.pad_token_id]
    res["llm_special"] = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    cap = AutoTokenizer.from_pretrained(root + "/caption_tokenizer")
    res["caption_vocab"] = cap.vocab_size
    res["caption_ids"] = cap("Hello world")["input_ids"]
    res["caption_long"] = len(cap("word " * 300)["input_ids"])

    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    wproc = WhisperProcessor.from_pretrained(root + "/asr")
    whisper = WhisperForConditionalGeneration.from_pretrained(root + "/asr").eval()
    feats = wproc.feature_extractor([rng.standard_normal(16000 * 3).astype("float32")] * 2, sampling_rate=16000,
                                    return_tensors="pt").input_features
    with torch.no_grad():
        out = whisper.generate(feats, task="transcribe", max_new_tokens=8)  # language detected, as a real one
    specials = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
    res["whisper_features"] = list(feats.shape)
    res["whisper_out"] = list(out.shape)
    res["whisper_specials"] = [wproc.tokenizer.encode(t, add_special_tokens=False) for t in specials]
    res["whisper_ids"] = [wproc.tokenizer.convert_tokens_to_ids(t) for t in specials]
    res["whisper_text"] = wproc.batch_decode(out, skip_special_tokens=True)
    res["whisper_round_trip"] = wproc.tokenizer.decode(wproc.tokenizer.encode(" the speaker sounds happy",
                                                                              add_special_tokens=False))
    print(json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny")
    return root, build_tiny_models(root, seed=0, texts=["I can't believe it's 2024!"])


@pytest.fixture(scope="module")
def reloaded(built: tuple[Path, dict[str, Path]]) -> dict:
    root, _ = built
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SNIPPET, str(root)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llm_tok(built: tuple[Path, dict[str, Path]]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built[1]["llm"])


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_manifest(built: tuple[Path, dict[str, Path]]) -> None:
    root, paths = built
    assert list(paths) == list(MODEL_SUBDIRS)
    assert all(paths[k] == root / k and paths[k].is_dir() for k in MODEL_SUBDIRS)
    manifest = json.loads((root / "tiny_models.json").read_text())
    assert set(manifest) == {"seed", "subfolders", "configs"}
    assert manifest["seed"] == 0 and manifest["subfolders"] == list(MODEL_SUBDIRS)
    assert manifest["configs"]["visual_encoder"]["patch_size"] == 14
    assert manifest["configs"]["audio_encoder"]["num_hidden_layers"] >= 3
    assert manifest["configs"]["llm"]["vocab_size"] > 256 + 9  # bytes + specials + merges
    assert manifest["configs"]["caption_tokenizer"]["vocab_size"] == 30522
    assert not list(paths["caption_tokenizer"].glob("*.safetensors"))


def test_clip_shapes(reloaded: dict) -> None:
    assert reloaded["clip_model_type"] == "clip_vision_model"
    assert reloaded["clip_pixels"] == [1, 3, 224, 224]
    assert reloaded["clip_hidden"] == [1, 257, 64]
    assert reloaded["clip_embeds"] == [1, 32]


def test_hubert_shapes(reloaded: dict) -> None:
    assert reloaded["hubert_mask"]
    assert reloaded["hubert_states"] >= 4
    assert reloaded["hubert_hidden"] == 64
    frames = reloaded["hubert_frames"]
    assert 48 <= frames["1"] <= 50 and 98 <= frames["2"] <= 100  # 320x downsampling


def test_llm_forward_and_generation_config(reloaded: dict) -> None:
    seq = reloaded["llm_ids"][1]
    assert reloaded["llm_logits"] == [1, seq, reloaded["llm_len_tok"]]
    assert reloaded["llm_gen"] == reloaded["llm_special"]


def test_whisper(reloaded: dict) -> None:
    """Whisper's 30 s of 80 mel bins; its special tokens single ids; generation ends within its budget
    (the prompt's tokens and at most 8 new ones) and decodes to text without special tokens."""
    assert reloaded["whisper_features"] == [2, 80, 3000]
    assert reloaded["whisper_specials"] == [[i] for i in reloaded["whisper_ids"]]
    assert reloaded["whisper_out"][0] == 2 and reloaded["whisper_out"][1] <= 8 + 4
    assert all(isinstance(t, str) and "<|" not in t for t in reloaded["whisper_text"])
    assert reloaded["whisper_round_trip"] == " the speaker sounds happy"


def test_caption_tokenizer(reloaded: dict) -> None:
    assert reloaded["caption_vocab"] == 30522
    assert reloaded["caption_ids"] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert reloaded["caption_long"] == 302  # no leftover 128-token truncation or padding


def test_special_tokens_single_ids_and_no_placeholders(llm_tok) -> None:
    """As Qwen's tokenizer: the chat tokens are single ids; the placeholders are not tokens yet
    (XMEIQwen adds them) and never merged from their pieces."""
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = llm_tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] == llm_tok.convert_tokens_to_ids(token), token
    assert not set(PLACEHOLDER_TOKENS) & set(llm_tok.get_vocab())
    tok = copy.deepcopy(llm_tok)
    tok.add_special_tokens({"additional_special_tokens": list(PLACEHOLDER_TOKENS)})
    prompt = "<Video>" + "<ImageHere>" * 32 + "</Video><Audio>" + "<AudioHere>" * 32 + "</Audio> The"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<ImageHere>")) == 32
    assert ids.count(tok.convert_tokens_to_ids("<AudioHere>")) == 32
    assert llm_tok.eos_token == "<|im_end|>" and llm_tok.pad_token == "<|endoftext|>"
    assert llm_tok.bos_token is None


def test_chat_template_layout(llm_tok) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert llm_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [{"role": "system", "content": "S"}, *msgs, {"role": "assistant", "content": "Yo"}]
    assert llm_tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
    )


@pytest.mark.parametrize("text", [
    "The user's emotion is happy, intent is agreeing.",
    "Ünïcødé — 日本語のテキスト, Ελληνικά, emoji 🎉👍🏽, tabs\tand\nnewlines  12345",
    "  leading spaces, <ImageHere> inline, zero\u200bwidth, RTL שלום",
])
def test_unicode_round_trip(llm_tok, text: str) -> None:
    text = unicodedata.normalize("NFC", text)  # the tokenizer NFC-normalizes, as Qwen2's does
    ids = llm_tok.encode(text, add_special_tokens=False)
    assert llm_tok.unk_token_id is None or llm_tok.unk_token_id not in ids
    assert llm_tok.decode(ids) == text


def test_determinism(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    root, _ = built
    texts = ["I can't believe it's 2024!"]
    build_tiny_models(tmp_path / "same", seed=0, texts=texts)
    assert _hashes(tmp_path / "same") == _hashes(root)
    build_tiny_models(tmp_path / "other", seed=1, texts=texts)
    a, b = _hashes(root), _hashes(tmp_path / "other")
    assert a.keys() == b.keys()
    for name in ("visual_encoder", "audio_encoder", "llm", "asr"):
        assert a[f"{name}/model.safetensors"] != b[f"{name}/model.safetensors"], name
    assert a["llm/tokenizer.json"] == b["llm/tokenizer.json"]  # tokenizers depend on texts only
    assert a["asr/tokenizer.json"] == b["asr/tokenizer.json"]


def test_auto_tokenizer_matches_saved_pipeline(built: tuple[Path, dict[str, Path]], llm_tok) -> None:
    # AutoTokenizer rebuilds the folder as Qwen2Tokenizer (its own NFC + split regex around our
    # vocab/merges); it must encode exactly like the tokenizer.json we trained.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(built[1]["llm"] / "tokenizer.json"))
    text = "Year 2024: 12345 items, 3.14 ratio — e\u0301t\u00e9 <AudioHere> it's   done\n"
    assert llm_tok.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
