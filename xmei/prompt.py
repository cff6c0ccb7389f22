"""Prompts, targets and batches for XMEI-Qwen.

User message (the published wording; a model of one modality names only that one):
    <Video><ImageHere>x32</Video><Audio><AudioHere>x32</Audio> The subtitle of this video is "{subtitle}".
    Identify the speaker's emotion and intent based on the video, audio, and subtitles. Then, provide a
    reasoning explaining why they co-occur.
The delimiters <Video> ... </Audio> are plain text; only the placeholders are tokens of their own
(added by XMEIQwen when the tokenizer lacks them), whose embeddings are replaced anyway.
Assistant target:
    The user's emotion is {emotion}, intent is {intent}. The underlying reason is: {explanation}.

Text is text: the subtitle, the labels and the explanation are tokenized with the tokenizer's
special tokens split as plain text (:func:`text_ids`), so a subtitle holding ``<ImageHere>`` or
``<|im_end|>`` adds no placeholder and ends no turn. Only the fixed pieces of the prompt (the
template around the subtitle, the end token) are tokenized with their special tokens. Text free
of special tokens gives the same ids either way.

``chat`` renders the user message through the tokenizer's chat template; ``plain`` writes
``###Human: {user} ###Assistant: `` as the published code did. Labels are -100 everywhere but on
the target (and its end-of-turn token). A batch is padded to its own longest sequence.

Past ``max_length`` a sample is cut, in this order (``Encoded.truncated`` says it was):
1. the subtitle, from its end, down to nothing;
2. then the explanation, from its end: the target becomes "The user's emotion is {emotion},
   intent is {intent}. The underlying reason is: {the explanation's first tokens}" + end token.
The placeholders, the rest of the prompt, the labels' head (up to "is:") and the end token are
never cut, so the loss always covers the emotion and the intent. A sample whose fixed prompt,
head and end token alone exceed ``max_length`` cannot be made: :class:`PromptError` (the
trainer checks every label pair of the sets at start-up). A generation prompt cuts its subtitle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xmei.errors import UserError

__all__ = ["IGNORE", "PLACEHOLDER_TOKENS", "PromptBuilder", "PromptError", "answer_text", "collate", "text_ids",
           "user_text"]

IGNORE = -100
VIDEO_TOKEN, AUDIO_TOKEN = "<ImageHere>", "<AudioHere>"
PLACEHOLDER_TOKENS = (VIDEO_TOKEN, AUDIO_TOKEN)
QUESTION = (' The subtitle of this video is "{subtitle}". Identify the speaker\'s emotion and intent based on '
            "the {sources}. Then, provide a reasoning explaining why they co-occur.")
ANSWER_HEAD = "The user's emotion is {emotion}, intent is {intent}. The underlying reason is:"
ANSWER = ANSWER_HEAD + " {explanation}."
_SUBTITLE = "\x00subtitle\x00"  # a sentinel that no template or tokenizer produces


def user_text(subtitle: str, video_queries: int, audio_queries: int) -> str:
    """The user message; a modality with 0 queries is left out of it (a one-modality model)."""
    blocks = ("<Video>" + VIDEO_TOKEN * video_queries + "</Video>" if video_queries else "") + \
        ("<Audio>" + AUDIO_TOKEN * audio_queries + "</Audio>" if audio_queries else "")
    sources = {(True, True): "video, audio, and subtitles", (True, False): "video and subtitles",
               (False, True): "audio and subtitles"}[bool(video_queries), bool(audio_queries)]
    return blocks + QUESTION.format(subtitle=subtitle, sources=sources)


def answer_text(emotion: str, intent: str, explanation: str) -> str:
    return ANSWER.format(emotion=emotion, intent=intent, explanation=explanation.strip().rstrip("."))


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of user text (a subtitle, an answer, a label): special tokens written in it
    (``<ImageHere>``, ``<|im_end|>``, ``[SEP]``) are tokenized as the plain text they are."""
    # verbose=False: a text past the model's length is no mistake here (it is cut), so no warning
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


class PromptError(UserError, ValueError):
    """A max_length that cannot hold the fixed parts of a prompt or of a sample."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # the subtitle or the explanation was cut to fit max_length


class PromptBuilder:
    """Token ids of prompt + target for one sample, built from pieces so that only the subtitle
    and the explanation are ever cut: [prefix][subtitle][suffix][target][end]. 0 queries: the
    modality is not used."""

    def __init__(self, tokenizer, video_queries: int, audio_queries: int, prompt_format: str = "chat",
                 max_length: int = 1024):
        self.tokenizer, self.max_length = tokenizer, max_length
        user = user_text(_SUBTITLE, video_queries, audio_queries)
        if prompt_format == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
            end = tokenizer.eos_token  # <|im_end|> for Qwen chat models
        elif prompt_format == "plain":
            text, end = f"###Human: {user} ###Assistant: ", tokenizer.eos_token
        else:
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
        prefix, suffix = text.split(_SUBTITLE)
        self.prefix, self.suffix = self._template_ids(prefix), self._template_ids(suffix)
        self.end = self._template_ids(end) if end else []
        for token, count in ((VIDEO_TOKEN, video_queries), (AUDIO_TOKEN, audio_queries)):
            found = self.prefix.count(tokenizer.convert_tokens_to_ids(token))
            if found != count:
                raise ValueError(f"the prompt holds {found} {token} tokens, expected {count}: "
                                 f"is {token} a special token of the tokenizer?")

    def _template_ids(self, text: str) -> list[int]:
        """Ids of a fixed piece of the prompt, whose special tokens (placeholders, chat markers) are tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _ids(self, text: str) -> list[int]:
        """Ids of user text: special tokens in it are plain text (:func:`text_ids`)."""
        return text_ids(self.tokenizer, text)

    def prompt(self, subtitle: str, budget: int | None = None) -> list[int]:
        """Prompt ids for generation, the subtitle cut to fit ``budget`` tokens (default max_length)."""
        budget = self.max_length if budget is None else budget
        room = budget - len(self.prefix) - len(self.suffix)
        if room < 0:
            raise PromptError(f"max_length {self.max_length} cannot hold the prompt's "
                              f"{len(self.prefix) + len(self.suffix)} fixed tokens")
        return self.prefix + self._ids(subtitle)[:room] + self.suffix

    def required_length(self, emotion: str, intent: str) -> int:
        """The fewest tokens a sample with these labels takes: the fixed prompt, the answer's head
        (up to "is:") and the end token, the subtitle and the explanation cut away."""
        head = self._ids(ANSWER_HEAD.format(emotion=emotion, intent=intent))
        return len(self.prefix) + len(self.suffix) + len(head) + len(self.end)

    def encode(self, subtitle: str, emotion: str, intent: str, explanation: str) -> Encoded:
        """Prompt + target ids, and labels (-100 on the prompt), cut to ``max_length`` by the rule
        of the module docstring. Raises :class:`PromptError` when even the cut sample cannot fit."""
        target = self._ids(answer_text(emotion, intent, explanation))  # without the end token
        subtitle_ids = self._ids(subtitle)
        room = self.max_length - len(self.prefix) - len(self.suffix) - len(self.end)  # subtitle + target
        truncated = len(subtitle_ids) + len(target) > room
        if truncated:
            need = self.required_length(emotion, intent)
            if need > self.max_length:
                raise PromptError(f"max_length {self.max_length} cannot hold the prompt without its subtitle, the "
                                  f"answer up to its explanation (emotion {emotion[:40]!r}, intent {intent[:40]!r}) "
                                  f"and the end token: {need} tokens")
            target = target[:room]  # need <= max_length: the head is within room, only explanation tokens go
            subtitle_ids = subtitle_ids[:room - len(target)]  # nothing left of it when the target was cut
        prompt, target = self.prefix + subtitle_ids + self.suffix, target + self.end
        return Encoded(prompt + target, [IGNORE] * len(prompt) + target, truncated)


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` to the batch's longest sequence (right padding) and stack the
    rest. Each sample: input_ids, labels (lists) and feature arrays / tensors; scalars (the
    per-sample flags of :mod:`xmei.data`) become (B,) tensors."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.as_tensor(s["input_ids"])
        labels[i, :n] = torch.as_tensor(s["labels"])
        attention[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    for key in samples[0]:
        if key not in batch:  # np.stack: torch.stack of float16 arrays is ~10x slower at real feature size
            batch[key] = torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples]))
    return batch
