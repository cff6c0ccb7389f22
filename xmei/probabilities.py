"""Label probabilities: the constrained decoder's own distribution over the label trie (xmei.constrain).

P(head h) is the product, along h's tokens, of the model's next-token probability renormalized
over the tokens the trie allows at that point. Where one token is allowed the factor is 1, so
only the trie's branch points count. Then

    P(emotion e)          = sum of P(h) over e's heads: the product along the head up to where e's
                            heads part from every other emotion's (what follows sums to 1)
    P(intent i | answer)  = P(head (e, i)) / P(e), for e the emotion of the answer's own tokens
                            (the most probable emotion when the answer settles on none of the trie)

each summing to 1 over its label set (the config's labels, whether the answer was decoded under
the constraint or freely; beam search or not: the probabilities are of the answer's context, not
of the search). Greedy constrained decoding picks, at each branch point, its most probable token:
where the trie parts each label set at one token (one branch point for the emotions and one per
emotion for the intents, as for the default labels on the tiny tokenizer) the top labels are the
greedy answer's; where labels share their first tokens the top label (a sum over
paths) may differ from the greedy one.

One extra pass per batch, beside generation, on the model's device in its autocast, no gradients:

    prompt embeddings (B, L) --decoder, KV cache--> hidden (B, H) at the prompt's last token
    cache repeated per path (B * N, L) + the N trie paths (B * N, T), teacher-forced --> (B * N, T, H)
    the hidden states at the nb branch points (B, nb, H) --lm_head--> logits (B, nb, V)
    --fp32 log-softmax over the allowed tokens--> (B, K) choices --incidence--> log P(head) (B, E, I)

N is small (7 for the default labels: one path per emotion's intent branch point, each through
the emotions' branch point) and the logits are taken at the nb branch points only, never over
every position, so this scales to a 7B model's 152k-token vocabulary. Positions follow the
attention mask (prompts are left-padded), as ``generate``'s do, so a clip's probabilities do not
depend on the batch it is in.
"""
from __future__ import annotations

import torch

from xmei.constrain import LabelConstraint

__all__ = ["head_log_probs", "label_probabilities"]

Probabilities = tuple[dict[str, float], dict[str, float]]  # (emotion_probs, intent_probs), in label order


def _parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The LLM's decoder (embeddings + layers + final norm; LoRA layers in place) and its lm_head."""
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm  # under peft
    return llm.get_decoder(), llm.get_output_embeddings()


@torch.no_grad()
def head_log_probs(model, batch: dict[str, torch.Tensor], constraint: LabelConstraint) -> torch.Tensor:
    """log P(head) (B, E, I) of every (emotion, intent) pair of ``constraint``'s labels after each
    prompt of ``batch`` (left-padded prompt ids, mask and features, on the model's device), in fp32."""
    branches = constraint.branches
    mask = batch["attention_mask"]  # (B, L)
    count, device = mask.shape[0], mask.device
    if not len(branches.paths):  # one emotion and one intent: nothing to choose
        return torch.zeros(count, len(constraint.emotions), len(constraint.intents), device=device)
    decoder, lm_head = _parts(model)
    n, t = branches.paths.shape
    with model.autocast():
        prompt = decoder(inputs_embeds=model.embed(batch), attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        cache = prompt.cache
        cache.batch_repeat_interleave(n)  # clip b's cache at rows b * n ... b * n + n - 1
        ids = branches.paths.to(device).repeat(count, 1)  # (B * n, T), in the same row order
        positions = mask.sum(1).repeat_interleave(n)[:, None] + torch.arange(t, device=device)  # (B * n, T)
        paths = decoder(input_ids=ids, attention_mask=torch.cat([mask.repeat_interleave(n, 0), torch.ones_like(ids)], 1),
                        position_ids=positions, cache=cache).last_hidden_state  # (B * n, T, H)
        last = prompt.last_hidden_state[:, -1:].repeat_interleave(n, 0)  # (B * n, 1, H): left padding ends every prompt
        hidden = torch.cat([last, paths], 1).view(count, n, t + 1, -1)  # (B, n, T + 1, H)
        at = hidden[:, branches.path.to(device), branches.position.to(device)]  # (B, nb, H)
        logits = lm_head(at).float()  # (B, nb, V)
    children = branches.children.to(device)  # (nb, C)
    chosen = logits.gather(2, children.expand(count, -1, -1))  # (B, nb, C)
    chosen = chosen.masked_fill(~branches.valid.to(device), -float("inf")).log_softmax(-1)
    choices = chosen[:, branches.valid.to(device)]  # (B, K): log P(child | branch point), renormalized
    return (choices @ branches.incidence.to(device).T).view(count, len(constraint.emotions), len(constraint.intents))


def label_probabilities(model, batch: dict[str, torch.Tensor], generated: torch.Tensor,
                        constraint: LabelConstraint) -> list[Probabilities]:
    """Each clip's ({emotion: P}, {intent: P}) over ``constraint``'s labels, the intents in the
    context of the emotion that its answer ``generated`` (B, new tokens) settles on (else the most
    probable one). ``batch`` on the model's device, as for generation."""
    joint = head_log_probs(model, batch, constraint).cpu()  # (B, E, I)
    emotion = joint.logsumexp(2)  # (B, E): log P(e), summed over e's heads
    out = []
    for row, ids in enumerate(generated.tolist()):
        said = constraint.emotion_of(ids)
        context = constraint.emotions.index(said) if said is not None else int(emotion[row].argmax())
        out.append((dict(zip(constraint.emotions, emotion[row].softmax(0).tolist())),
                    dict(zip(constraint.intents, joint[row, context].softmax(0).tolist()))))
    return out
