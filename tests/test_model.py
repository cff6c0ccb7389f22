"""The LQ-Former and XMEI-Qwen on the tiny models; no feature store needed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xmei.config import load_config
from xmei.lqformer import LQFormer, LQFormerConfig
from xmei.model import XMEIQwen, XMEISettings
from xmei.prompt import IGNORE, PromptBuilder, answer_text, collate

ROOT = Path(__file__).resolve().parents[1]
FEATURES = dict(visual_size=64, audio_size=48, num_frames=8, num_audio_clips=8, caption_vocab_size=300,
                caption_tokens=16)


def lqformer(mode: str = "language", feature_size: int = 64, **kw) -> LQFormer:
    torch.manual_seed(0)
    config = LQFormerConfig(feature_size=feature_size, num_positions=8, caption_vocab_size=300, query_mode=mode,
                            hidden_size=32, num_heads=4, intermediate_size=64, **kw)
    return LQFormer(config).eval()


def captions(b: int = 2, real: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 300, (b, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(b, 16, dtype=torch.long)
    mask[:, :real] = 1
    return ids, mask


@pytest.mark.parametrize("shape", [(2, 8, 257, 64), (2, 8, 64)], ids=["patch", "pooled-or-audio"])
def test_lqformer_shapes_and_attention_weights(shape):
    model = lqformer()
    ids, mask = captions()
    out = model(torch.randn(shape), ids, mask, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 32, 32)
    tokens = shape[1] * (shape[2] if len(shape) == 4 else 1)
    assert len(out.cross_attentions) == 2  # cross-attention in every layer
    for weights in out.cross_attentions:
        assert weights.shape == (2, 4, 32, tokens)  # (batch, heads, queries, feature tokens)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 32))
    plain = model(torch.randn(shape), ids, mask)
    assert plain.cross_attentions is None


def test_a_padded_caption_token_changes_nothing():
    model = lqformer()
    features = torch.randn(2, 8, 64)
    ids, mask = captions(real=10)
    base = model(features, ids, mask).last_hidden_state
    other = ids.clone()
    other[:, 12] = 7  # under the mask
    torch.testing.assert_close(model(features, other, mask).last_hidden_state, base, rtol=0, atol=0)
    other[:, 3] = 7  # a real caption token
    assert not torch.allclose(model(features, other, mask).last_hidden_state, base)


def test_learned_query_mode_ignores_captions_and_has_no_caption_table():
    model = lqformer("learned")
    assert not hasattr(model, "word_embeddings") and model.query_tokens.shape == (1, 32, 32)
    features = torch.randn(2, 8, 64)
    ids, mask = captions()
    base = model(features, ids, mask).last_hidden_state
    torch.testing.assert_close(model(features, torch.zeros_like(ids), mask).last_hidden_state, base)
    assert lqformer("language").query_tokens.shape == (1, 16, 32)  # 16 caption + 16 learned queries


def test_frame_positions_are_added_to_the_features():
    model = lqformer()
    features = torch.randn(1, 8, 64)
    ids, mask = captions(1)
    base = model(features, ids, mask).last_hidden_state
    swapped = features[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    assert not torch.allclose(model(swapped, ids, mask).last_hidden_state, base)  # order matters
    with pytest.raises(ValueError, match=r"expected \(B, 8, \[tokens,\] 64\)"):
        model(torch.randn(1, 8, 32), ids, mask)


# ----------------------------------------------------------------------------- XMEI-Qwen

def settings(tiny_models: Path, *sets: str) -> XMEISettings:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", list(sets), models_dir=tiny_models)
    return XMEISettings.from_config(cfg, **FEATURES)


def make_model(tiny_models: Path, *sets: str) -> XMEIQwen:
    torch.manual_seed(0)
    return XMEIQwen(settings(tiny_models, *sets))


def make_batch(model: XMEIQwen, n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    builder = model.prompt_builder()
    labels = [("happy", "questioning"), ("sad", "consoling"), ("anger", "neutral"), ("fear", "wishing")]
    samples = []
    for i in range(n):
        emotion, intent = labels[i % 4]
        enc = builder.encode("word " * (i + 1), emotion, intent, f"the {emotion} face and a {intent} voice.")
        ids = torch.randint(1, 300, (2, 16), generator=g)
        samples.append(dict(input_ids=enc.input_ids, labels=enc.labels,
                            video=torch.randn(8, 257, 64, generator=g) + i, audio=torch.randn(8, 48, generator=g) - i,
                            video_caption_ids=ids[0], video_caption_mask=torch.ones(16, dtype=torch.long),
                            audio_caption_ids=ids[1], audio_caption_mask=torch.ones(16, dtype=torch.long)))
    return collate(samples, model.tokenizer.pad_token_id)


def test_prompt_labels_and_batch_padding(tiny_models):
    model = make_model(tiny_models)
    tok = model.tokenizer
    batch = make_batch(model)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max() < 1024 and len(set(lengths.tolist())) > 1  # own longest
    for i in range(4):
        target = batch["labels"][i][batch["labels"][i] != IGNORE]
        emotion = ["happy", "sad", "anger", "fear"][i]
        assert tok.decode(target).startswith(f"The user's emotion is {emotion}, intent is ")
        assert tok.decode(target).endswith(".<|im_end|>")
        n = int(lengths[i])
        assert (batch["labels"][i][n:] == IGNORE).all() and (batch["input_ids"][i][n:] == tok.pad_token_id).all()
    text = tok.decode(batch["input_ids"][0][: int(lengths[0])])
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n<Video>" in text
    assert 'The subtitle of this video is "word "' in text and "<|im_start|>assistant\n" in text
    plain = PromptBuilder(tok, 32, 32, "plain")
    assert tok.decode(plain.prompt("hi")).startswith("###Human: <Video>")
    assert tok.decode(plain.prompt("hi")).endswith("###Assistant: ")
    assert answer_text("sad", "consoling", "it hurts.") == \
        "The user's emotion is sad, intent is consoling. The underlying reason is: it hurts."


def test_truncation_cuts_only_the_subtitle(tiny_models):
    model = make_model(tiny_models)
    tok = model.tokenizer
    full = PromptBuilder(tok, 32, 32).encode("short", "happy", "agreeing", "because.")
    cut = PromptBuilder(tok, 32, 32, max_length=len(full.input_ids) + 5)
    enc = cut.encode("a very long subtitle " * 40, "happy", "agreeing", "because.")
    assert len(enc.input_ids) == len(full.input_ids) + 5
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<ImageHere>")) == 32
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<AudioHere>")) == 32
    assert [x for x in enc.labels if x != IGNORE] == [x for x in full.labels if x != IGNORE]  # target intact
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        PromptBuilder(tok, 32, 32, max_length=50).encode("x", "happy", "agreeing", "because.")


def test_features_land_exactly_at_the_placeholders(tiny_models):
    model = make_model(tiny_models).eval()
    batch = make_batch(model, 2)
    with torch.no_grad():
        embeds = model.embed(batch)
        tokens, _ = model.modality_tokens(batch)
        table = model.llm.get_input_embeddings()(batch["input_ids"])
    for m in ("video", "audio"):
        where = batch["input_ids"] == model.placeholder_ids[m]
        for i in range(2):
            torch.testing.assert_close(embeds[i][where[i]], tokens[m][i], rtol=0, atol=0)
    ids = batch["input_ids"]
    other = ~((ids == model.placeholder_ids["video"]) | (ids == model.placeholder_ids["audio"]))
    torch.testing.assert_close(embeds[other], table[other], rtol=0, atol=0)
    broken = dict(batch, input_ids=batch["input_ids"].clone())
    broken["input_ids"][0, (batch["input_ids"][0] == model.placeholder_ids["video"]).nonzero()[0]] = 5
    with pytest.raises(ValueError, match=r"exactly 32 video placeholder tokens, found \[31, 32\]"):
        model.embed(broken)


def trainable_names(model: XMEIQwen) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_lqformers_projections_and_lora_train(tiny_models):
    model = make_model(tiny_models, "model.lora_modules_to_save=[]")
    names = trainable_names(model)
    llm_names = {n for n in names if n.startswith("llm.")}
    assert llm_names and all("lora_A" in n or "lora_B" in n for n in llm_names)
    others = {n.split(".")[0] for n in names - llm_names}
    assert others == {"video_lqformer", "audio_lqformer", "video_proj", "audio_proj"}
    expected = sum(p.numel() for m in model.trainable_modules().values() for p in m.parameters()) + \
        sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(make_batch(model)).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)

    frozen_llm = make_model(tiny_models, "model.frozen_llm=true")
    assert not any(n.startswith("llm.") for n in trainable_names(frozen_llm))
    assert not any("lora" in n for n, _ in frozen_llm.named_parameters())
    with_head = make_model(tiny_models)  # the tiny config also trains lm_head (modules_to_save)
    assert any("lm_head" in n and "modules_to_save" in n for n in trainable_names(with_head))


def test_loss_falls_on_a_handful_of_samples(tiny_models):
    model = make_model(tiny_models).train()
    batch = make_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(25):
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_restores_identical_logits_without_unpickling(tiny_models, tmp_path, monkeypatch):
    model = make_model(tiny_models).train()
    batch = make_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move away from the init, so a failed restore cannot pass
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_checkpoint(tmp_path / "ckpt", config={"run": {"seed": 1}})
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert {"trainable.safetensors", "xmei_model.json", "config.yaml", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)

    def no_pickles(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled")

    monkeypatch.setattr(torch, "load", no_pickles)
    restored = XMEIQwen.from_checkpoint(tmp_path / "ckpt").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch).logits, model(batch).logits, rtol=0, atol=0)
    assert restored.settings == model.settings


def test_only_the_placeholders_are_added_and_a_full_vocabulary_grows_by_zero_rows(tiny_models):
    """The tiny LLM's vocabulary is full, as an LLM without spare rows: the two placeholders get
    new rows, zero in and out (the logits test above reloads them identically); the delimiters
    stay plain text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "llm")
    rows = AutoModelForCausalLM.from_pretrained(tiny_models / "llm").get_input_embeddings().num_embeddings
    assert rows == len(tok) and "<ImageHere>" not in tok.get_vocab()
    model = make_model(tiny_models, "model.lora_modules_to_save=[]")
    assert len(model.tokenizer) == rows + 2
    llm = model.llm.get_base_model()
    assert llm.get_input_embeddings().num_embeddings == rows + 2
    assert not llm.get_input_embeddings().weight[rows:].any() and not llm.get_output_embeddings().weight[rows:].any()
    assert len(model.tokenizer.encode("<Video>", add_special_tokens=False)) > 1  # plain text


@pytest.mark.parametrize("modalities", [["video"], ["audio"]])
def test_one_modality_models_build_prompt_and_save_only_theirs(tiny_models, tmp_path, modalities):
    model = make_model(tiny_models, f"model.modalities={modalities}").eval()
    (used,), (other,) = modalities, {"video", "audio"} - set(modalities)
    assert set(model.trainable_modules()) == {f"{used}_lqformer", f"{used}_proj"}
    assert not hasattr(model, f"{other}_lqformer")
    batch = make_batch(model, 2)
    for key in (other, f"{other}_caption_ids", f"{other}_caption_mask"):
        del batch[key]  # a store without the other modality's features
    text = model.tokenizer.decode(batch["input_ids"][0])
    assert ("<Audio>" in text) == (used == "audio") and ("<Video>" in text) == (used == "video")
    assert f"based on the {used} and subtitles" in text
    assert (batch["input_ids"] == model.placeholder_ids[used]).sum(1).tolist() == [32, 32]
    with torch.no_grad():
        logits = model(batch).logits
    model.save_checkpoint(tmp_path / "ckpt")
    restored = XMEIQwen.from_checkpoint(tmp_path / "ckpt").eval()
    assert restored.settings.modalities == (used,)
    with torch.no_grad():
        torch.testing.assert_close(restored(batch).logits, logits, rtol=0, atol=0)


def test_a_checkpoint_of_an_earlier_layout_is_refused(tiny_models, tmp_path):
    import json

    model = make_model(tiny_models)
    model.save_checkpoint(tmp_path / "ckpt")
    flat = {**json.loads((tmp_path / "ckpt" / "xmei_model.json").read_text())["features"], "llm_path": "x"}
    (tmp_path / "ckpt" / "xmei_model.json").write_text(json.dumps(flat))
    with pytest.raises(ValueError, match="model settings of an earlier xmei"):
        XMEIQwen.from_checkpoint(tmp_path / "ckpt")


def test_a_checkpoint_from_before_compute_dtypes_were_kept_loads(tiny_models, tmp_path):
    import json

    model = make_model(tiny_models)
    model.save_checkpoint(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "xmei_model.json").read_text())
    assert saved["features"].pop("compute_dtype") is None  # make_model's facts name no store
    (tmp_path / "ckpt" / "xmei_model.json").write_text(json.dumps(saved))
    assert XMEIQwen.from_checkpoint(tmp_path / "ckpt").settings.features.compute_dtype is None


def test_every_model_key_reaches_the_settings(tiny_models):
    """One definition: the model section is the settings' own, so a key set in the config is the
    key the model reads (no filtered, renamed copy)."""
    from xmei.config import ModelConfig

    s = settings(tiny_models, "model.qformer_num_layers=3", "model.caption_dropout=0.3")
    assert list(type(s.model).model_fields) == list(ModelConfig.model_fields)
    assert s.model.qformer_num_layers == 3 and s.model.caption_dropout == 0.3
    assert s.lqformer("video").num_layers == 3


def test_query_mode_switch_and_gradient_checkpointing(tiny_models):
    learned = make_model(tiny_models, "model.query_mode=learned")
    assert not hasattr(learned.video_lqformer, "word_embeddings")
    assert torch.isfinite(learned(make_batch(learned)).loss)
    sets = ("model.qformer_dropout=0.0", "model.lora_dropout=0.0")
    plain, checkpointed = make_model(tiny_models, *sets), make_model(tiny_models, *sets, "model.gradient_checkpointing=true")
    assert checkpointed.video_lqformer.gradient_checkpointing and checkpointed.llm.is_activation_checkpointing
    losses = []
    for model in (plain.train(), checkpointed.train()):
        loss = model(make_batch(model)).loss
        loss.backward()
        losses.append((loss.item(), model.video_proj.weight.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-4, atol=1e-6)
