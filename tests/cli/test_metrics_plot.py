"""metrics.jsonl logging, console lines, TensorBoard mirroring and PNG plots."""

import json
import math
import pathlib
import struct
import sys
import types

import pytest
import torch

from moetrain.cli import run as run_command
from moetrain.plot import plot_metrics
from moetrain.train.metrics import MetricsLogger, format_eval_line, format_train_line, read_metrics, routing_summary


def _layer(layer, tokens, drop=0.012, max_over_min=1.8, used=1.0):
    return {"layer": layer, "tokens_per_expert": tokens, "drop_fraction": drop, "max_over_min": max_over_min,
            "max_over_mean": 1.3, "experts_used": used}


def _train_record(step, moe_layers, loss=3.2415):
    return {"type": "train", "step": step, "loss": loss, "lm_loss": loss - 0.01, "aux_loss": 0.0234,
            "z_loss": 0.001, "lr": 3e-4, "grad_norm": 0.9, "tokens_per_s": 12345.4, "loss_scale": None,
            "skipped_steps": 0, "moe_layers": moe_layers}


def test_train_line_matches_seed_format():
    moe = [_layer(1, [5, 3], drop=0.010, max_over_min=1.8), _layer(3, [4, 4], drop=0.014, max_over_min=1.2)]
    assert format_train_line(_train_record(100, moe)) == (
        "Step 100 | Loss: 3.2415 | Aux Loss: 0.0234 | LR: 3.00e-04 | 12,345 tok/s"
        " | load max/min 1.8 | drop 1.2% | experts used 100%")
    assert format_train_line(_train_record(100, [])) == (
        "Step 100 | Loss: 3.2415 | Aux Loss: 0.0234 | LR: 3.00e-04 | 12,345 tok/s")
    record = {**_train_record(100, []), "balance/aux_loss": 0.02, "balance/seq_aux_loss": 0.0136}
    assert format_train_line(record) == (
        "Step 100 | Loss: 3.2415 | Aux Loss: 0.0234 (aux_loss 0.0200, seq_aux_loss 0.0136) | Z Loss: 0.0010"
        " | LR: 3.00e-04 | 12,345 tok/s")


def test_routing_summary_aggregates_worst_and_means():
    summary = routing_summary([_layer(1, [1], drop=0.1, max_over_min=2.0, used=0.5),
                               _layer(2, [1], drop=0.3, max_over_min=None, used=1.0)])
    assert summary == {"max_over_min": math.inf, "drop_fraction": pytest.approx(0.2), "experts_used": 0.75}
    assert routing_summary([]) == {}


def test_eval_line():
    record = {"type": "eval", "step": 200, "eval_loss": 3.1, "eval_ppl": math.exp(3.1), "eval_drop_fraction": 0.004}
    assert format_eval_line(record) == "Step 200 | Eval Loss: 3.1000 | Eval PPL: 22.20 | drop 0.4%"


def test_logger_appends_flushed_json_lines_with_nonfinite_as_null(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    logger.log(_train_record(1, [_layer(1, [3, 0], max_over_min=float("inf"))], loss=float("nan")))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # readable before close: flushed
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["loss"] is None and record["moe_layers"][0]["max_over_min"] is None
    assert record["aux_loss"] == 0.0234 and record["step"] == 1
    logger.log({"type": "eval", "step": 1, "eval_loss": 2.5, "eval_ppl": 12.18, "eval_drop_fraction": 0.0})
    logger.close()
    assert [r["type"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == ["train", "eval"]


def test_logger_recovers_from_a_torn_last_line_and_rejects_bad_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_train_record(1, [])) + "\n" + '{"type": "train", "st')
    logger = MetricsLogger(str(tmp_path))
    logger.log(_train_record(2, []))
    with pytest.raises(ValueError, match="type"):
        logger.log({"step": 3})
    with pytest.raises(TypeError, match=r"\.item\(\)"):
        logger.log({"type": "train", "step": 3, "loss": torch.tensor(1.0)})
    logger.close()
    with pytest.warns(UserWarning, match="skipped 1 unparsable line"):
        records = read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2]


def test_tensorboard_missing_warns_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        logger = MetricsLogger(str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
    logger.log(_train_record(1, []))
    logger.close()
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 1


def test_tensorboard_receives_train_eval_and_per_layer_scalars(tmp_path, monkeypatch):
    scalars = {}

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars[(tag, step)] = value

        def close(self):
            scalars["closed"] = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = MetricsLogger(None, tensorboard_dir=str(tmp_path))
    logger.log(_train_record(10, [_layer(1, [2, 2], drop=0.25)]))
    logger.log({"type": "eval", "step": 10, "eval_loss": 2.5, "eval_ppl": 12.18, "eval_drop_fraction": 0.0})
    logger.close()
    assert scalars[("train/loss", 10)] == 3.2415 and scalars[("train/lr", 10)] == 3e-4
    assert scalars[("train/moe_layer_1/drop_fraction", 10)] == 0.25
    assert scalars[("eval/loss", 10)] == 2.5 and scalars[("eval/ppl", 10)] == 12.18
    assert ("train/loss_scale", 10) not in scalars and scalars["closed"]


def _png_size(path):
    data = pathlib.Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write_pyramid_run(save_dir):
    logger = MetricsLogger(str(save_dir))
    for step in list(range(10, 110, 10)) + [50, 60]:  # 50 and 60 logged again after a resume
        skew = step / 100
        layers = [_layer(1, [int(100 * (1 + skew)), 100, 100, int(100 * (1 - skew))]),
                  _layer(3, [50 + 10 * e for e in range(8)])]
        logger.log(_train_record(step, layers, loss=4.0 - step / 50))
        if step % 50 == 0:
            logger.log({"type": "eval", "step": step, "eval_loss": 3.9 - step / 50, "eval_ppl": 1.0,
                        "eval_drop_fraction": 0.0})
    logger.close()


def test_plot_main_writes_loss_and_pyramid_expert_load_pngs(tmp_path, capsys):
    _write_pyramid_run(tmp_path)
    assert run_command("plot", ["--save", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "loss.png"), str(tmp_path / "expert_load.png")]
    for path in printed:
        width, height = _png_size(path)
        assert width > 400 and height > 200


def test_dense_run_only_plots_loss(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    for step in (1, 2, 3):
        logger.log(_train_record(step, []))
    logger.close()
    out = tmp_path / "plots"
    assert plot_metrics(str(tmp_path / "metrics.jsonl"), str(out)) == [str(out / "loss.png")]
    _png_size(out / "loss.png")


def test_plot_main_reports_missing_metrics(tmp_path, capsys):
    assert run_command("plot", ["--save", str(tmp_path)]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
