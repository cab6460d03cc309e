"""Zero-shot tasks from local JSONL files, one example per line, in lm-evaluation-harness's shapes.

The kind of a task is read off its fields (every line must have the same kind):

completion (LAMBADA)       {"text": "... the final word"}
    context = the text before its last space, target = " " + the final word (trailing whitespace ignored);
    acc = greedy decoding reproduces every token of the final word; ppl = exp(-mean log p(final word)).
multiple choice (PIQA, BoolQ, RACE-h)   {"context": "...", "choices": ["...", ...], "label": i}
    each choice is scored as the continuation " " + choice; acc takes the highest summed log-likelihood,
    acc_norm the highest log-likelihood per character of the choice (lm-eval's acc_norm).
short answer (TriviaQA, WebQs)   {"question": "...", "answers": ["...", ...]}
    prompt "Question: {question}\\nAnswer:", greedy generation cut at a newline, "." or ","; exact_match =
    the normalised prediction equals a normalised answer (lower case, no punctuation or articles a/an/the,
    single spaces: the SQuAD/TriviaQA normalisation).
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrain.data import DataError
from moetrain.evaluation.scorer import LMScorer

KINDS = ("completion", "choice", "generation")
HEADLINE_METRIC = {"completion": "acc", "choice": "acc", "generation": "exact_match"}
GENERATION_STOPS = ("\n", ".", ",")
_FORMATS = ('{"text": ...} (completion), {"context": ..., "choices": [...], "label": i} (multiple choice) or '
            '{"question": ..., "answers": [...]} (short answer)')


class TaskError(DataError):
    """A task file that cannot be read; the message names the file, the line and the fix."""


@dataclass
class Task:
    name: str
    path: str
    kind: str
    docs: list[dict[str, Any]]


def _kind_of(record: dict[str, Any]) -> str | None:
    if "choices" in record:
        return "choice"
    if "answers" in record:
        return "generation"
    if "text" in record:
        return "completion"
    return None


def _problem(record: dict[str, Any], kind: str) -> str | None:
    """What is wrong with one example of `kind`, or None."""
    if kind == "completion":
        text = record.get("text")
        if not isinstance(text, str) or " " not in text.strip():
            return '"text" must be a string with a final word after a space'
    elif kind == "choice":
        choices, label = record.get("choices"), record.get("label")
        if not isinstance(record.get("context"), str):
            return '"context" must be a string'
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c.strip() for c in choices):
            return '"choices" must be a list of at least two non-empty strings'
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            return f'"label" must be the index of the right choice, 0 to {len(choices) - 1}, got {label!r}'
    else:
        answers = record.get("answers")
        if not isinstance(record.get("question"), str) or not record["question"].strip():
            return '"question" must be a non-empty string'
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            return '"answers" must be a non-empty list of strings'
    return None


def read_task(name: str, path: str | Path, limit: int | None = None) -> Task:
    """Read and check a task file; `limit` keeps its first examples."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task {name}: file '{path}' not found; pass --task {name}=PATH.jsonl")
    docs: list[dict[str, Any]] = []
    kind = None
    try:
        with path.open(encoding="utf-8-sig") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                if limit is not None and len(docs) >= limit:
                    break
                where = f"task {name}: '{path}' line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise TaskError(f"{where} is not valid JSON ({error.msg}); each line needs one of "
                                    f"{_FORMATS}") from None
                line_kind = _kind_of(record) if isinstance(record, dict) else None
                if line_kind is None:
                    raise TaskError(f"{where} is none of the task formats; use {_FORMATS}")
                if kind is not None and line_kind != kind:
                    raise TaskError(f"{where} is a {line_kind} example but the file started with {kind} examples; "
                                    f"put each kind in its own file")
                problem = _problem(record, line_kind)
                if problem:
                    raise TaskError(f"{where}: {problem}")
                kind = line_kind
                docs.append(record)
    except UnicodeDecodeError as error:
        raise TaskError(f"task {name}: '{path}' is not UTF-8 ({error.reason}); re-encode it") from None
    if not docs:
        raise TaskError(f"task {name}: '{path}' has no examples; add lines like {_FORMATS}")
    return Task(name, str(path), kind, docs)


def split_last_word(text: str) -> tuple[str, str]:
    """LAMBADA's split: (text before the last space, " " + the final word)."""
    context, word = text.rstrip().rsplit(" ", 1)
    return context, " " + word


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equals, like numpy


def _completion(task: Task, scorer: LMScorer) -> dict[str, float]:
    scores = scorer.loglikelihood([split_last_word(doc["text"]) for doc in task.docs], desc=task.name)
    mean_logprob = sum(s.logprob for s in scores) / len(scores)
    return {"acc": sum(s.is_greedy for s in scores) / len(scores), "ppl": math.exp(-mean_logprob)}


def _choice(task: Task, scorer: LMScorer) -> dict[str, float]:
    requests = [(doc["context"], " " + choice) for doc in task.docs for choice in doc["choices"]]
    scores = iter(scorer.loglikelihood(requests, desc=task.name))
    correct = correct_norm = 0
    for doc in task.docs:
        logprobs = [next(scores).logprob for _ in doc["choices"]]
        correct += _argmax(logprobs) == doc["label"]
        correct_norm += _argmax([lp / len(c) for lp, c in zip(logprobs, doc["choices"], strict=True)]) == doc["label"]
    return {"acc": correct / len(task.docs), "acc_norm": correct_norm / len(task.docs)}


def _generation(task: Task, scorer: LMScorer, max_new_tokens: int) -> dict[str, float]:
    prompts = [(f"Question: {doc['question']}\nAnswer:", GENERATION_STOPS) for doc in task.docs]
    predictions = scorer.generate_until(prompts, max_new_tokens, desc=task.name)
    matches = sum(any(normalize_answer(prediction) == normalize_answer(answer) for answer in doc["answers"])
                  for prediction, doc in zip(predictions, task.docs, strict=True))
    return {"exact_match": matches / len(task.docs)}


def evaluate_task(task: Task, scorer: LMScorer, max_new_tokens: int = 32) -> dict[str, Any]:
    """The task's metrics, with the MoE drop fraction of its forwards (eval capacity factor)."""
    scorer.drop_fraction(reset=True)  # forget earlier forwards
    if task.kind == "completion":
        metrics = _completion(task, scorer)
    elif task.kind == "choice":
        metrics = _choice(task, scorer)
    else:
        metrics = _generation(task, scorer, max_new_tokens)
    return {"kind": task.kind, "path": task.path, "n": len(task.docs), **metrics,
            "drop_fraction": scorer.drop_fraction()}
