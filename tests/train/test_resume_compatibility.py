"""A resume compares the checkpoint's model config and tokenizer with the run's and refuses a difference in one
line; --finetune loads only the weights (iteration 0, fresh optimizer), --no-load-optim and --no-load-rng leave
out the optimizer state and the RNG states."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from moetrain.checkpoint import load_checkpoint
from moetrain.config import ConfigError, ModelConfig, MoEConfig
from moetrain.train.compatibility import ARCHITECTURE, MAY_CHANGE
from moetrain.train.trainer import Trainer
from tests.helpers import tiny_config


@pytest.fixture
def trained(tmp_path):
    """A 4-head byte-tokenizer run saved at iteration 2 with its RNG moved on from the seed's state."""
    trainer = Trainer(tiny_config(tmp_path, train_iters=2), quiet=True)
    torch.rand(7)
    trainer.fit()
    return tmp_path / "run"


def resumed(tmp_path, run, *, model=None, data=None, **training) -> Trainer:
    cfg = tiny_config(tmp_path, save="again", load=str(run), train_iters=4, **training)
    for key, value in (model or {}).items():
        setattr(cfg.model, key, value)
    for key, value in (data or {}).items():
        setattr(cfg.data, key, value)
    return Trainer(cfg, quiet=True)


@pytest.mark.parametrize("heads", [8, 1])
def test_another_head_count_is_refused_in_one_line(tmp_path, trained, heads):
    with pytest.raises(ConfigError) as error:
        resumed(tmp_path, trained, model={"num_attention_heads": heads})
    message = str(error.value)
    assert f"--num-attention-heads 4 (checkpoint) vs {heads} (this run)" in message and "--finetune" in message
    assert "\n" not in message


@pytest.mark.parametrize(("model", "flag"), [({"qk_norm": "head"}, "--qk-norm None (checkpoint) vs head"),
                                           ({"num_query_groups": 2}, "--num-query-groups 4 (checkpoint) vs 2")])
def test_other_attention_options_are_refused_in_one_line(tmp_path, trained, model, flag):
    """Options that keep every shape (the rotated share of each head) or change the attention's function."""
    with pytest.raises(ConfigError, match=re.escape(flag)):
        resumed(tmp_path, trained, model=model)


def test_another_rotary_share_is_refused_though_every_shape_is_the_same(tmp_path):
    cfg = tiny_config(tmp_path, train_iters=2)
    cfg.model.style = "llama"
    Trainer(cfg, quiet=True).fit()
    with pytest.raises(ConfigError, match=re.escape("--rotary-percent 8 (checkpoint) vs 4 (this run)")):
        resumed(tmp_path, tmp_path / "run", model={"style": "llama", "rotary_percent": 0.5})


def test_another_tokenizer_of_the_same_size_is_refused(tmp_path, trained):
    with pytest.raises(ConfigError, match=r"the tokenizer \(257 tokens in the checkpoint's tokenizer.json, 257 in "
                                          r"this run's, ids differ\)"):
        resumed(tmp_path, trained, data={"tokenizer_type": "bpe", "vocab_size": 257})


@pytest.mark.parametrize("finetune", [False, True])
def test_untied_output_weights_are_refused_naming_the_flag(tmp_path, trained, finetune):
    with pytest.raises(ConfigError, match="ties its output layer to the embedding and this run does not; drop "
                                          "--untie-embeddings-and-output-weights"):
        resumed(tmp_path, trained, model={"tie_embeddings": False}, finetune=finetune)


def test_finetune_loads_the_weights_into_another_head_count_with_everything_else_fresh(tmp_path, trained):
    trainer = resumed(tmp_path, trained, model={"num_attention_heads": 8}, finetune=True)
    saved = load_checkpoint(str(trained)).model_state
    assert trainer.iteration == 0 and not trainer.optimizer.state
    assert all(torch.equal(value, saved[name]) for name, value in trainer.model.state_dict().items())
    assert trainer.train_data.state_dict() == Trainer(tiny_config(tmp_path, save=None), quiet=True) \
        .train_data.state_dict()


def test_no_load_optim_and_no_load_rng_leave_out_only_what_they_name(tmp_path, trained):
    full = resumed(tmp_path, trained)
    full_rng = torch.get_rng_state()
    assert full.iteration == 2 and full.optimizer.state
    without_optim = resumed(tmp_path, trained, load_optim=False)
    assert without_optim.iteration == 2 and not without_optim.optimizer.state
    assert torch.equal(torch.get_rng_state(), full_rng)
    without_rng = resumed(tmp_path, trained, load_rng=False)
    assert without_rng.iteration == 2 and without_rng.optimizer.state
    assert not torch.equal(torch.get_rng_state(), full_rng)


def test_every_model_and_moe_field_is_compared_or_declared_free_to_change():
    """A new model or MoE option must say whether a resume compares it: in an ARCHITECTURE entry's fields, or in
    MAY_CHANGE with the reason (the resume check once missed the attention options added beside it)."""
    fields = {f"{section}.{f.name}" for section, kind in (("model", ModelConfig), ("moe", MoEConfig))
              for f in dataclasses.fields(kind)}
    compared = {name for entry in ARCHITECTURE.values() for name in entry.fields}
    assert compared.isdisjoint(MAY_CHANGE)
    assert fields == compared | set(MAY_CHANGE)  # nothing unclassified, nothing named that does not exist
