"""Each load-balancing type's logged loss (balance/<type> in metrics.jsonl) under data and pipeline
parallelism equals one process's: averaged over data parallel, summed over the pipeline stages' layers,
as aux_loss is. global_aux_loss makes the data-parallel run equal one process only when that process's
micro-batches hold both ranks' rows (its counts are the data-parallel batch's)."""

from __future__ import annotations

import pytest

from moetrain.config import Config
from moetrain.train.trainer import Trainer
from tests.helpers import parallel_config, read_records, run_parallel

TYPES, COEFFS = ["seq_aux_loss", "global_aux_loss"], [1.0, 0.5]


@pytest.mark.parametrize("layout", ["data_parallel_2", "pipeline_parallel_2"])
def test_balance_losses_under_parallelism_equal_one_process(tmp_path, layout):
    cfg = parallel_config(tmp_path, pipeline_parallel_size=2 if layout == "pipeline_parallel_2" else 1)
    cfg.moe.load_balancing_type, cfg.moe.load_balancing_coeffs = TYPES, COEFFS
    cfg.moe.z_loss_coeff = 0.01
    cfg.training.save = str(tmp_path / "parallel")
    run_parallel(cfg, world=2)

    single = Config.from_dict(cfg.to_dict())
    single.parallel.pipeline_parallel_size = 1
    single.training.save = str(tmp_path / "single")
    if layout == "data_parallel_2":  # one micro-batch = both ranks' rows, so as many micro-batches per step
        single.training.micro_batch_size *= 2
    Trainer(single, quiet=True).fit()

    got, want = ([r for r in read_records(tmp_path / run) if r["type"] == "train"] for run in ("parallel", "single"))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        for key in ("loss", "aux_loss", "z_loss", *(f"balance/{name}" for name in TYPES)):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["balance/seq_aux_loss"] + 0.5 * a["balance/global_aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-6)
        assert a["balance/global_aux_loss"] > 1.0  # 2 MoE layers, ~1 each: the stages' layers are summed
