"""Mixture-of-Students distillation: the KD term by hand, a frozen teacher fed the student's batch, staged stop
across an exact resume, students of other shapes, and one-line errors for a mismatched teacher or bad flags."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.checkpoint import load_checkpoint, load_model
from moetrain.cli import main
from moetrain.config import Config, ConfigError, parse_train_args
from moetrain.moe.routing_noise import teacher_routing_key
from moetrain.train.distill import Distiller, kd_loss, teacher_layer_map
from moetrain.train.trainer import Trainer
from tests.helpers import read_records, tiny_config


def test_kd_loss_matches_a_hand_computation():
    ln3 = math.log(3)
    # token 1: teacher/T = [ln 3, 0] -> p_t = [3/4, 1/4]; student/T = [0, ln 3] -> p_s = [1/4, 3/4]
    #   KL(p_t || p_s) = 3/4 ln 3 + 1/4 ln(1/3) = ln(3) / 2, times T^2 = 4: 2 ln 3
    # token 2: equal distributions, KL 0.  Mean over the two tokens: ln 3
    teacher = torch.tensor([[[2 * ln3, 0.0], [1.0, 2.0]]])
    student = torch.tensor([[[0.0, 2 * ln3], [1.0, 2.0]]])
    assert float(kd_loss(student, teacher, temperature=2.0)) == pytest.approx(ln3, rel=1e-6)
    assert float(kd_loss(teacher, teacher, temperature=1.0)) == pytest.approx(0.0, abs=1e-7)


def test_teacher_layer_map_keeps_first_and_last_evenly_spaced():
    layers = teacher_layer_map(21, 24)
    assert len(layers) == 21 and layers[0] == 0 and layers[-1] == 23
    assert sorted(set(range(24)) - set(layers)) == [4, 11, 19]
    assert teacher_layer_map(3, 4) == [0, 2, 3]
    assert teacher_layer_map(4, 4) == [0, 1, 2, 3]
    assert teacher_layer_map(1, 4) == [3]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A 2-layer MoE teacher (4 experts per layer, byte vocabulary) trained for a few steps."""
    root = tmp_path_factory.mktemp("teacher")
    Trainer(tiny_config(root, save="teacher", train_iters=6), quiet=True).fit()
    return str(root / "teacher")


def student_config(tmp_path, teacher_dir, **training) -> Config:
    cfg = tiny_config(tmp_path, **training)
    cfg.distill.enabled, cfg.distill.load_teacher = True, teacher_dir
    return cfg


def test_teacher_is_frozen_fed_the_student_batch_and_not_saved(teacher, tmp_path, capsys):
    cfg = student_config(tmp_path, teacher, train_iters=2)
    cfg.distill.alpha_ce, cfg.distill.beta_ce, cfg.distill.temperature = 0.5, 2.0, 2.0
    run = Trainer(cfg)
    model_t = run.distiller.teacher
    assert not model_t.training and not any(p.requires_grad for p in model_t.parameters())
    saved_teacher, _, _ = load_model(teacher)
    for name, value in model_t.state_dict().items():
        assert torch.equal(value, saved_teacher.state_dict()[name]), name
    before = {name: value.clone() for name, value in model_t.state_dict().items()}
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model_t.parameters()}

    # the KD term of step 1, worked out on the batch the step will draw, with the student's routing key and
    # the teacher's key derived from it
    data_state = run.train_data.state_dict()
    inputs, _ = run.train_data.next_batch(cfg.training.micro_batch_size)
    run.train_data.load_state_dict(data_state)
    with torch.random.fork_rng(), torch.no_grad():
        key = run.executor.routing_key(0, 0, inputs.shape[0])
        student_logits = run.model.train()(inputs, routing_key=key).logits
        teacher_logits = model_t(inputs, routing_key=teacher_routing_key(key)).logits
        expected_kd = float(kd_loss(student_logits, teacher_logits, temperature=2.0))

    run.fit()
    for name, value in model_t.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model_t.parameters())
    records = [r for r in read_records(tmp_path / "run") if r["type"] == "train"]
    assert records[0]["kd_loss"] == pytest.approx(expected_kd, rel=1e-5)
    for r in records:
        assert r["kd_loss"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["lm_loss"] + 2.0 * r["kd_loss"] + 0.01 * r["aux_loss"], rel=1e-6)
    assert "KD Loss:" in capsys.readouterr().out
    ckpt = load_checkpoint(str(tmp_path / "run"))
    assert ckpt.model_state.keys() == run.model.state_dict().keys()  # the student's weights only
    assert ckpt.extra["distill"] == {"stopped": False}


def staged_config(tmp_path, teacher_dir, save, **training) -> Config:
    """Noisy gating, random token selection and dropout draw from the torch RNG, as in test_trainer's resume test;
    2 micro-batches per step; KD for 3 iterations; checkpoints at 2 (distilling), 4 (stopped) and 6."""
    cfg = student_config(tmp_path, teacher_dir, save=save, micro_batch_size=2, global_batch_size=4, train_iters=6,
                         save_interval=2, lr_warmup_iters=2, **training)
    cfg.moe.noisy_gate_policy, cfg.moe.use_rts, cfg.moe.drop_tokens = "RSample", True, True
    cfg.model.hidden_dropout = 0.1
    cfg.model.num_layers, cfg.moe.num_experts = 1, [2]  # a shallower student with fewer experts
    cfg.distill.stop_iter = 3
    return cfg


def test_staged_distillation_stops_at_its_iteration_and_stays_stopped_across_resume(teacher, tmp_path, monkeypatch):
    run_a = Trainer(staged_config(tmp_path, teacher, "a"), quiet=True)
    result_a = run_a.fit()
    assert run_a.distiller.stopped and run_a.distiller.teacher is None
    kd = [r["kd_loss"] for r in read_records(tmp_path / "a") if r["type"] == "train"]
    assert all(value > 0 for value in kd[:3]) and kd[3:] == [None, None, None]
    assert load_checkpoint(str(tmp_path / "a"), 2).extra["distill"] == {"stopped": False}
    assert load_checkpoint(str(tmp_path / "a"), 4).extra["distill"] == {"stopped": True}

    # B resumes while still distilling and crosses the stop itself: bitwise the same losses and weights
    run_b = Trainer(staged_config(tmp_path, teacher, "b", load=str(tmp_path / "a" / "iter_0000002")), quiet=True)
    assert not run_b.distiller.stopped
    assert run_b.fit().losses == result_a.losses[2:]
    for name, value in run_a.model.state_dict().items():
        assert torch.equal(value, run_b.model.state_dict()[name]), name

    # C resumes after the stop without --kd-stop-iter: the checkpoint keeps distillation off
    cfg_c = staged_config(tmp_path, teacher, "c", load=str(tmp_path / "a" / "iter_0000004"))
    cfg_c.distill.stop_iter = None
    run_c = Trainer(cfg_c, quiet=True)
    assert run_c.distiller.stopped and run_c.distiller.teacher is None
    assert run_c.fit().losses == result_a.losses[4:]

    # control: were the stop not restored, C would distil again and its losses would differ
    monkeypatch.setattr(Distiller, "load_state_dict", lambda self, state: None)
    cfg_d = staged_config(tmp_path, teacher, "d", load=str(tmp_path / "a" / "iter_0000004"))
    cfg_d.distill.stop_iter = None
    assert Trainer(cfg_d, quiet=True).fit().losses != result_a.losses[4:]


def test_student_init_from_teacher_and_a_dense_student(teacher, tmp_path):
    cfg = student_config(tmp_path, teacher, train_iters=2, save=None)
    cfg.model.num_layers, cfg.moe.num_experts = 1, [2]
    cfg.distill.student_init_from_teacher = True
    run = Trainer(cfg, quiet=True)
    student, model_t = run.model.state_dict(), run.distiller.teacher.state_dict()
    # 1 of 2 layers: the last teacher layer; the router of 2 experts cannot take the teacher's 4
    assert torch.equal(student["tok_emb.weight"], model_t["tok_emb.weight"])
    assert torch.equal(student["pos_emb.weight"], model_t["pos_emb.weight"])
    assert torch.equal(student["blocks.0.attn.qkv.weight"], model_t["blocks.1.attn.qkv.weight"])
    assert torch.equal(student["blocks.0.norm2.weight"], model_t["blocks.1.norm2.weight"])
    experts = [name for name in student if name.startswith("blocks.0.ffn.")]  # router and expert weights
    assert experts and all(student[n].shape != model_t[n.replace("blocks.0", "blocks.1")].shape for n in experts)

    dense = student_config(tmp_path, teacher, train_iters=2, save="dense")
    dense.moe.num_experts = [1]
    result = Trainer(dense, quiet=True).fit()
    assert all(math.isfinite(loss) for loss in result.losses)
    assert all(r["kd_loss"] > 0 for r in read_records(tmp_path / "dense") if r["type"] == "train")


def test_mismatched_teacher_is_a_one_line_error(teacher, tmp_path):
    def error_for(change, kind=ConfigError) -> str:
        cfg = student_config(tmp_path, teacher, save=None)
        change(cfg)
        with pytest.raises(kind) as error:
            Trainer(cfg, quiet=True)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "--num-layers-teacher 5 (checkpoint: 2)" in error_for(lambda c: setattr(c.distill, "num_layers_teacher", 5))
    assert "--num-experts-teacher 8" in error_for(lambda c: setattr(c.distill, "num_experts_teacher", [8]))
    assert "--hidden-size-teacher 64" in error_for(lambda c: setattr(c.distill, "hidden_size_teacher", 64))
    assert "different tokenizer" in error_for(lambda c: setattr(c.data, "tokenizer_type", "bpe"))
    assert "--seq-length is 32" in error_for(lambda c: setattr(c.model, "seq_length", 32))
    assert "does not exist" in error_for(lambda c: setattr(c.distill, "load_teacher", str(tmp_path / "none")),
                                         FileNotFoundError)
    cfg = student_config(tmp_path, teacher, save=None)  # flags that agree with the checkpoint are accepted
    cfg.distill.num_layers_teacher, cfg.distill.num_experts_teacher = 2, [4, 4]
    cfg.distill.hidden_size_teacher, cfg.distill.num_attention_heads_teacher = 32, 4
    assert Trainer(cfg, quiet=True).distiller is not None


def test_distillation_flags(tmp_path, capsys):
    cfg = parse_train_args(["--mos", "--load-teacher", "runs/teacher", "--num-layers-teacher", "24",
                            "--hidden-size-teacher", "2048", "--num-attention-heads-teacher", "16",
                            "--num-experts-teacher", "[32, 64]", "--kd-temp", "2", "--kd-alpha-ce", "0.5",
                            "--kd-beta-ce", "3", "--kd-stop-iter", "400", "--student-init-from-teacher"])
    d = cfg.distill
    assert (d.enabled, d.load_teacher, d.num_layers_teacher, d.hidden_size_teacher) == (True, "runs/teacher", 24, 2048)
    assert (d.num_attention_heads_teacher, d.num_experts_teacher, d.temperature) == (16, [32, 64], 2.0)
    assert (d.alpha_ce, d.beta_ce, d.stop_iter, d.student_init_from_teacher) == (0.5, 3.0, 400, True)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert parse_train_args(["--kd", "--load-teacher", "t"]).distill.enabled
    cfg.validate()
    for argv, needle in ((["--mos"], "--load-teacher"),
                         (["--kd", "--load-teacher", "t", "--kd-temp", "0"], "--kd-temp"),
                         (["--kd-stop-iter", "5"], "without --mos or --kd"),
                         (["--load-teacher", "t"], "without --mos or --kd")):
        with pytest.raises(ConfigError, match=needle) as error:
            parse_train_args(argv).validate()
        assert "\n" not in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--mos", "--no-progress-bar"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "--load-teacher" in err


def test_configs_saved_before_distillation_existed_still_load():
    data = Config().to_dict()
    del data["distill"]
    assert Config.from_dict(data).distill.enabled is False


def test_distillation_under_pipeline_parallelism_matches_one_process(teacher, tmp_path):
    """2 pipeline stages (gloo): the last stage adds the KD term of each micro-batch in the schedule's loss;
    losses (KD included) and the final eval loss equal the single-process run's."""
    from tests.helpers import parallel_config, reference, run_parallel

    cfg = parallel_config(tmp_path, style="gpt", pipeline_parallel_size=2)
    cfg.distill.enabled, cfg.distill.load_teacher = True, teacher
    cfg.distill.alpha_ce, cfg.distill.beta_ce, cfg.distill.temperature = 0.5, 2.0, 2.0
    losses, eval_loss, _ = reference(cfg)
    undistilled = Config.from_dict(cfg.to_dict())
    undistilled.distill.enabled, undistilled.distill.load_teacher = False, None
    assert abs(reference(undistilled)[0][0] - losses[0]) > 0.1  # the KD term is in the loss
    for rank, result in run_parallel(cfg, 2).items():
        assert result["losses"] == pytest.approx(losses, abs=1e-5), rank
        assert result["eval"] == pytest.approx(eval_loss, abs=1e-5), rank
