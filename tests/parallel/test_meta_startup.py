"""Start-up without the whole model: built on the meta device, sharded, then each rank's pieces materialised.

Every layout's pieces at start-up equal the matching selection of the single-process model for the same seed
(keyed initialisation, so exactly), nothing is left on the meta device, a rank of a 4-way expert-parallel run
never holds much more than its share of the parameters, and a distillation teacher is read piece by piece (an earlier
pipeline stage: only the layers its student blocks start from, or none).
"""

from __future__ import annotations

import contextlib
import io
from unittest import mock

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moetrain.checkpoint import load_model
from moetrain.config import Config
from moetrain.model import GPT
from moetrain.parallel.pieces import model_pieces
from moetrain.train.run import build_run
from moetrain.train.trainer import Trainer
from tests.helpers import parallel_config, run_ranks, select, tiny_config


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that torch ops allocate (off the meta device) and that are alive
    together: storages are tracked through weak references, so a freed temporary stops counting."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def assert_materialised(model: torch.nn.Module, device: torch.device) -> None:
    """Every parameter, buffer and routing counter lives on `device`."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta and tensor.device == device, name
    for _, moe in model.moe_layers():
        for stats in (moe.routing_stats, moe.eval_routing_stats):
            assert not any(t.is_meta for t in vars(stats).values() if isinstance(t, torch.Tensor))


def _build(cfg: Config) -> dict:
    """One rank's start-up: the pieces it holds, its peak allocation, which models it materialised, its log."""
    materialised = []  # (layer count, tensor names) of each model (student or teacher) allocated

    def recording_materialize(model: GPT, *args) -> None:
        materialised.append((model.cfg.num_layers, set(model.state_dict())))
        original_materialize(model, *args)

    original_materialize = GPT.materialize
    tracker, log = LiveTensorBytes(), io.StringIO()  # rank 0 logs
    with tracker, mock.patch.object(GPT, "materialize", recording_materialize), contextlib.redirect_stdout(log):
        run = build_run(cfg)
    assert_materialised(run.model, run.device)
    got = {"pieces": {g: (t.clone(), p) for g, t, p in model_pieces(run.model).values()},
           "peak": tracker.peak, "whole": 4 * run.param_counts["total"], "materialised": materialised,
           "log": log.getvalue()}
    if run.distiller is not None and run.distiller.teacher is not None:
        assert_materialised(run.distiller.teacher, run.device)
        got["teacher"] = {g: (t.clone(), p) for g, t, p in model_pieces(run.distiller.teacher).values()}
    return got


def start_parallel(cfg: Config, world: int) -> dict:
    return run_ranks(_build, cfg, world)


def single_process(cfg: Config):
    single = Config.from_dict(cfg.to_dict())
    single.parallel.tensor_parallel_size = single.parallel.pipeline_parallel_size = 1
    single.parallel.expert_parallel_size, single.parallel.zero_stage = None, 0
    return build_run(single, quiet=True)


LAYOUTS = {  # world size, parallel flags, MoE flags (shared and gated experts, PR-MoE, an aux-free router's bias)
    "dp2": (2, {}, {"mlp_type": "residual"}),
    "ep2": (2, {"expert_parallel_size": 2}, {"num_shared_experts": 1, "shared_expert_gate": True,
                                             "expert_bias": True}),
    "ep4": (4, {"expert_parallel_size": 4}, {}),
    "tp2": (2, {"tensor_parallel_size": 2}, {"num_shared_experts": 1}),
    "pp2": (2, {"pipeline_parallel_size": 2}, {}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_startup_weights_equal_the_single_process_ones(tmp_path, layout):
    world, parallel, moe = LAYOUTS[layout]
    cfg = parallel_config(tmp_path, style="gpt" if layout in ("tp2", "pp2") else "llama", **parallel)
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    reference = single_process(cfg)
    assert_materialised(reference.model, torch.device("cpu"))
    weights = reference.model.state_dict()
    results = start_parallel(cfg, world)
    held = set()
    for rank, got in results.items():
        for name, (tensor, piece) in got["pieces"].items():
            assert torch.equal(tensor, select(weights[name], piece)), f"{layout} rank {rank} {name}"
            held.add(name)
    assert held == set(weights)  # together the ranks hold every tensor
    if layout == "ep4":  # each rank its own expert
        assert [results[r]["pieces"]["blocks.1.ffn.experts.w1"][1].index for r in range(4)] == [(0,), (1,), (2,), (3,)]
    if layout == "pp2":  # the tied embedding: the last stage's own copy of the first stage's weight
        assert torch.equal(results[1]["pieces"]["lm_head.weight"][0], weights["tok_emb.weight"])


def test_keyed_init_keeps_the_distributions_and_depends_on_the_seed(tmp_path):
    full = parallel_config(tmp_path, style="gpt")
    cfg, moe = full.model, full.moe
    cfg.vocab_size, cfg.init_method_std = 300, 0.05
    model, again, other = GPT(cfg, moe, seed=3), GPT(cfg, moe, seed=3), GPT(cfg, moe, seed=4)
    weights = model.state_dict()
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in weights.items())
    assert not torch.equal(weights["blocks.1.ffn.experts.w1"], other.state_dict()["blocks.1.ffn.experts.w1"])
    scaled = 0.05 / (2 * cfg.num_layers) ** 0.5
    assert weights["blocks.1.ffn.experts.w1"].std().item() == pytest.approx(0.05, rel=0.05)
    assert weights["blocks.1.ffn.experts.w2"].std().item() == pytest.approx(scaled, rel=0.05)
    assert weights["blocks.0.attn.proj.weight"].std().item() == pytest.approx(scaled, rel=0.1)
    assert weights["tok_emb.weight"][:cfg.vocab_size].std().item() == pytest.approx(0.05, rel=0.05)
    assert not weights["tok_emb.weight"][cfg.vocab_size:].any()  # rows padding the vocabulary to 384: zero
    assert torch.equal(weights["blocks.0.norm1.weight"], torch.ones(cfg.hidden_size))
    assert not weights["blocks.0.attn.qkv.bias"].any() and not weights["blocks.0.norm1.bias"].any()
    experts = weights["blocks.1.ffn.experts.w1"]
    assert not torch.equal(experts[0], experts[1])  # each expert its own draw
    assert model.lm_head.weight is model.tok_emb.weight


def test_a_rank_of_four_way_expert_parallel_never_holds_the_whole_model(tmp_path):
    cfg = tiny_config(tmp_path, save=None)
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.parallel.expert_parallel_size = [16], 1, 4
    results = start_parallel(cfg, 4)
    whole = results[0]["whole"]
    experts = sum(t.numel() * 4 for name, (t, _) in results[0]["pieces"].items() if ".experts." in name)
    assert experts * 4 > 0.75 * whole  # the experts (4 of 16 held here) are most of the model
    for rank, got in results.items():
        assert got["peak"] < 0.45 * whole, f"rank {rank} held {got['peak']} of the model's {whole} bytes"
    # control: the same tracker sees a model built whole take at least its parameters' bytes
    resolved = single_process(cfg).cfg
    tracker = LiveTensorBytes()
    with tracker:
        model = GPT(resolved.model, resolved.moe)
    assert tracker.peak >= 4 * model.parameter_counts()["total"] == whole


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("teacher")
    Trainer(tiny_config(root, save="teacher", train_iters=2), quiet=True).fit()
    return str(root / "teacher")


def assert_logs_the_whole_teacher(log: str, teacher: str) -> None:
    """The teacher line counts the whole teacher's parameters, whatever this rank holds of it."""
    line = next(line for line in log.splitlines() if line.startswith("teacher: "))
    assert f"{load_model(teacher)[0].parameter_counts()['total'] / 1e6:.2f}M parameters" in line, line


@pytest.mark.parametrize("parallel", [{"expert_parallel_size": 2}, {"tensor_parallel_size": 2}], ids=["ep2", "tp2"])
def test_a_sharded_teacher_reads_its_pieces_and_initialises_the_student(teacher, tmp_path, parallel):
    cfg = tiny_config(tmp_path, save=None)
    cfg.distill.enabled, cfg.distill.load_teacher, cfg.distill.student_init_from_teacher = True, teacher, True
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    saved = load_model(teacher)[0].state_dict()
    results = start_parallel(cfg, 2)
    assert_logs_the_whole_teacher(results[0]["log"], teacher)
    for rank, got in results.items():
        assert {name for name, (_, piece) in got["teacher"].items() if piece.dim is not None}  # sharded
        for name, (tensor, piece) in got["teacher"].items():
            assert torch.equal(tensor, select(saved[name], piece)), f"rank {rank} teacher {name}"
        for name, (tensor, piece) in got["pieces"].items():  # same shapes: every student tensor is the teacher's
            assert torch.equal(tensor, select(saved[name], piece)), f"rank {rank} student {name}"


@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
def test_an_earlier_pipeline_stage_materialises_only_the_teacher_layers_it_copies(teacher, tmp_path, init):
    """PP 2: the last stage materialises the whole teacher (it runs it); the first none of it, or with
    --student-init-from-teacher only the layer its blocks take, with the embeddings. Either way both stages
    start from the single-process run's weights."""
    cfg = parallel_config(tmp_path, style="gpt", pipeline_parallel_size=2)  # 4 layers: blocks 0-1, 2-3
    cfg.distill.enabled, cfg.distill.load_teacher, cfg.distill.student_init_from_teacher = True, teacher, init
    saved = load_model(teacher)[0].state_dict()  # 2 layers: student blocks 0-3 take teacher layers 0, 0, 1, 1
    teacher_layers = 2
    weights = single_process(cfg).model.state_dict()
    if init:  # the reference did start from the teacher: its block 1 is teacher layer 0
        assert torch.equal(weights["blocks.1.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
    results = start_parallel(cfg, 2)
    teachers = {rank: [names for layers, names in got["materialised"] if layers == teacher_layers]
                for rank, got in results.items()}
    first_layer = {name for name in saved if name.startswith(("tok_emb.", "pos_emb.", "blocks.0."))}
    assert teachers == {0: [first_layer] if init else [], 1: [set(saved)]}
    assert_logs_the_whole_teacher(results[0]["log"], teacher)
    assert "teacher" not in results[0]  # what the first stage read is released after init
    assert results[1]["teacher"].keys() == saved.keys()
    for name, (tensor, piece) in results[1]["teacher"].items():
        assert torch.equal(tensor, select(saved[name], piece)), f"last stage teacher {name}"
    for rank, got in results.items():
        for name, (tensor, piece) in got["pieces"].items():
            assert torch.equal(tensor, select(weights[name], piece)), f"rank {rank} student {name}"
