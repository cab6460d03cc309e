"""Every command line of the MoE guides (shared/guide-commands.md) runs as `moetrain train`, flags unchanged.

Each test takes a guide line as written and appends tiny sizes after it (the last occurrence of a flag wins,
so the appended flags use the guide's own spellings), then trains 2 steps. Single-process lines call
`moetrain.cli.main` in-process; the torchrun and deepspeed lines launch real gloo processes, since the
launcher is their point. One tiny corpus, one Megatron-format prefix and one teacher serve the module.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from moetrain.checkpoint import load_model
from moetrain.cli import main
from moetrain.cli import run as run_command
from moetrain.config import ConfigError, parse_train_args
from tests.helpers import free_port, read_records, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the shrunk sizes override the guide's DeepSpeed JSON, each with a warning
pytestmark = pytest.mark.filterwarnings("ignore:.* overrides .* in .*ds_config_moe.json:UserWarning")

# -- minimal_pretrain MoE guide: the flags after `moetrain train` ---------------------------------------------
MINIMAL_GUIDE = {
    "moe-every-other-layer": "--num-experts 8 --num-experts-per-token 2 --moe-layer-interval 2 --max-steps 1000",
    "dense": "--num-experts 0",
    "wider-model": "--num-experts 4 --num-experts-per-token 2 --hidden-size 512 --num-layers 8",
    "aux-loss-0.1": "--num-experts 8 --router-aux-loss-coef 0.1",
    "aux-loss-0.001": "--num-experts 8 --router-aux-loss-coef 0.001",
    "aux-loss-0.01": "--num-experts 8 --router-aux-loss-coef 0.01",
    "top-3": "--num-experts 8 --num-experts-per-token 3",
    "gpt2-small-shape": "--vocab-size 32000 --hidden-size 768 --num-layers 12 --num-attention-heads 12 "
                        "--num-experts 8 --num-experts-per-token 2 --moe-layer-interval 2",
}
QUICK_VALIDATION = "--num-experts 4 --max-steps 10 --log-interval 5"
TORCHRUN_TP2 = ("--nproc_per_node=8", "--num-experts 8 --num-experts-per-token 2 --moe-layer-interval 2 "
                                      "--tensor-parallel-size 2 --max-steps 1000")
TORCHRUN_TP2_PP4 = ("--nproc_per_node=16", "--num-experts 16 --num-experts-per-token 2 --moe-layer-interval 2 "
                                           "--tensor-parallel-size 2 --pipeline-parallel-size 4 --num-microbatches 16 "
                                           "--max-steps 10000")
TORCHRUN_QUICK = ("--nproc_per_node=2", "--num-experts 4 --tensor-parallel-size 2 --max-steps 10 --log-interval 5")
# the guide's expected log line; more fields may follow
LOG_LINE = re.compile(r"^Step \d+ \| Loss: \d+\.\d{4} \| Aux Loss: \d+\.\d{4} \| LR: \d\.\d{2}e[-+]\d{2}( \| .*)?$")

# -- Megatron-DeepSpeed MoE guide -------------------------------------------------------------------------------
MEGATRON_GUIDE = (
    "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --num-layers 24 --hidden-size 1024 "
    "--num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 4 "
    "--global-batch-size 256 --train-iters 500000 --lr 0.0001 --min-lr 0.00001 --lr-decay-style cosine "
    "--lr-warmup-iters 2000 --clip-grad 1.0 --weight-decay 0.1 --num-experts 128 --moe-expert-parallel-size 8 "
    "--moe-loss-coeff 0.01 --moe-train-capacity-factor 1.25 --moe-eval-capacity-factor 2.0 --moe-min-capacity 4 "
    "--fp16 --deepspeed --deepspeed_config {ds_config} --data-path {data} "
    "--vocab-file {vocab} --merge-file {merges} --save-interval 5000 --eval-interval 1000 --eval-iters 100")
MEGATRON_VARIANTS = {
    "pr-moe": '--num-experts "[128, 64, 32, 16]" --mlp-type residual --moe-expert-parallel-size 4 '
              '--moe-loss-coeff 0.01 --moe-train-capacity-factor 1.25',
    "mos": "--num-experts 128 --moe-expert-parallel-size 8 --moe-loss-coeff 0.01 --mos --load-teacher {teacher} "
           "--teacher-forward --teacher-model-parallel-size 1 --fp16",
    "moe-tuning": "--lr 0.0001 --min-lr 0.00001 --lr-decay-iters 500000 --lr-warmup-iters 2000",
    "no-token-dropping": "--disable-moe-token-dropping",
}
DS_CONFIG_MOE = {
    "train_batch_size": 256,
    "gradient_accumulation_steps": 1,
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16},
    "moe": {"enabled": True, "num_experts": 128, "expert_parallel_size": 8, "moe_loss_coeff": 0.01,
            "train_capacity_factor": 1.25, "eval_capacity_factor": 2.0, "min_capacity": 4, "drop_tokens": True},
    "zero_optimization": {"stage": 1},
}
# sizes shrunk for a CPU; with the JSON's gradient_accumulation_steps 1 the global batch is micro x data-parallel
TINY_MEGATRON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 64 "
                 "--micro-batch-size 2 --train-iters 2 --lr-warmup-iters 1 --eval-iters 1 --num-experts 4 "
                 "--device cpu --no-progress-bar")


def tiny_minimal(paths: dict, save: str | None, steps: int = 2) -> list[str]:
    """The minimal_pretrain sizes shrunk (spelled as that guide spells them), on the tiny corpus."""
    return [*shlex.split("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 "
                         f"--micro-batch-size 2 --global-batch-size 4 --max-steps {steps} --eval-iters 1 "
                         "--split 80,20,0 --device cpu --no-progress-bar"),
            "--data-path", paths["corpus"], "--data-cache-dir", paths["cache"],
            *(["--save", save] if save else ["--no-save"])]


def megatron_line(paths: dict, variant: str = "") -> list[str]:
    """The Megatron-DeepSpeed guide's flags (a variant's flags after them, as its `...` says)."""
    return shlex.split(MEGATRON_GUIDE.format(**paths) + " " + variant.format(**paths))


def run_main(capsys, argv: list[str]) -> str:
    """`moetrain ARGV` in-process; its stdout, after checking it exited 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    return out


def launch(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    """The tiny corpus, a Megatron prefix of it with GPT-2 BPE files, the guide's DeepSpeed JSON, a cache."""
    root = tmp_path_factory.mktemp("guide")
    vocab, merges = root / "vocab.json", root / "merges.txt"
    vocab.write_text(json.dumps({"a": 0, "b": 1, "Ġ": 2, "ab": 3, "<|endoftext|>": 4}))
    merges.write_text("#version: 0.2\na b\n")
    source = root / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": "ab a b abab " * (20 + i)}) + "\n" for i in range(20)))
    assert run_command("prepare-data", ["--input", str(source), "--output-prefix", str(root / "my-gpt2"),
                                        "--vocab-file", str(vocab), "--merge-file", str(merges), "--tokenizer-type",
                                        "GPT2BPETokenizer", "--append-eod", "--output-format", "megatron"]) == 0
    ds_config = root / "ds_config_moe.json"
    ds_config.write_text(json.dumps(DS_CONFIG_MOE))
    return {"corpus": write_corpus(root), "cache": str(root / "cache"), "data": str(root / "my-gpt2_text_document"),
            "vocab": str(vocab), "merges": str(merges), "ds_config": str(ds_config), "root": str(root)}


@pytest.fixture(scope="module")
def teacher(paths) -> str:
    """A 2-step dense teacher on the Megatron prefix (the student's tokenizer), for the MoS line."""
    save = os.path.join(paths["root"], "teacher")
    argv = ["train", *shlex.split(TINY_MEGATRON), "--num-experts", "1", "--data-path", paths["data"],
            "--vocab-file", paths["vocab"], "--merge-file", paths["merges"], "--global-batch-size", "2",
            "--data-cache-dir", paths["cache"], "--save", save]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)
    return save


# -- minimal_pretrain guide -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MINIMAL_GUIDE)
def test_minimal_pretrain_guide_line(name, paths, capsys):
    out = run_main(capsys, ["train", *shlex.split(MINIMAL_GUIDE[name]), *tiny_minimal(paths, None)])
    assert [line.split(" |")[0] for line in out.splitlines() if LOG_LINE.match(line)] == ["Step 2"]


def test_quick_validation_runs_its_ten_steps_and_logs_the_guides_line(paths, tmp_path, capsys):
    """The guide's "quick validation" as written (10 steps, a line every 5): the warmup default fits it."""
    tiny = tiny_minimal(paths, str(tmp_path / "run"), steps=10)
    out = run_main(capsys, ["train", *shlex.split(QUICK_VALIDATION), *tiny])
    assert [line.split(" |")[0] for line in out.splitlines() if LOG_LINE.match(line)] == ["Step 5", "Step 10"]
    train = [r for r in read_records(tmp_path / "run") if r["type"] == "train"]
    assert [r["step"] for r in train] == [5, 10] and train[-1]["lr"] < train[0]["lr"]  # decaying, warmup done


def torchrun(nproc: str, guide_flags: str, *tiny: str) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", nproc, f"--master_port={free_port()}",
                   "-m", "moetrain", "train", *shlex.split(guide_flags), *tiny])


def test_torchrun_quick_validation_with_tensor_parallel_2(paths):
    done = torchrun(TORCHRUN_QUICK[0], TORCHRUN_QUICK[1], *tiny_minimal(paths, None))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(" |")[0] for line in done.stdout.splitlines() if LOG_LINE.match(line)] == ["Step 2"]
    assert "parallel: 2 processes = DP 1 (EP 2) x TP 2 x PP 1" in done.stdout


@pytest.mark.slow
def test_torchrun_tensor_parallel_line_on_2_processes(paths):
    """8 processes in the guide, 2 here: tensor parallel 2, as the guide sets it."""
    done = torchrun("--nproc_per_node=2", TORCHRUN_TP2[1], *tiny_minimal(paths, None))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel: 2 processes = DP 1 (EP 2) x TP 2 x PP 1" in done.stdout


@pytest.mark.slow
def test_torchrun_tensor_and_pipeline_parallel_line_on_4_processes(paths):
    """16 processes in the guide, 4 here: TP 2 as given, PP 4 -> 2 and 16 micro-batches -> 2."""
    tiny = [flag for flag in tiny_minimal(paths, None)]
    del tiny[tiny.index("--global-batch-size"):tiny.index("--global-batch-size") + 2]  # --num-microbatches sets it
    done = torchrun("--nproc_per_node=4", TORCHRUN_TP2_PP4[1], *tiny, "--pipeline-parallel-size", "2",
                    "--num-microbatches", "2", "--num-experts", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel: 4 processes = DP 1 (EP 2) x TP 2 x PP 2" in done.stdout


# -- Megatron-DeepSpeed guide -----------------------------------------------------------------------------------

def megatron_tiny(paths: dict, save: str | None, *, processes: int = 1) -> list[str]:
    return [*shlex.split(TINY_MEGATRON), "--global-batch-size", str(2 * processes),
            "--moe-expert-parallel-size", str(processes), "--data-cache-dir", paths["cache"],
            *(["--save", save] if save else ["--no-save"])]


@pytest.mark.slow
def test_megatron_deepspeed_line_under_the_deepspeed_launcher(paths, tmp_path):
    """`deepspeed --num_gpus N $(which moetrain) train ...` (2 processes) with the guide's DeepSpeed JSON: the
    launcher's --local_rank is accepted, its RANK/WORLD_SIZE join the job; --seq-length and
    --max-position-embeddings stay two settings."""
    launcher, script = shutil.which("deepspeed"), shutil.which("moetrain")
    assert launcher and script, "the deepspeed launcher and the moetrain console script must be installed"
    save = str(tmp_path / "run")
    done = launch([launcher, "--num_gpus", "2", "--master_port", str(free_port()), script, "train",
                   *megatron_line(paths), *megatron_tiny(paths, save, processes=2)])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "parallel: 2 processes = DP 2 (EP 2) x TP 1 x PP 1 | ZeRO 1" in done.stdout
    model, _, cfg = load_model(save)
    assert (cfg.model.seq_length, cfg.model.max_position_embeddings, model.pos_emb.weight.shape[0]) == (32, 64, 64)
    assert cfg.training.precision == "fp16" and cfg.moe.train_capacity_factor == 1.25


@pytest.mark.parametrize("variant", ["pr-moe", "moe-tuning", "no-token-dropping"])
def test_megatron_deepspeed_variant(variant, paths, capsys):
    tiny = megatron_tiny(paths, None)
    if variant == "pr-moe":  # a pyramid needs one count per MoE layer: 8 layers, 4 MoE layers, counts shrunk
        tiny += ["--num-layers", "8", "--num-experts", "[8, 4, 4, 2]"]
    out = run_main(capsys, ["train", *megatron_line(paths, MEGATRON_VARIANTS[variant]), *tiny])
    assert "Step 2 | Loss:" in out
    if variant == "pr-moe":
        assert "4 MoE layers with experts [8, 4, 4, 2]" in out


def test_megatron_deepspeed_mos_line(paths, teacher, capsys):
    out = run_main(capsys, ["train", *megatron_line(paths, MEGATRON_VARIANTS["mos"].format(teacher=teacher)),
                            *megatron_tiny(paths, None)])
    assert f"teacher: {teacher}" in out and "KD Loss:" in out


def test_pyramid_for_24_layers_is_refused_with_megatrons_rule(paths):
    cfg = parse_train_args(megatron_line(paths, MEGATRON_VARIANTS["pr-moe"]))
    with pytest.raises(ConfigError, match=re.escape(
            "--num-experts lists 4 counts but --num-layers 24 with --expert-interval 2 has 12 MoE layers; give 1 "
            "count or 12, one per MoE layer in order as Megatron-DeepSpeed expects (layers 1, 3, 5, ...)")):
        cfg.validate(8)


def test_config_error_under_torchrun_is_reported_once(paths):
    """A bad size under torchrun: one line from rank 0, no traceback of the child, one failure in the summary."""
    done = torchrun("--nproc_per_node=2", TORCHRUN_QUICK[1], *tiny_minimal(paths, None), "--num-attention-heads", "3")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("moetrain train: error:")]
    assert errors == ["moetrain train: error: --hidden-size 32 is not divisible by --num-attention-heads 3; pick a "
                      "head count that divides it, or set --kv-channels"], output[-3000:]
    assert "moetrain/" not in output  # no frame of moetrain's code: the child printed no traceback
    assert "<NO_OTHER_FAILURES>" in output and "traceback : moetrain train: error: --hidden-size 32" in output
