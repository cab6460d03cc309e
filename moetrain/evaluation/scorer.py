"""The three questions every evaluation asks a language model, answered in batches from token ids.

`LMScorer` serves moetrain's own task readers and the lm-evaluation-harness adapter alike:

- loglikelihood(context, continuation): log p(continuation | context) and whether greedy decoding would
  produce the continuation token by token (lm-eval's ``is_greedy``);
- loglikelihood_rolling(text): log p(text) over as many windows as it needs, each token predicted once
  (lm-eval's rolling scheme, with the windows laid back from the end so only the first is short), for
  perplexity;
- generate_until(context, stop strings): greedy generation cut at the first stop string.

Every context starts with the end-of-document token: training streams put one before each document, so
it is the model's "start of text". The model runs in eval mode, i.e. with the MoE eval capacity factor.
MoE routing may draw random numbers in eval mode too (random token selection when tokens are dropped,
top-2 second-expert sampling), so each call runs on its own RNG stream seeded with `seed`, leaving the
global one untouched: the same requests with the same batch size give the same scores. Padding is routed
like real tokens (moetrain's MoE takes no token mask), so with token dropping a score can depend on the
batch it ran in; batch size 1 gives batch-independent scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moetrain.data import DataError, Tokenizer
from moetrain.model import GPT
from moetrain.train.metrics import routing_summary


@dataclass
class Score:
    logprob: float  # summed log-probability of the scored tokens (natural log)
    is_greedy: bool  # every scored token is the argmax of its prediction
    num_tokens: int


class LMScorer:
    """Scores text with a moetrain GPT; `batch_size` sequences per forward, longest first."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, batch_size: int = 8, progress: bool = False,
                 seed: int = 1234) -> None:
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.progress, self.seed = batch_size, progress, seed
        self.max_length = model.cfg.seq_length
        self.device = next(model.parameters()).device

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield

    # -- token level ------------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "score") -> list[Score]:
        """Score each (context ids, continuation ids): the continuation's tokens given everything before them.

        The model sees the last `seq_length` tokens of context + continuation (minus the final token, which
        is only predicted); a continuation longer than `seq_length` cannot be scored in one window.
        """
        for context, continuation in pairs:
            if not continuation or not context:
                raise DataError("score_tokens needs a non-empty context and continuation (start with eos)")
            if len(continuation) > self.max_length:
                raise DataError(f"a continuation of {len(continuation)} tokens exceeds the model's seq_length "
                                f"{self.max_length}; shorten it or score it with loglikelihood_rolling")
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        scores: dict[int, Score] = {}
        with self._own_rng(), self._bar(len(pairs), desc) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                scores.update(zip(batch, self._score_batch([pairs[i] for i in batch]), strict=True))
                bar.update(len(batch))
        return [scores[index] for index in range(len(pairs))]

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
        """One forward over right-padded windows (causal attention: padding never reaches earlier positions;
        the token mask keeps it out of MoE routing)."""
        windows = [(context + continuation)[:-1][-self.max_length:] for context, continuation in pairs]
        ids = torch.full((len(pairs), max(map(len, windows))), self.tokenizer.eos_id, dtype=torch.long)
        for row, window in enumerate(windows):
            ids[row, :len(window)] = torch.tensor(window)
        # the padding stays out of MoE routing (capacity, statistics), so a window scores alike in any batch
        real = torch.arange(ids.shape[1]) < torch.tensor([len(window) for window in windows]).unsqueeze(1)
        masked = {"token_mask": real.to(self.device)} if getattr(self.model, "moe_layers", list)() else {}
        logits = self.model(ids.to(self.device), **masked).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        scores = []
        for row, (window, (_, continuation)) in enumerate(zip(windows, pairs, strict=True)):
            predicted = logprobs[row, len(window) - len(continuation):len(window)]
            targets = torch.tensor(continuation, device=predicted.device)
            scores.append(Score(float(predicted.gather(1, targets[:, None]).sum()),
                                bool((predicted.argmax(-1) == targets).all()), len(continuation)))
        return scores

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- text level ---------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[Score]:
        """log p(continuation | context) per (context, continuation); word-separating spaces belong to the
        continuation (" Paris"), as in lm-evaluation-harness."""
        pairs = []
        for context, continuation in requests:
            continuation_ids = self.tokenizer.encode(continuation)
            if not continuation_ids:
                raise DataError(f"empty continuation after context {context[-40:]!r}; every choice/target needs text")
            pairs.append(([self.tokenizer.eos_id, *self.tokenizer.encode(context)], continuation_ids))
        return self.score_tokens(pairs, desc)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "perplexity") -> list[Score]:
        """log p(text) per text: windows of seq_length predictions, laid back from the end, each token once."""
        pairs, owners = [], []
        for index, text in enumerate(texts):
            tokens = [self.tokenizer.eos_id, *self.tokenizer.encode(text)]
            for end in range(len(tokens), 1, -self.max_length):  # targets tokens[start:end], last chunk first
                start = max(1, end - self.max_length)
                context_start = max(0, end - 1 - self.max_length)
                pairs.append((tokens[context_start:start], tokens[start:end]))
                owners.append(index)
        totals = [Score(0.0, True, 0) for _ in texts]
        for owner, score in zip(owners, self.score_tokens(pairs, desc), strict=True):
            total = totals[owner]
            total.logprob += score.logprob
            total.is_greedy = total.is_greedy and score.is_greedy
            total.num_tokens += score.num_tokens
        return totals

    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, Sequence[str]]], max_new_tokens: int,
                       desc: str = "generate") -> list[str]:
        """Greedy continuation of each context, cut before the first stop string (or at eos)."""
        prompts = [[self.tokenizer.eos_id, *self.tokenizer.encode(context)][-self.max_length:]
                   for context, _ in requests]
        outputs: dict[int, str] = {}
        by_length: dict[int, list[int]] = {}  # equal-length prompts batch without padding
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        groups = [group[start:start + self.batch_size] for group in by_length.values()
                  for start in range(0, len(group), self.batch_size)]
        with self._own_rng(), self._bar(len(requests), desc) as bar:
            for group in groups:
                texts = self._generate_group([prompts[i] for i in group], [requests[i][1] for i in group],
                                             max_new_tokens)
                outputs.update(zip(group, texts, strict=True))
                bar.update(len(group))
        return [outputs[index] for index in range(len(requests))]

    def _generate_group(self, prompts: list[list[int]], stops: list[Sequence[str]], max_new_tokens: int) -> list[str]:
        """Greedy steps for prompts of one length, until every row hit a stop or the budget is spent."""
        ids = torch.tensor(prompts, device=self.device)
        texts, done = [""] * len(prompts), [False] * len(prompts)
        for _ in range(max_new_tokens):
            ids = self.model.generate(ids, 1, temperature=0.0)
            for row, prompt in enumerate(prompts):
                if not done[row]:
                    new = ids[row, len(prompt):].tolist()
                    text = self.tokenizer.decode(t for t in new if t != self.tokenizer.eos_id)
                    texts[row], done[row] = _cut(text, stops[row], new[-1] == self.tokenizer.eos_id)
            if all(done):
                break
        return texts

    def drop_fraction(self, reset: bool = True) -> float:
        """Mean fraction of routed tokens the MoE layers dropped in eval-mode forwards since the last reset."""
        stats = [moe.eval_routing_stats.summary(reset=reset) for _, moe in self.model.moe_layers()]
        return routing_summary(stats).get("drop_fraction", 0.0)


def _cut(text: str, stops: Sequence[str], ended: bool) -> tuple[str, bool]:
    """Text before the first stop string, and whether generation is finished."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    if positions:
        return text[:min(positions)], True
    return text, ended

