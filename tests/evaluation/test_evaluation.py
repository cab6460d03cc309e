"""Evaluation: the scorer and each task format against hand-worked examples on a bigram stub, rolling windows,
batching, task-file errors, `moetrain eval` end to end, and the lm-evaluation-harness adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.cli import main
from moetrain.config import ModelConfig, MoEConfig
from moetrain.data import build_tokenizer
from moetrain.evaluation import LMScorer, TaskError, evaluate_task, normalize_answer, read_task
from moetrain.model import GPT, ModelOutput
from moetrain.train.trainer import Trainer
from tests.helpers import FIXTURES, tiny_config

SAMPLE_TASKS = {"lambada": "completion", "piqa": "choice", "boolq": "choice", "race_h": "choice",
                "triviaqa": "generation", "webqs": "generation"}
LN2 = math.log(2)
EOS = 256


class Bigram(GPT):
    """logits = table[previous token]: every probability is one softmax row, easy to work out by hand.

    A row with one entry set to ln 256 gives that byte probability 256 / (256 + 256) = 1/2 and every other
    id 1/512 (the byte vocabulary has 257 ids); rows left at zero are uniform.
    """

    def __init__(self, transitions: dict[int | str, int | str], seq_length: int = 64) -> None:
        super().__init__(ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=1, seq_length=seq_length,
                                     vocab_size=257), MoEConfig(num_experts=[1]))
        table = torch.zeros(257, 257)
        for previous, following in transitions.items():
            table[_id(previous), _id(following)] = math.log(256)
        self.table = table

    def forward(self, input_ids, targets=None) -> ModelOutput:
        logits = self.table[input_ids]
        zero = logits.new_zeros(())
        return ModelOutput(logits, None, None, zero, zero)


def _id(symbol: int | str) -> int:
    return symbol if isinstance(symbol, int) else ord(symbol)


def scorer_for(transitions, **kwargs) -> LMScorer:
    return LMScorer(Bigram(transitions, **kwargs), build_tokenizer("byte"), batch_size=3)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_completion_accuracy_and_final_word_perplexity_by_hand(tmp_path):
    scorer = scorer_for({"c": " ", " ": "a", "a": "b"})
    task = read_task("toy", write_jsonl(tmp_path / "t.jsonl", [{"text": "c ab"}, {"text": "c ax\n"}]))
    assert task.kind == "completion"
    # " ab" after "c": p(' '|c) p(a|' ') p(b|a) = 1/8, all greedy; " ax": 1/2 * 1/2 * 1/512 = 2^-11, 'x' not greedy
    scores = scorer.loglikelihood([("c", " ab"), ("c", " ax")])
    assert scores[0].logprob == pytest.approx(-3 * LN2, abs=1e-5) and scores[0].is_greedy
    assert scores[1].logprob == pytest.approx(-11 * LN2, abs=1e-5) and not scores[1].is_greedy
    result = evaluate_task(task, scorer)
    assert result["acc"] == 0.5
    assert result["ppl"] == pytest.approx(2 ** 7, rel=1e-5)  # exp(-(mean of -3 ln 2 and -11 ln 2))
    assert result["n"] == 2 and result["drop_fraction"] == 0.0


def test_multiple_choice_summed_and_length_normalised_by_hand(tmp_path):
    scorer = scorer_for({"c": " ", " ": "a", "a": "b", "b": "a"})
    task = read_task("toy", write_jsonl(tmp_path / "t.jsonl", [
        # " abab": 2^-5 (per character of "abab": -5/4 ln 2); " a": 2^-2 (per character -2 ln 2)
        {"context": "c", "choices": ["abab", "a"], "label": 0},
        # " x": 1/2 * 1/512 = 2^-10; " a": 2^-2
        {"context": "c", "choices": ["x", "a"], "label": 1},
    ]))
    assert task.kind == "choice"
    assert scorer.loglikelihood([("c", " abab")])[0].logprob == pytest.approx(-5 * LN2, abs=1e-5)
    result = evaluate_task(task, scorer)
    assert result["acc"] == 0.5  # the sum prefers the short " a" in the first example
    assert result["acc_norm"] == 1.0  # per character, "abab" wins


def test_short_answer_exact_match_by_hand(tmp_path):
    scorer = scorer_for({":": " ", " ": "4", "4": "2", "2": "."})
    task = read_task("toy", write_jsonl(tmp_path / "t.jsonl", [
        {"question": "What is six times seven?", "answers": ["The 42!"]},
        {"question": "What is six times eight?", "answers": ["48"]},
    ]))
    assert task.kind == "generation"
    # "Question: ...\nAnswer:" ends in ':' -> greedy " 42." -> cut at "." -> " 42"
    assert scorer.generate_until([("Answer:", [".", "\n"])], max_new_tokens=10) == [" 42"]
    assert evaluate_task(task, scorer)["exact_match"] == 0.5


def test_generation_stops_at_eos_and_at_the_token_budget():
    scorer = scorer_for({":": " ", " ": "4", "4": "2", "2": EOS})
    assert scorer.generate_until([("A:", ["\n"]), ("B:", ["\n"])], max_new_tokens=10) == [" 42", " 42"]
    assert scorer.generate_until([("A:", ["\n"])], max_new_tokens=2) == [" 4"]


def test_normalize_answer():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theory") == "theory"


def test_rolling_loglikelihood_predicts_every_token_once_across_windows():
    scorer = scorer_for({"a": "b", "b": "c", "c": "a"}, seq_length=4)
    text = "abcabcabcx"
    table = scorer.model.table
    ids = [EOS, *text.encode()]
    expected = sum(float(torch.log_softmax(table[ids[i - 1]], -1)[ids[i]]) for i in range(1, len(ids)))
    score = scorer.loglikelihood_rolling([text, "ab"])[0]
    assert score.num_tokens == len(text)
    assert score.logprob == pytest.approx(expected, abs=1e-4)
    assert not score.is_greedy  # 'x' after 'c'


def test_scores_match_the_model_loss_and_do_not_depend_on_batching():
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=257),
                MoEConfig(num_experts=[1])).eval()
    tokenizer = build_tokenizer("byte")
    text = "def f(x): return x"
    ids = torch.tensor([[EOS, *text.encode()]])
    with torch.no_grad():
        lm_loss = float(model(ids[:, :-1], ids[:, 1:]).lm_loss)
    rolling = LMScorer(model, tokenizer).loglikelihood_rolling([text])[0]
    assert rolling.logprob == pytest.approx(-lm_loss * len(text), rel=1e-5)
    requests = [("def f(x):", " return x"), ("a", " b"), ("import os\nprint(os", ".sep)"), ("x = 1", "\n")]
    one = LMScorer(model, tokenizer, batch_size=1).loglikelihood(requests)
    many = LMScorer(model, tokenizer, batch_size=4).loglikelihood(requests)
    for a, b in zip(one, many, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.is_greedy == b.is_greedy


def test_sample_task_files_parse():
    for name, kind in SAMPLE_TASKS.items():
        task = read_task(name, FIXTURES / f"{name}.jsonl")
        assert task.kind == kind and len(task.docs) >= 8
    assert len(read_task("piqa", FIXTURES / "piqa.jsonl", limit=3).docs) == 3


@pytest.mark.parametrize("rows, needle", [
    (['{"text": "a b"}', '{"text": "broken'], "line 2 is not valid JSON"),
    ([{"text": "a b"}, {"question": "q", "answers": ["a"]}], "its own file"),
    ([{"context": "c", "choices": ["a", "b"], "label": 2}], '"label" must be the index'),
    ([{"context": "c", "choices": ["a"], "label": 0}], "at least two"),
    ([{"text": "oneword"}], "final word"),
    ([{"question": "q", "answers": []}], '"answers"'),
    ([{"prompt": "q"}], "none of the task formats"),
    ([], "has no examples"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match="bad.jsonl") as error:
        read_task("bad", path)
    assert needle in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(TaskError, match="not found"):
        read_task("bad", tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny MoE checkpoint (byte vocabulary, 64-token context) trained for a few steps."""
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(root, save="model", train_iters=4)
    cfg.model.seq_length = 64
    Trainer(cfg, quiet=True).fit()
    return str(root / "model")


def test_eval_command_prints_the_table_and_writes_json(checkpoint, tmp_path, capsys):
    output = tmp_path / "results" / "eval.json"
    tasks = [arg for name in SAMPLE_TASKS for arg in ("--task", f"{name}={FIXTURES / name}.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--load", checkpoint, *tasks, "--ppl", str(FIXTURES / "heldout.txt"), "--limit", "3",
              "--batch-size", "4", "--output", str(output), "--no-progress-bar"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "| model | params (total / active) | held-out ppl | lambada acc | piqa acc" in out
    assert "triviaqa EM | webqs EM |" in out
    result = json.loads(output.read_text())["models"][checkpoint]
    assert result["params_total"] > result["params_active"] > 0
    assert result["perplexity"]["tokens"] > 100 and result["perplexity"]["ppl"] > 1
    for name, kind in SAMPLE_TASKS.items():
        metrics = result["tasks"][name]
        assert metrics["kind"] == kind and metrics["n"] == 3 and 0.0 <= metrics["drop_fraction"] <= 1.0
    assert {"acc", "acc_norm"} <= result["tasks"]["piqa"].keys() and "ppl" in result["tasks"]["lambada"]


def test_eval_command_reports_bad_input_in_one_line(checkpoint, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "choices": ["a", "b"], "label": 5}])
    for args in (["--task", f"piqa={bad}"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--load", checkpoint, *args, "--output", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err


# -- lm-evaluation-harness -------------------------------------------------------------------------------
# no network, ever: the toy task reads a local JSONL through datasets' packaged "json" builder
os.environ.setdefault("HF_FIXTURESSETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def toy_task_dir(tmp_path: Path) -> Path:
    """An lm-eval task "moetrain_toy_piqa" over tests/fixtures/piqa.jsonl, cached under tmp_path."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(f"""task: moetrain_toy_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {FIXTURES / 'piqa.jsonl'}
  cache_dir: {tmp_path / 'datasets'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return tmp_path / "tasks"


def test_harness_adapter_answers_the_three_request_types_like_the_scorer(checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from moetrain.evaluation.harness import MoetrainLM

    assert get_model("moetrain") is MoetrainLM and get_model("dummy") is not None  # built-ins still there
    lm = MoetrainLM.create_from_arg_string(f"path={checkpoint}", {"batch_size": "2", "device": "cpu"})
    assert lm.scorer.batch_size == 2
    # the same batches as the adapter's: with token dropping an MoE's scores depend on the batch
    scorer = LMScorer(lm.scorer.model, lm.scorer.tokenizer, batch_size=2)

    def instances(kind, args):
        return [Instance(kind, {}, arguments, index) for index, arguments in enumerate(args)]

    pairs = [("the quick brown", " fox"), ("the lazy", " dog.")]
    expected = [(s.logprob, s.is_greedy) for s in scorer.loglikelihood(pairs)]
    got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
    texts = ["the quick brown fox " * 6]
    rolling = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    assert rolling == pytest.approx([s.logprob for s in scorer.loglikelihood_rolling(texts)], abs=1e-3)
    requests = [("the quick", {"until": ["\n"], "max_gen_toks": 5}), ("the lazy", {"until": "o", "max_gen_toks": 3})]
    generated = lm.generate_until(instances("generate_until", requests), disable_tqdm=True)
    assert generated == [scorer.generate_until([(c, [k["until"]] if isinstance(k["until"], str) else k["until"])],
                                               k["max_gen_toks"])[0] for c, k in requests]
    assert len(generated[1]) <= 3 and "o" not in generated[1]


def test_lm_eval_runs_a_local_task_on_a_checkpoint(checkpoint, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import moetrain.evaluation.harness  # noqa: F401  registers "moetrain"

    manager = TaskManager(include_path=str(toy_task_dir(tmp_path)), include_defaults=False)
    results = lm_eval.simple_evaluate(model="moetrain", model_args=f"path={checkpoint}",
                                      tasks=["moetrain_toy_piqa"], task_manager=manager, batch_size=4)
    harness = results["results"]["moetrain_toy_piqa"]
    from moetrain.checkpoint import load_model

    model, tokenizer, _ = load_model(checkpoint)
    ours = evaluate_task(read_task("piqa", FIXTURES / "piqa.jsonl"), LMScorer(model, tokenizer, batch_size=4))
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])


@pytest.mark.slow
def test_moetrain_lm_eval_command_line(checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "moetrain", "lm-eval", "--model", "moetrain", "--model_args",
                             f"path={checkpoint}", "--tasks", "moetrain_toy_piqa", "--include_path",
                             str(toy_task_dir(tmp_path)), "--device", "cpu", "--limit", "4"], check=False,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "moetrain_toy_piqa" in result.stdout and "acc_norm" in result.stdout
