"""Checkpoint round trips, RNG restore, crash safety, weights_only loading, retention."""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from moetrain.checkpoint import (
    CheckpointError,
    CheckpointReader,
    Piece,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from moetrain.checkpoint import reader as reader_module
from moetrain.checkpoint import storage as ckpt
from moetrain.train.optimizer import build_optimizer
from tests.helpers import FIXTURES


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.norm(self.embed(tokens)))))


def _train_step(model, optimizer, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 16, (4, 5), generator=gen)
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _trained():
    torch.manual_seed(0)
    model = TiedLM()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    _train_step(model, optimizer, seed=1)
    return model, optimizer


def _save(save_dir, iteration, model=None, optimizer=None, **kwargs):
    model = model or TiedLM()
    optimizer_state = optimizer.state_dict() if optimizer else {}
    return save_checkpoint(str(save_dir), iteration, model_state=model.state_dict(),
                           optimizer_state=optimizer_state, extra=kwargs.pop("extra", {}), **kwargs)


def test_model_and_optimizer_round_trip_bitwise_and_training_continues_identically(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, 7, model, optimizer, extra={"data_position": 123, "config": {"lr": 1e-2}})
    assert path == os.path.join(tmp_path, "iter_0000007")
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors", "state.pt"]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000007"

    loaded = load_checkpoint(str(tmp_path))
    assert loaded.iteration == 7 and loaded.path == path
    assert loaded.extra == {"data_position": 123, "config": {"lr": 1e-2}}
    assert loaded.model_state["head.weight"] is loaded.model_state["embed.weight"]  # tie restored
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], tensor), name

    restored = TiedLM()
    restored.load_state_dict(loaded.model_state)
    restored_opt = build_optimizer(restored, lr=1e-2, weight_decay=0.1)
    restored_opt.load_state_dict(loaded.optimizer_state)
    for state, ref in zip(restored_opt.state.values(), optimizer.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], ref[key])
    _train_step(model, optimizer, seed=2)
    _train_step(restored, restored_opt, seed=2)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_contiguous_and_overlapping_views_are_saved(tmp_path):
    fused = torch.arange(24.0).reshape(4, 6)
    state = {"t": fused.t(), "q": fused[:, :3], "k": fused[:, 3:], "alias": fused, "alias2": fused,
             "empty": torch.empty(0)}
    save_checkpoint(str(tmp_path), 1, model_state=state, optimizer_state={}, extra={})
    loaded = load_checkpoint(str(tmp_path)).model_state
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["alias2"] is loaded["alias"]


def test_rng_restore_reproduces_python_numpy_torch_streams(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in the numpy state
    save_checkpoint(str(tmp_path), 1, model_state={}, optimizer_state={}, extra={"rng": capture_rng_state()})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(str(tmp_path)).extra["rng"])
    actual = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert actual[:2] == expected[:2]
    assert np.array_equal(actual[2], expected[2]) and actual[3] == expected[3]
    assert torch.equal(actual[4], expected[4])


def _fail_when(real, predicate):
    def fake(*args, **kwargs):
        if predicate(*args):
            raise OSError("simulated crash")
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("crash_point", ["weights", "state", "rename_dir", "latest"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_point):
    first = TiedLM()
    _save(tmp_path, 1, first)
    if crash_point == "weights":
        monkeypatch.setattr(ckpt, "save_file", _fail_when(ckpt.save_file, lambda *a: True))
    elif crash_point == "state":
        monkeypatch.setattr(ckpt.torch, "save", _fail_when(torch.save, lambda *a: True))
    elif crash_point == "rename_dir":
        monkeypatch.setattr(ckpt.os, "replace", _fail_when(os.replace, lambda src, dst: dst.endswith("iter_0000002")))
    else:
        monkeypatch.setattr(ckpt.os, "replace", _fail_when(os.replace, lambda src, dst: dst.endswith("latest")))
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2)
    monkeypatch.undo()

    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    loaded = load_checkpoint(str(tmp_path))
    assert loaded.iteration == 1
    assert torch.equal(loaded.model_state["mix.weight"], first.mix.weight)
    expected = [1, 2] if crash_point == "latest" else [1]  # a complete dir that latest does not name yet
    assert list_checkpoints(str(tmp_path)) == expected

    _save(tmp_path, 3)  # the next save cleans the debris and moves on
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    assert load_checkpoint(str(tmp_path)).iteration == 3


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload._execute, ())

    @staticmethod
    def _execute():
        Payload.ran = True
        return "pwned"


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    _save(tmp_path, 1)
    state_path = tmp_path / "iter_0000001" / "state.pt"
    torch.save({"iteration": 1, "optimizer": {}, "extra": {"evil": Payload()}}, state_path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(str(tmp_path))
    assert not Payload.ran


def test_save_rejects_values_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"\['extra'\]\['data'\]\['pos'\].*numpy"):
        save_checkpoint(str(tmp_path), 1, model_state={}, optimizer_state={},
                        extra={"data": {"pos": np.int64(3)}})
    assert not tmp_path.joinpath("latest").exists()


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt"])
def test_truncated_files_give_clear_error(tmp_path, victim):
    _save(tmp_path, 1, *_trained())
    path = tmp_path / "iter_0000001" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(str(tmp_path))


def test_a_single_process_checkpoint_is_read_tensor_by_tensor(tmp_path, monkeypatch):
    """model.safetensors stays on disk: a reader loads just the tensors asked for (a teacher's pipeline
    stage or a rank's shard reads its pieces, not the whole model)."""
    model, optimizer = _trained()
    _save(tmp_path, 1, model, optimizer)
    loaded = []

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, key):
            loaded.append(key)
            return self.handle.get_tensor(key)

    real_open = reader_module.safe_open
    monkeypatch.setattr(reader_module, "safe_open", lambda *args, **kwargs: Recording(real_open(*args, **kwargs)))
    reader = CheckpointReader(str(tmp_path / "iter_0000001"), optimizer=False)
    assert loaded == []
    rows = reader.read("model/mix.weight", Piece((8, 8), dim=0, index=(2, 5)))
    assert loaded == ["mix.weight"]
    assert torch.equal(rows, model.mix.weight.detach()[[2, 5]])
    tied = reader.read("model/head.weight", Piece((16, 8)))  # stored once, under the embedding's name
    assert loaded == ["mix.weight", "embed.weight"] and torch.equal(tied, model.embed.weight.detach())
    with pytest.raises(CheckpointError, match="has no tensor 'model/nope'"):
        reader.read("model/nope", Piece((1,)))


def test_resolution_and_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        load_checkpoint(str(tmp_path))
    for iteration in (5, 10):
        _save(tmp_path, iteration, extra={"marker": iteration})
    assert load_checkpoint(str(tmp_path)).extra["marker"] == 10
    assert load_checkpoint(str(tmp_path), iteration=5).extra["marker"] == 5
    assert load_checkpoint(str(tmp_path / "iter_0000005")).extra["marker"] == 5
    with pytest.raises(FileNotFoundError, match=r"available iterations: \[5, 10\]"):
        load_checkpoint(str(tmp_path), iteration=7)


def test_resaving_an_iteration_replaces_it_and_writes_files(tmp_path):
    _save(tmp_path / "run", 4, extra={"v": 1}, files={"tokenizer.json": '{"vocab": 1}'})
    _save(tmp_path / "run", 4, extra={"v": 2}, files={"tokenizer.json": '{"vocab": 2}'})
    assert load_checkpoint(str(tmp_path / "run")).extra["v"] == 2
    assert (tmp_path / "run" / "iter_0000004" / "tokenizer.json").read_text() == '{"vocab": 2}'
    with pytest.raises(ValueError, match="plain file name"):
        _save(tmp_path / "run", 5, files={"../x": "{}"})


def test_keep_last_deletes_only_older_checkpoints(tmp_path):
    for iteration in (1, 2, 3, 4):
        _save(tmp_path, iteration, keep_last=2)
    assert list_checkpoints(str(tmp_path)) == [3, 4]
    _save(tmp_path, 2, keep_last=1)  # restarted from an earlier point: later dirs are not "older"
    assert list_checkpoints(str(tmp_path)) == [2, 3, 4]
    assert load_checkpoint(str(tmp_path)).iteration == 2
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 9, keep_last=0)


BEFORE = str(FIXTURES / "checkpoints_before_issue15")


def _fixture_config(tmp_path, load: str):
    """The run that wrote tests/fixtures/checkpoints_before_issue15, resumed for one more step."""
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, save=None, train_iters=3, lr_decay_style="constant", load=load)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 16, 2, 16
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [2], 1, 1
    cfg.moe.drop_tokens, cfg.moe.use_rts, cfg.moe.top2_2nd_expert_sampling = False, False, False
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 4
    cfg.data.cache_dir = None
    return cfg


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_checkpoints_written_before_the_checkpoint_package_load_and_resume_as_they_did(layout, tmp_path):
    """Both on-disk formats of the code before moetrain.checkpoint existed: the same weights (logits) and the
    same resumed loss that code got from them (tests/fixtures/checkpoints_before_issue15/expected.json)."""
    import json

    from moetrain.checkpoint import load_model
    from moetrain.train.trainer import Trainer

    with open(os.path.join(BEFORE, "expected.json")) as f:
        expected = json.load(f)
    path = os.path.join(BEFORE, layout)
    model, _, _ = load_model(path)
    assert model.lm_head.weight is model.tok_emb.weight  # stored once (the sharded index had no aliases then)
    ids = torch.arange(16).view(1, 16) * 7 % 250
    with torch.no_grad():  # float32 logits from another CPU's BLAS: equal to rounding, not bit for bit
        assert float(model(ids).logits.double().sum()) == pytest.approx(expected["logits_sum"][layout], rel=1e-6)
    if layout == "sharded":  # pieces of a 2-process tensor-parallel run, against an independent reading
        with open(os.path.join(path, "iter_0000002", "index.json")) as f:
            index = json.load(f)["tensors"]
        entries = index["model/blocks.0.attn.qkv.weight"]
        assert len(entries) == 2 and entries[0]["dim"] == 0
        from safetensors import safe_open

        for entry in entries:
            with safe_open(os.path.join(path, "iter_0000002", entry["file"]), "pt") as shard:
                part = shard.get_tensor("model/blocks.0.attn.qkv.weight")
            assert torch.equal(model.blocks[0].attn.qkv.weight.detach()[entry["index"]], part)
    result = Trainer(_fixture_config(tmp_path, path), quiet=True).fit()
    assert result.losses == [expected["resumed_loss_at_step_3"][layout]]


def test_a_resumed_run_keeps_its_checkpoints_vocabulary_padding(tmp_path):
    """The embedding's rows are part of the model's shape: a run resumed with another
    --make-vocab-size-divisible-by (here the default) takes its checkpoint's, and continues as the
    uninterrupted run does; the padding rows stay zero through training."""
    from moetrain.train.trainer import Trainer
    from tests.helpers import tiny_config

    def config(save: str, load: str | None = None):
        cfg = tiny_config(tmp_path, save=save, train_iters=3, lr_decay_style="constant", weight_decay=0.1,
                          load=load)
        cfg.model.make_vocab_size_divisible_by = 64 if load is None else 128
        return cfg

    straight = Trainer(config("straight"), quiet=True)
    whole = straight.fit().losses
    first = config("first")
    first.training.train_iters = 2
    Trainer(first, quiet=True).fit()
    resumed = Trainer(config("resumed", load=str(tmp_path / "first")), quiet=True)
    assert resumed.cfg.model.make_vocab_size_divisible_by == 64
    assert resumed.fit().losses == whole[2:]
    vocab = resumed.cfg.model.vocab_size
    for trainer in (straight, resumed):
        weight = trainer.model.tok_emb.weight
        assert weight.shape[0] == -(-vocab // 64) * 64 and not weight[vocab:].any()
