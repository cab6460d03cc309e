"""`moetrain` command line: help, train -> generate -> plot end to end, prepare-data, DeepSpeed JSON, and bad input
reported as one line on stderr with a non-zero exit code and no traceback.

Subprocesses (each pays the torch import) are kept to a handful; the rest calls `moetrain.cli.main` in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from moetrain.checkpoint import load_checkpoint, load_model
from moetrain.cli import COMMANDS, command_module, main, reference
from tests.helpers import ROOT, TEXT, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--expert-interval", "1", "--micro-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "0",
        "--eval-iters", "1", "--log-interval", "2", "--split", "80,20,0", "--device", "cpu", "--no-progress-bar"]


def run_cli(*args, script=False) -> subprocess.CompletedProcess:
    command = ["moetrain", *args] if script else [sys.executable, "-m", "moetrain", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    code = exit_info.value.code
    return 0 if code is None else code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_lists_commands():
    for result in (run_cli("--help"), run_cli("--help", script=True) if shutil.which("moetrain") else None):
        if result is None:
            continue
        assert result.returncode == 0, result.stderr
        for command in ("train", "prepare-data", "generate", "plot"):
            assert command in result.stdout
    if not shutil.which("moetrain"):
        pytest.skip("the moetrain console script is not on PATH (package not installed)")


def test_unknown_command_and_train_help(capsys):
    code, out, err = run_main(capsys, "fly")
    assert code == 2 and "unknown command 'fly'" in err
    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0
    for flag in ("--num-experts", "--topk", "--data-path", "--deepspeed_config", "--save"):
        assert flag in out


def test_train_generate_plot_end_to_end(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT * 5)
    save = tmp_path / "run"
    train = run_cli("train", *TINY, "--data-path", str(data), "--tokenizer-type", "byte", "--num-experts", "4",
                    "--train-iters", "6", "--eval-interval", "3", "--save", str(save),
                    "--data-cache-dir", str(tmp_path / "cache"))
    assert train.returncode == 0, train.stderr
    assert "Traceback" not in train.stderr
    assert os.path.isfile(save / "latest") and (save / "latest").read_text().strip() == "iter_0000006"
    assert os.path.isfile(save / "iter_0000006" / "tokenizer.json")
    assert "Step 6" in train.stdout and "Eval Loss" in train.stdout
    assert any(name.startswith("data-") for name in os.listdir(tmp_path / "cache"))

    prompt = "the quick"
    generate = run_cli("generate", "--load", str(save), "--prompt", prompt, "--max-new-tokens", "5",
                       "--temperature", "0")
    assert generate.returncode == 0, generate.stderr
    text = generate.stdout.rstrip("\n")
    assert text.startswith(prompt)
    # the same greedy continuation, computed here from the checkpoint
    model, tokenizer, cfg = load_model(str(save))
    assert cfg.moe.num_experts == [4] and cfg.model.hidden_size == 32
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, 5, temperature=0, eos_id=tokenizer.eos_id)
    assert text == prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist())

    plots = ("loss.png", "expert_load.png", "expert_health.png")
    for name in plots:
        os.remove(save / name)  # written by train; plot must write them again
    plot = run_cli("plot", "--save", str(save))
    assert plot.returncode == 0, plot.stderr
    assert plot.stdout.split() == [str(save / name) for name in plots]
    assert (save / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_prepare_data_then_train_on_prefix(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    prefix = str(tmp_path / "prepared" / "tiny")
    code, out, err = run_main(capsys, "prepare-data", "--input", corpus, "--output-prefix", prefix,
                              "--tokenizer-type", "byte")
    assert code == 0, err
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        assert os.path.isfile(prefix + suffix)
    assert "5 documents" in out
    save = tmp_path / "run"
    code, out, err = run_main(capsys, "train", *TINY, "--data-path", prefix, "--num-experts", "4",
                              "--train-iters", "2", "--save", str(save),
                              "--data-cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert "vocab 257" in out  # the prefix's own byte tokenizer (256 bytes + eos), not a trained BPE
    assert not os.path.exists(tmp_path / "cache")  # a prepared prefix is used as is, nothing re-tokenized
    assert load_checkpoint(str(save)).iteration == 2


def test_each_run_saves_its_own_tokenizer(tmp_path, capsys):
    """A fresh run into a --save directory used before writes its own tokenizer into its checkpoints, and a
    checkpoint whose tokenizer does not fit its model is refused in one line rather than sampled from."""
    corpus, save = write_corpus(tmp_path), tmp_path / "run"
    common = [*TINY, "--data-path", corpus, "--num-experts", "2", "--train-iters", "2", "--save", str(save),
              "--data-cache-dir", str(tmp_path / "cache")]
    assert run_main(capsys, "train", *common, "--tokenizer-type", "bpe", "--vocab-size", "300")[0] == 0
    bpe_tokenizer = (save / "iter_0000002" / "tokenizer.json").read_text()
    assert run_main(capsys, "train", *common, "--tokenizer-type", "byte")[0] == 0
    model, tokenizer, cfg = load_model(str(save))
    assert tokenizer.vocab_size == cfg.model.vocab_size == 257  # bytes + eos
    assert model.tok_emb.num_embeddings == cfg.model.padded_vocab_size() == 384  # padded to a multiple of 128

    (save / "iter_0000002" / "tokenizer.json").write_text(bpe_tokenizer)
    code, _, err = run_main(capsys, "generate", "--load", str(save), "--prompt", "x", "--max-new-tokens", "1")
    assert_one_line_error(code, err, "tokens, more than the model's 257")


def test_deepspeed_config_drives_the_run(tmp_path, capsys):
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
          "moe": {"enabled": True, "num_experts": 2, "top_k": 2, "moe_loss_coeff": 0.05},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.0}}}
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds))
    save = tmp_path / "run"
    drop = {TINY.index("--micro-batch-size"), TINY.index("--lr")}
    args = [a for i, a in enumerate(TINY) if i not in drop and i - 1 not in drop]  # the JSON sets these
    code, out, err = run_main(capsys, "train", *args, "--deepspeed_config", str(config),
                              "--data-path", write_corpus(tmp_path), "--tokenizer-type", "byte",
                              "--train-iters", "2", "--lr-decay-style", "constant", "--save", str(save),
                              "--data-cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert "experts [2, 2], top-2" in out
    saved = load_checkpoint(str(save))
    cfg = saved.extra["config"]
    assert cfg["moe"]["num_experts"] == [2] and cfg["moe"]["topk"] == 2 and cfg["moe"]["aux_loss_coeff"] == 0.05
    assert cfg["training"]["micro_batch_size"] == 2 and cfg["parallel"]["num_microbatches"] == 2
    assert saved.model_state["blocks.0.ffn.experts.w1"].shape[0] == 2
    train = [json.loads(line) for line in open(save / "metrics.jsonl") if '"train"' in line]
    record = train[-1]
    assert record["lr"] == pytest.approx(0.002)  # optimizer.params.lr, constant schedule
    for layer in record["moe_layers"]:
        # 2 steps x 2 micro-batches x 2 sequences x 16 tokens x top-2
        assert len(layer["tokens_per_expert"]) == 2 and sum(layer["tokens_per_expert"]) == 2 * 2 * 2 * 16 * 2


def test_bad_topk_subprocess_is_one_line_without_traceback(tmp_path):
    result = run_cli("train", "--topk", "9", "--num-experts", "4", "--save", str(tmp_path / "run"),
                     "--data-cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(result.returncode, result.stderr, "--topk 9")
    assert not os.path.exists(tmp_path / "run")  # validated before any work


def test_missing_data_path_is_one_line(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", *TINY, "--data-path", str(tmp_path / "missing.txt"),
                            "--save", str(tmp_path / "run"), "--data-cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(code, err, "missing.txt")


def test_load_of_empty_dir_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(capsys, "train", *TINY, "--data-path", write_corpus(tmp_path), "--tokenizer-type",
                            "byte", "--load", str(empty), "--save", str(tmp_path / "run"),
                            "--data-cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(code, err, str(empty))
    code, _, err = run_main(capsys, "generate", "--load", str(empty), "--prompt", "x")
    assert_one_line_error(code, err, str(empty))


def test_resume_with_mismatched_model_flags_is_one_line(tmp_path, capsys):
    """Resuming a 4-expert checkpoint with --num-experts 2 is bad input, like an empty --load dir."""
    common = ["train", *TINY, "--data-path", write_corpus(tmp_path), "--tokenizer-type", "byte",
              "--data-cache-dir", str(tmp_path / "cache")]
    code, _, err = run_main(capsys, *common, "--num-experts", "4", "--train-iters", "1",
                            "--save", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run_main(capsys, *common, "--num-experts", "2", "--train-iters", "2",
                            "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b"))
    assert_one_line_error(code, err)


def test_bad_flag_value_is_an_argparse_error(capsys):
    code, _, err = run_main(capsys, "train", "--num-experts", "eight")
    assert code == 2 and "Traceback" not in err and "--num-experts" in err


def test_top_level_help_lists_every_command_without_loading_torch():
    code = ("import sys\nfrom moetrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("no torch")
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


def test_every_command_parser_builds_and_helps(capsys):
    for name in COMMANDS:
        if not hasattr(command_module(name), "configure"):
            continue  # parses its own arguments (lm-eval)
        code, out, _ = run_main(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: moetrain {name} "), (name, out[:80])


def test_flags_reference_is_current(tmp_path):
    """docs/flags.md is what `python -m moetrain.cli.reference` writes; regenerate it after changing a flag."""
    committed = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert reference.main([str(tmp_path / "flags.md")]) == 0
    assert (tmp_path / "flags.md").read_text(encoding="utf-8") == committed, \
        "docs/flags.md is stale: run python -m moetrain.cli.reference"
    for flag in ("--num-experts", "--moe-layer-interval", "--deepspeed_config", "--kd-temp", "--router-init"):
        assert f"`{flag}`" in committed


def test_launcher_errors_before_joining_are_reported_by_rank_0_alone(tmp_path, monkeypatch, capsys):
    import moetrain.cli

    monkeypatch.setattr(moetrain.cli, "_OTHERS_EXIT_WAIT_S", 0.0)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert moetrain.cli.report_error("moetrain train: error: bad") == 0  # quiet: rank 0 reports it
    assert capsys.readouterr().err == "" and not error_file.exists()
    monkeypatch.setenv("RANK", "0")
    assert moetrain.cli.report_error("moetrain train: error: bad") == 1
    assert capsys.readouterr().err == "moetrain train: error: bad\n"
    assert json.loads(error_file.read_text())["message"]["message"] == "moetrain train: error: bad"
    monkeypatch.setenv("WORLD_SIZE", "1")  # no launcher: the line, exit 1, no error file written
    error_file.unlink()
    assert moetrain.cli.report_error("moetrain train: error: bad") == 1 and not error_file.exists()


def test_rank_0_waits_for_the_launchers_other_workers_before_it_exits():
    """Rank 0 must exit last (its failure alone in the launcher's summary) however late another worker runs:
    it waits until its siblings are gone, not a fixed delay."""
    launcher = textwrap.dedent("""
        import subprocess, sys
        late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2.0)"])
        rank0 = subprocess.run([sys.executable, "-c",
            "import time; from moetrain.cli import _wait_for_sibling_workers as wait; "
            "start = time.monotonic(); wait(30.0); print(time.monotonic() - start)"],
            capture_output=True, text=True, check=True)
        print(rank0.stdout.strip(), late.poll())
    """)
    done = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True)
    waited, late_exit = done.stdout.split()
    assert late_exit == "0"  # the other worker had exited when rank 0 returned
    assert 1.5 < float(waited) < 20.0


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_generate_refuses_a_temperature_that_is_no_finite_non_negative_number(capsys, value):
    code, _, err = run_main(capsys, "generate", "--load", "nowhere", "--temperature", value)
    assert code == 2 and f"argument --temperature: must be a finite number >= 0, got {value}" in err
