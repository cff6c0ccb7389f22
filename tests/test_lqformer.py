"""The LQ-Former's initialization, its caption table from a real (tiny) BERT folder, and the
learned context of absent samples."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from xmei.lqformer import LQFormer, LQFormerConfig


def lqformer(mode: str = "language", hidden: int = 32, feature: int = 48, vocab: int = 300, **kw) -> LQFormer:
    torch.manual_seed(0)
    config = LQFormerConfig(feature_size=feature, num_positions=8, caption_vocab_size=vocab, query_mode=mode,
                            hidden_size=hidden, num_heads=4, intermediate_size=2 * hidden, dropout=0.0, **kw)
    return LQFormer(config).eval()


def captions(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 300, (b, 16), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones(b, 16, dtype=torch.long)


# ----------------------------------------------------------------------------- initialization

def assert_normal(name: str, values: torch.Tensor, std: float = 0.02) -> None:
    """Mean 0 and std ``std`` within 5 standard errors: PyTorch's defaults (Embedding N(0, 1),
    Linear kaiming-uniform, std 1/sqrt(3 fan_in)) are far outside."""
    values = values.detach().flatten().double()
    n = values.numel()
    assert abs(values.mean().item()) < 5 * std / math.sqrt(n), f"{name}: mean {values.mean().item():.4g}"
    assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * n), f"{name}: std {values.std().item():.4g}"


def test_initialization_is_bert_s():
    model = lqformer(hidden=256, feature=128, vocab=1000)
    linear = embedding = norms = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            assert_normal(f"{name}.weight", module.weight)
        if isinstance(module, nn.Linear):
            assert not module.bias.any(), f"{name}.bias"
            linear += 1
        elif isinstance(module, nn.Embedding):
            embedding += 1
        elif isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any(), name
            norms += 1
    assert (linear, embedding, norms) == (2 * (4 + 4 + 2) + 1, 3, 2 * 3 + 2)  # 2 layers; words, positions, frames
    assert_normal("query_tokens", model.query_tokens)
    assert_normal("absent", model.absent)
    assert torch.equal(model.feature_mean, torch.zeros(128)) and torch.equal(model.feature_std, torch.ones(128))
    wide = lqformer(hidden=256, feature=128, vocab=1000, initializer_range=0.05)
    assert_normal("word_embeddings.weight", wide.word_embeddings.weight, std=0.05)


def test_state_dict_keys_of_earlier_checkpoints_are_kept():
    keys = set(lqformer().state_dict())
    earlier = {"word_embeddings.weight", "position_embeddings.weight", "query_tokens", "embed_norm.weight",
               "feature_mean", "feature_std", "feature_norm.weight", "feature_positions.weight",
               "layers.0.self_attn.q_proj.weight", "layers.0.cross_attn.k_proj.weight", "layers.1.fc2.bias",
               "layers.1.mlp_norm.weight", "output_proj.weight"}
    assert earlier <= keys
    assert {k.split(".")[0] for k in keys} - {k.split(".")[0] for k in earlier} == {"absent"}  # the one new


# ----------------------------------------------------------------------------- caption table from BERT

@pytest.fixture
def bert(tmp_path):
    """A real BERT checkpoint folder, 300 tokens by 32 wide."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    folder = tmp_path / "bert"
    BertModel(config).save_pretrained(folder)
    return folder, BertModel.from_pretrained(folder).get_input_embeddings().weight.detach()


def test_caption_table_loads_from_a_bert_folder(bert):
    folder, words = bert
    model = lqformer()
    model.load_caption_embeddings(folder)
    torch.testing.assert_close(model.word_embeddings.weight, words, rtol=0, atol=0)
    ids, mask = captions(2)
    assert model(torch.randn(2, 8, 48), ids, mask).last_hidden_state.shape == (2, 32, 32)


def test_caption_table_refuses_a_bert_that_does_not_fit(bert):
    folder, _ = bert
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}: word embeddings 32 wide.*LQ-Former is 64 wide.*qformer_hidden_size to 32"):
        lqformer(hidden=64).load_caption_embeddings(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}.*300 tokens.*has 500"):
        lqformer(vocab=500).load_caption_embeddings(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}.*'learned' has no caption word table"):
        lqformer("learned").load_caption_embeddings(folder)


# ----------------------------------------------------------------------------- absent samples

@pytest.mark.parametrize("shape", [(3, 8, 5, 48), (3, 8, 48)], ids=["patch", "pooled-or-audio"])
def test_an_absent_sample_sees_the_learned_context_whatever_its_features(shape):
    model = lqformer()
    model.set_feature_statistics(torch.randn(48), torch.rand(48) + 0.5)
    ids, mask = captions(3)
    features = torch.randn(shape)
    present = torch.tensor([1, 0, 1])  # 0/1 as the store's has_audio
    base = model(features, ids, mask).last_hidden_state
    out = model(features, ids, mask, present=present).last_hidden_state
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]], rtol=0, atol=0)  # the present ones unchanged
    assert not torch.allclose(out[1], base[1])
    garbage = features.clone()
    garbage[1] = torch.randn(shape[1:]) * 100
    zeros = features.clone()
    zeros[1] = 0
    for other in (garbage, zeros):
        torch.testing.assert_close(model(other, ids, mask, present=present.bool()).last_hidden_state, out,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"present of shape \(3, 1\), expected \(3,\)"):
        model(features, ids, mask, present=present[:, None])


def test_absent_learns_only_from_absent_samples():
    model = lqformer()
    ids, mask = captions(2)
    features = torch.randn(2, 8, 48)
    model(features, ids, mask).last_hidden_state.sum().backward()
    assert model.absent.grad is not None and not model.absent.grad.any()  # in the graph, as DDP wants
    model.zero_grad()
    out = model(features, ids, mask, present=torch.tensor([True, False])).last_hidden_state
    out[0].sum().backward()  # the present sample's output only
    assert not model.absent.grad.any()
    model.zero_grad()
    out = model(features, ids, mask, present=torch.tensor([True, False])).last_hidden_state
    out[1].sum().backward()
    assert model.absent.grad.abs().sum() > 0
