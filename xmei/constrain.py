"""Label-constrained answers: the emotion and intent words come only from the configured labels.

The answer's head, ``xmei.prompt.ANSWER`` up to its explanation,

    The user's emotion is {emotion}, intent is {intent}. The underlying reason is:

is tokenized whole for every (emotion, intent) pair (whole strings: no BPE boundary differs from
the training targets'), and the token sequences form a trie. While a row's generated tokens lie
inside the trie, only the trie's children of that prefix can come next; once a head is complete
the row is free: the explanation and the end-of-turn token follow as the model likes. So every
answer that gets its head out (``max_new_tokens`` at least the longest head) parses to labels of
the sets.

    constraint = LabelConstraint(tokenizer, cfg.emotions.labels, cfg.intents.labels)
    ids = model.generate(batch, config, logits_processor=LogitsProcessorList([constraint.processor()]))

``generate(inputs_embeds=...)`` hands the processor the generated tokens only (the prompt is
embeddings), but a processor also works after prompt ids: it takes the length of the ids it first
sees as where the answer starts. Rows are read afresh each step, so beam search reordering its
beams needs nothing more.

The trie also defines the label probabilities (xmei.probabilities): only its branch points, the
prefixes with more than one allowed token, carry a choice; :class:`Branches` lays them out for one
batched model pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import LogitsProcessor

from xmei.prompt import answer_text, text_ids

__all__ = ["Branches", "LabelConstraint", "LabelProcessor", "answer_head"]

_CUT = "\x00"  # a sentinel for the explanation that no label or tokenizer produces


def answer_head(emotion: str, intent: str) -> str:
    """The answer up to (not including) the explanation: it ends with "is:"."""
    text = answer_text(emotion, intent, _CUT)
    return text[:text.index(_CUT)].rstrip()


@dataclass(frozen=True)
class Branches:
    """The trie's branch points (the prefixes with more than one allowed token) as tensors for one
    model pass (xmei.probabilities): ``paths`` (N, T) are token sequences, right-padded with 0, that
    pass through every branch point (the prefixes of the branch points on no other's way); a branch
    point's next-token distribution is the model's hidden state at ``path[b]``, ``position[b]`` of
    [the prompt's last token] + that path (position = the prefix's length). ``children`` (nb, C)
    are the tokens allowed there (padded; ``valid`` (nb, C) says which are real), and ``incidence``
    (E * I, K) marks, for the head of each (emotion, intent) pair in label order, the K = valid.sum()
    (branch point, child) choices along it: log P(head) = log P(choices) @ incidence.T."""

    paths: torch.Tensor  # (N, T) long
    path: torch.Tensor  # (nb,) long
    position: torch.Tensor  # (nb,) long
    children: torch.Tensor  # (nb, C) long
    valid: torch.Tensor  # (nb, C) bool
    incidence: torch.Tensor  # (E * I, K) float


class LabelConstraint:
    """The trie of the answer heads of every (emotion, intent) pair of the label sets, as token ids."""

    def __init__(self, tokenizer, emotions: Sequence[str], intents: Sequence[str]):
        def ids(text: str) -> tuple[int, ...]:  # as the training targets are tokenized
            return tuple(text_ids(tokenizer, text))

        self.emotions, self.intents = tuple(emotions), tuple(intents)
        self.heads: dict[tuple[int, ...], tuple[str, str]] = {}  # head ids -> (emotion, intent)
        self.children: dict[tuple[int, ...], set[int]] = {}  # a prefix inside a head -> the tokens that may follow
        for emotion in emotions:
            for intent in intents:
                head = ids(answer_head(emotion, intent))
                whole = ids(answer_text(emotion, intent, "because of the face"))
                if whole[:len(head)] != head:  # the head would end inside a token the model was trained on
                    raise ValueError(f"the answer head of ({emotion!r}, {intent!r}) does not tokenize as the start "
                                     "of a whole answer; the label constraint cannot be built for this tokenizer")
                if head in self.heads:
                    raise ValueError(f"({emotion!r}, {intent!r}) and {self.heads[head]} give the same answer head")
                self.heads[head] = (emotion, intent)
                for k in range(len(head)):
                    self.children.setdefault(head[:k], set()).add(head[k])
        inner = sorted(set(self.heads) & set(self.children))
        if inner:  # a complete head must free the row, never be a step on the way to another
            raise ValueError(f"the answer head of {self.heads[inner[0]]} is the start of another pair's head")
        self.depth = max(len(h) for h in self.heads)  # tokens of the longest head
        self._allowed = {prefix: torch.tensor(sorted(tokens)) for prefix, tokens in self.children.items()}
        self._emotions: dict[tuple[int, ...], set[str]] = {}  # every prefix of a head (itself too) -> its emotions
        for head, (emotion, _) in self.heads.items():
            for k in range(len(head) + 1):
                self._emotions.setdefault(head[:k], set()).add(emotion)

    def emotion_of(self, generated: Sequence[int]) -> str | None:
        """The emotion that ``generated`` (an answer's token ids) settles on the trie: that of the
        first prefix whose heads all have one emotion; None when the answer leaves the trie (or
        ends) before one."""
        generated = list(generated)
        for k in range(min(len(generated), self.depth) + 1):
            emotions = self._emotions.get(tuple(generated[:k]))
            if emotions is None:
                return None
            if len(emotions) == 1:
                return next(iter(emotions))
        return None

    @cached_property
    def branches(self) -> Branches:
        """The branch points laid out for scoring (:class:`Branches`), built on first use."""
        points = sorted(prefix for prefix, tokens in self.children.items() if len(tokens) > 1)
        lowest = [p for p in points if not any(len(q) > len(p) and q[:len(p)] == p for q in points)]
        path = [next(j for j, q in enumerate(lowest) if q[:len(p)] == p) for p in points]
        children = [sorted(self.children[p]) for p in points]
        width, longest = max(map(len, children), default=1), max(map(len, lowest), default=0)
        choice = {(p, token): k for k, (p, token) in enumerate((p, t) for p, ts in zip(points, children) for t in ts)}
        pairs = {pair: head for head, pair in self.heads.items()}
        incidence = torch.zeros(len(self.emotions) * len(self.intents), len(choice))
        for row, pair in enumerate((e, i) for e in self.emotions for i in self.intents):
            head = pairs[pair]
            for k in range(len(head)):
                if (head[:k], head[k]) in choice:
                    incidence[row, choice[head[:k], head[k]]] = 1.0
        return Branches(
            paths=torch.tensor([list(p) + [0] * (longest - len(p)) for p in lowest], dtype=torch.long).view(-1, longest),
            path=torch.tensor(path, dtype=torch.long), position=torch.tensor([len(p) for p in points], dtype=torch.long),
            children=torch.tensor([c + [0] * (width - len(c)) for c in children], dtype=torch.long).view(-1, width),
            valid=torch.tensor([[j < len(c) for j in range(width)] for c in children], dtype=torch.bool).view(-1, width),
            incidence=incidence)

    def allowed(self, generated: Sequence[int]) -> torch.Tensor | None:
        """The token ids that may follow ``generated`` (the answer so far), or None when any may:
        after a complete head (or off the trie, which only a beam scored -inf reaches)."""
        return self._allowed.get(tuple(generated))

    def processor(self) -> "LabelProcessor":
        """A logits processor for one ``generate()`` call (it keeps where that call's answers start)."""
        return LabelProcessor(self)


class LabelProcessor(LogitsProcessor):
    """Scores of tokens off the trie set to -inf, for rows still inside an answer head."""

    def __init__(self, constraint: LabelConstraint):
        self.constraint, self.start = constraint, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` (B * beams, L): prompt ids, if any, then the answers so far; ``scores``
        (B * beams, V)."""
        if self.start is None:
            self.start = input_ids.shape[1]  # the first call: nothing generated yet
        generated = input_ids[:, self.start:]  # (B * beams, T)
        if generated.shape[1] >= self.constraint.depth:  # every head is complete
            return scores
        keep = torch.ones(scores.shape, dtype=torch.bool)  # (B * beams, V), built on the CPU, moved once
        for row, answer in enumerate(generated.tolist()):
            allowed = self.constraint.allowed(answer)
            if allowed is not None:
                keep[row] = False
                keep[row, allowed] = True
        return scores.masked_fill(~keep.to(scores.device), -float("inf"))
