"""Evaluation of moetrain checkpoints: held-out perplexity and zero-shot tasks from local files.

`harness` (imported on demand, needs the `lm-eval` extra) registers moetrain with lm-evaluation-harness.
"""

from moetrain.evaluation.run import evaluate_model, format_table, perplexity
from moetrain.evaluation.scorer import LMScorer, Score
from moetrain.evaluation.tasks import Task, TaskError, evaluate_task, normalize_answer, read_task

__all__ = ["LMScorer", "Score", "Task", "TaskError", "evaluate_model", "evaluate_task",
           "format_table", "normalize_answer", "perplexity", "read_task"]
