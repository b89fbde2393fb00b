"""Decoding strategies over logits, independent of the model that produces them.

Legend: N rows being decoded (prompts, or prompts * K in beam search), K beams, n prompt
length, T new tokens, V vocabulary.

- logits processors, (N, V) -> (N, V): ``apply_repetition_penalty`` (CTRL / Hugging Face: the
  logit of a token already in the sequence is divided by the penalty when positive, multiplied
  by it when negative), ``apply_temperature``, ``apply_top_k``, ``apply_top_p``;
- picks, (N, V) -> (N,): ``greedy_pick`` and ``sample_pick`` (a private ``torch.Generator``: the
  global RNG is never touched);
- loops over a next-token source ``steps`` (``start(prompt) -> logits``, ``advance(tokens) ->
  logits``, ``reorder(rows)``; see ``generation.CachedSteps``): ``sample_tokens`` (greedy or
  sampled, eos handling) and ``beam_search``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------- processors


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Penalise every token of ``history`` (N, t): positive logits / penalty, negative * penalty.

    logits (N, V) -> (N, V). A token counts once however often it occurred (CTRL, Keskar et al.
    2019, as Hugging Face's ``RepetitionPenaltyLogitsProcessor``).
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)  # (N, t)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature, (N, V) -> (N, V): below 1 sharpens the distribution, above 1 flattens it.

    A temperature below the logits dtype's smallest normal number is taken as that number (in
    float32, 1e-50 would round to 0 and give 0/0 = NaN for a zero logit).
    """
    if temperature == 1.0:
        return logits
    return logits / max(temperature, torch.finfo(logits.dtype).tiny)


def apply_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """Keep the ``top_k`` largest logits per row (ties with the k-th are kept), the rest -> -inf."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float | None) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    A token is kept when the probability of the tokens ranked above it is below ``top_p``, so
    the most likely token always stays. logits (N, V) -> (N, V), removed tokens at -inf.
    """
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # (N, V): probability of the better-ranked tokens
    remove = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, mass_above >= top_p)
    return logits.masked_fill(remove, float("-inf"))


def greedy_pick(logits: Tensor) -> Tensor:
    """The most likely token per row, (N, V) -> (N,)."""
    return logits.argmax(dim=-1)


def sample_pick(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row drawn from softmax(logits) with ``generator``, (N, V) -> (N,)."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class DecodingOptions:
    """Validated decoding settings (see ``generate`` for their meaning)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def warp(self, logits: Tensor) -> Tensor:
        """Temperature, then top-k, then top-p (the sampling distribution's shape).

        Each row is first shifted by its maximum (when that is finite), which changes none of the three: then
        a tiny temperature sends the other logits to -inf instead of overflowing the largest ones to
        +inf (where sampling would meet inf - inf).
        """
        row_max = logits.max(dim=-1, keepdim=True).values  # (N, 1)
        shifted = logits - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        return apply_top_p(apply_top_k(apply_temperature(shifted, self.temperature), self.top_k), self.top_p)


# ---------------------------------------------------------------------------------------- loops


def sample_tokens(
    steps, prompt: Tensor, max_new_tokens: int, options: DecodingOptions, generator: torch.Generator | None = None
) -> Tensor:
    """Greedy or sampled continuation (N, T) of ``prompt`` (N, n); rows after their eos hold padding."""
    rows = prompt.shape[0]
    new_tokens = prompt.new_full((rows, max_new_tokens), options.pad_token_id)
    eos = torch.tensor(options.eos_token_ids, dtype=prompt.dtype, device=prompt.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=prompt.device)
    logits = steps.start(prompt)  # (N, V)
    for step in range(max_new_tokens):
        history = torch.cat([prompt, new_tokens[:, :step]], dim=1)  # (N, n + step)
        scores = apply_repetition_penalty(logits, history, options.repetition_penalty)
        token = sample_pick(options.warp(scores), generator) if options.do_sample else greedy_pick(scores)
        token = token.masked_fill(finished, options.pad_token_id)  # (N,)
        new_tokens[:, step] = token
        finished |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = steps.advance(token)
    return new_tokens


class _Hypotheses:
    """The best finished continuations of one prompt, scored sum(log p) / length ** length_penalty."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.scored: list[tuple[float, list[int]]] = []
        self.done = False

    def add(self, log_prob: float, tokens: list[int]) -> None:
        self.scored.append((log_prob / len(tokens) ** self.length_penalty, tokens))
        self.scored.sort(key=lambda item: -item[0])
        del self.scored[self.num_beams :]

    def cannot_improve(self, best_alive: float, length: int, max_new_tokens: int) -> bool:
        """True when no continuation of a live beam (log prob ``best_alive`` after ``length`` tokens)
        can beat the worst kept hypothesis: log probs only fall as tokens are added."""
        if best_alive == float("-inf"):
            return True
        if len(self.scored) < self.num_beams:
            return False
        final_length = max_new_tokens if self.length_penalty > 0 else min(length + 1, max_new_tokens)
        return best_alive / final_length**self.length_penalty <= self.scored[-1][0]


def _select_beams(top_scores, top_beams, top_tokens, generated, hypotheses, step, options, max_new_tokens):
    """Per prompt, turn the ranked candidates (N, 2K) into K live beams and finished hypotheses.

    Returns the live beams' scores (N, K), source beam (N, K) and token (N, K) as lists. An eos
    candidate ends a hypothesis only when it ranks among the K best (as Hugging Face does).
    """
    num_beams, eos, pad = options.num_beams, set(options.eos_token_ids), options.pad_token_id
    scores, sources, tokens = [], [], []
    for row, hyps in enumerate(hypotheses):
        live = []
        for rank, (score, beam, token) in enumerate(zip(top_scores[row], top_beams[row], top_tokens[row])):
            if hyps.done or len(live) == num_beams or score == float("-inf"):
                break  # sorted candidates: the rest are no better
            if token in eos:
                if rank < num_beams:
                    hyps.add(score, generated[row * num_beams + beam] + [token])
            else:
                live.append((score, beam, token))
        hyps.done = hyps.done or hyps.cannot_improve(live[0][0] if live else float("-inf"), step + 1, max_new_tokens)
        live = [] if hyps.done else live
        live += [(float("-inf"), 0, pad)] * (num_beams - len(live))
        scores.append([item[0] for item in live])
        sources.append([item[1] for item in live])
        tokens.append([item[2] for item in live])
    return scores, sources, tokens


def beam_search(steps, prompt: Tensor, max_new_tokens: int, options: DecodingOptions) -> Tensor:
    """The best of ``options.num_beams`` beams per prompt, (N, n) -> (N, T), padded after eos.

    Scores are summed log probabilities (after the repetition penalty) divided by the number of
    generated tokens ** ``length_penalty``. A prompt stops when no live beam can still beat its
    K finished hypotheses; at ``max_new_tokens`` live beams count as finished.
    """
    rows, num_beams, device = prompt.shape[0], options.num_beams, prompt.device
    first_logits = steps.start(prompt)  # (N, V)
    expand = torch.arange(rows, device=device).repeat_interleave(num_beams)  # (N * K,)
    steps.reorder(expand)
    logits, history = first_logits[expand], prompt[expand]  # (N * K, V), (N * K, n)
    vocab = logits.shape[-1]
    beam_scores = torch.full((rows, num_beams), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # one live beam at first: the K copies would give K equal beams
    hypotheses = [_Hypotheses(num_beams, options.length_penalty) for _ in range(rows)]
    generated: list[list[int]] = [[] for _ in range(rows * num_beams)]
    for step in range(max_new_tokens):
        scores = apply_repetition_penalty(logits, history, options.repetition_penalty)
        log_probs = scores.float().log_softmax(dim=-1)  # (N * K, V)
        candidates = (beam_scores.view(-1, 1) + log_probs).view(rows, num_beams * vocab)
        top_scores, top_index = candidates.topk(min(2 * num_beams, num_beams * vocab), dim=1)  # (N, 2K)
        selected = _select_beams(
            top_scores.tolist(), (top_index // vocab).tolist(), (top_index % vocab).tolist(),
            generated, hypotheses, step, options, max_new_tokens,
        )
        beam_scores = torch.tensor(selected[0], device=device)  # (N, K)
        sources = (torch.tensor(selected[1], device=device) + torch.arange(rows, device=device)[:, None] * num_beams)
        sources, tokens = sources.view(-1), torch.tensor(selected[2], device=device).view(-1)  # (N * K,)
        generated = [generated[source] + [token] for source, token in zip(sources.tolist(), tokens.tolist())]
        if all(hyps.done for hyps in hypotheses) or step + 1 == max_new_tokens:
            break
        history = torch.cat([history.index_select(0, sources), tokens[:, None]], dim=1)
        steps.reorder(sources)
        logits = steps.advance(tokens)
    return _best_hypotheses(hypotheses, beam_scores.tolist(), generated, options, max_new_tokens, prompt)


def _best_hypotheses(hypotheses, beam_scores, generated, options, max_new_tokens, prompt) -> Tensor:
    """Add the still-live beams as finished, then the best hypothesis per prompt, padded, (N, T)."""
    out = prompt.new_full((len(hypotheses), max_new_tokens), options.pad_token_id)
    for row, hyps in enumerate(hypotheses):
        for beam, score in enumerate(beam_scores[row]):
            if not hyps.done and score != float("-inf"):
                hyps.add(score, generated[row * options.num_beams + beam])
        best = hyps.scored[0][1]
        out[row, : len(best)] = torch.tensor(best, dtype=out.dtype)
    return out
