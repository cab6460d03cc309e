"""Routing record and replay (--record-routing / --replay-routing): a record made under data parallelism
replays exactly under expert parallelism and in one process, after the router's weights changed (another
seed), in training and evaluation; gradients still reach the router; a missing or short record is one line
naming the step."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from moetrain.checkpoint import load_model
from moetrain.train.monitor.routing_record import RoutingRecordError, read_routing, record_or_replay_generation
from moetrain.train.trainer import Trainer
from tests.helpers import parallel_config, run_ranks

STEPS = 3


def routing_config(tmp_path, record=None, replay=None, seed=1234, **parallel):
    cfg = parallel_config(tmp_path, **parallel)
    cfg.training.seed, cfg.training.eval_interval = seed, 2  # evaluations at step 2 and at the end
    cfg.monitor.record_routing = str(tmp_path / record) if record else None
    cfg.monitor.replay_routing = str(tmp_path / replay) if replay else None
    return cfg


def _fit(cfg) -> None:
    Trainer(cfg, quiet=True).fit()


def choices(root) -> dict[tuple[str, int, int], np.ndarray]:
    """(phase, step, layer) -> the recorded [tokens, k] choices, every token covered."""
    steps = [("train", step) for step in range(STEPS)] + [("eval", 2), ("eval", STEPS)]
    result = {}
    for phase, step in steps:
        for layer, (table, covered) in read_routing(str(root), phase, step).items():
            assert covered.all()
            result[(phase, step, layer)] = table
    return result


def assert_same_choices(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_record_under_dp2_replays_under_ep2_and_one_process(tmp_path):
    run_ranks(_fit, routing_config(tmp_path, record="dp2"), 2)
    recorded = choices(tmp_path / "dp2")
    assert {key[2] for key in recorded} == {1, 3} and len(recorded[("train", 0, 1)]) == 8 * 16  # batch x seq
    # other router weights (seed), so only the replay can make the choices equal
    _fit(routing_config(tmp_path, record="own", seed=7))
    assert any(not np.array_equal(recorded[key], table) for key, table in choices(tmp_path / "own").items())
    run_ranks(_fit, routing_config(tmp_path, record="ep2", replay="dp2", seed=7, expert_parallel_size=2), 2)
    assert_same_choices(choices(tmp_path / "ep2"), recorded)
    _fit(routing_config(tmp_path, record="one", replay="dp2", seed=7))
    assert_same_choices(choices(tmp_path / "one"), recorded)


def test_replay_keeps_the_choices_after_the_router_changed_and_trains_the_router(tmp_path):
    _fit(routing_config(tmp_path, record="first"))
    trainer = Trainer(routing_config(tmp_path, record="again", replay="first"), quiet=True)
    routers = [moe.router for _, moe in trainer.model.moe_layers()]
    with torch.no_grad():
        for router in routers:
            router.wg.weight.normal_()  # other scores: without the replay other experts win
    before = [router.wg.weight.detach().clone() for router in routers]
    trainer.fit()
    assert_same_choices(choices(tmp_path / "again"), choices(tmp_path / "first"))
    assert all(not torch.equal(router.wg.weight, old) for router, old in zip(routers, before))  # gradients flowed


def test_a_missing_or_short_record_is_one_line_naming_the_step(tmp_path):
    _fit(routing_config(tmp_path, record="rec"))
    shutil.rmtree(tmp_path / "rec" / "train" / "00000001")
    with pytest.raises(RoutingRecordError, match=r"no record of train step 1 ") as error:
        _fit(routing_config(tmp_path, replay="rec"))
    assert "\n" not in str(error.value)
    short = routing_config(tmp_path, replay="rec")
    short.model.seq_length = 32  # twice the tokens of the recorded steps
    with pytest.raises(RoutingRecordError, match=r"record of train step 0 is short: MoE layer 1 has no choice for "
                                                 r"token 128;") as error:
        _fit(short)
    assert "\n" not in str(error.value)


def test_generate_records_and_replays_its_forwards(tmp_path):
    cfg = routing_config(tmp_path)
    cfg.training.save = str(tmp_path / "model")
    _fit(cfg)
    prompt = torch.tensor([[5, 6, 7]])
    recorded = {}
    for name, replay in (("gen", None), ("again", "gen")):
        model, _, _ = load_model(str(tmp_path / "model"))
        if replay:
            with torch.no_grad():
                for _, moe in model.moe_layers():
                    moe.router.wg.weight.normal_()  # other scores: without the replay other experts win
        record_or_replay_generation(model, str(tmp_path / name), replay and str(tmp_path / replay), seed=1)
        model.generate(prompt, 3, temperature=0)
        recorded[name] = {(step, layer): table for step in range(3)
                          for layer, (table, _) in read_routing(str(tmp_path / name), "generate", step).items()}
    assert [len(recorded["gen"][(step, 1)]) for step in range(3)] == [3, 4, 5]  # one forward per new token
    assert_same_choices(recorded["again"], recorded["gen"])
