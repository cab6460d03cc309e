"""lm-evaluation-harness adapter: moetrain checkpoints as lm-eval model "moetrain" (needs the `lm-eval` extra).

lm-eval 0.4.13 finds models only in its own built-in table or through `@register_model` at import time; it
has no plugin entry points for models. Importing this module registers "moetrain", so

    moetrain lm-eval --model moetrain --model_args path=runs/default --tasks lambada_openai   # lm-eval's CLI
    python -c "import moetrain.evaluation.harness, lm_eval; lm_eval.simple_evaluate(model='moetrain', ...)"

both work; `moetrain lm-eval` is lm-eval's own command line, run after that import. `--model_args` takes
`path` (checkpoint directory) and optionally `max_gen_toks` (default 256); `--batch_size` and `--device` are
lm-eval's own flags. Scoring is `LMScorer`'s, the same code `moetrain eval` uses; generation is greedy.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401  lm-eval loads its own models only while its registry is empty
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"the lm-evaluation-harness adapter needs lm-eval ({error}); "
                      "pip install 'moetrain[lm-eval]'") from None

from moetrain.checkpoint import load_model
from moetrain.evaluation.scorer import LMScorer

DEFAULT_BATCH_SIZE = 8


@register_model("moetrain")
class MoetrainLM(LM):
    """A moetrain checkpoint behind lm-eval's three request types."""

    def __init__(self, path: str, device: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, max_gen_toks: int | str = 256) -> None:
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's CLI asks for cuda unless told otherwise
                warnings.warn(f"--device {device} is not available; evaluating on the CPU", stacklevel=2)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer, _ = load_model(path, device)
        # lm-eval's "auto" / "auto:N" probe memory limits; a fixed batch size is used instead
        size = DEFAULT_BATCH_SIZE if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        if max_batch_size is not None:
            size = min(size, int(max_batch_size))
        self.scorer = LMScorer(model, tokenizer, batch_size=size)
        self.max_gen_toks = int(max_gen_toks)
        self._device = model.lm_head.weight.device

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.scorer.progress = not disable_tqdm
        scores = self.scorer.loglikelihood([request.args for request in requests])
        results = [(score.logprob, score.is_greedy) for score in scores]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        self.scorer.progress = not disable_tqdm
        scores = self.scorer.loglikelihood_rolling([request.args[0] for request in requests])
        results = [score.logprob for score in scores]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (sampling settings in gen_kwargs are ignored), cut at the task's `until` strings."""
        self.scorer.progress = not disable_tqdm
        by_budget: dict[int, list[int]] = {}
        stops: list[list[str]] = []
        for index, request in enumerate(requests):
            gen_kwargs: dict[str, Any] = request.args[1]
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            by_budget.setdefault(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), []).append(index)
        results = [""] * len(requests)
        for budget, indices in by_budget.items():
            texts = self.scorer.generate_until([(requests[i].args[0], stops[i]) for i in indices], budget)
            for index, text in zip(indices, texts, strict=True):
                results[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results


def harness_main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (`lm-eval [run] --model moetrain ...`) with the moetrain model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0
