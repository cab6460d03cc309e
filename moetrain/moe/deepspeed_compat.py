"""Bring DeepSpeed-MoE weights over: `deepspeed.moe.layer.MoE.state_dict()` -> moetrain `MoE`."""

from __future__ import annotations

from torch import Tensor

_DS_GATE = "deepspeed_moe.gate.wg.weight"
_DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."


def from_deepspeed_state_dict(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename a DeepSpeed MoE layer's keys to the keys of `MoE` built with the same expert module.

    Gate -> `router.wg.weight`; expert i -> `experts.experts.{i}.*`; the PR-MoE residual MLP
    (`mlp.*`) and `coefficient.*` keep their names. `prefix` selects one layer inside a larger
    state dict (e.g. "layers.3.mlp."); keys outside it are ignored. Unknown keys under the prefix
    raise, so nothing is silently lost.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == _DS_GATE:
            converted["router.wg.weight"] = value
        elif name.startswith(_DS_EXPERTS):
            converted["experts.experts." + name[len(_DS_EXPERTS):]] = value
        elif name.startswith(("mlp.", "coefficient.")):
            converted[name] = value
        else:
            raise ValueError(
                f"unrecognised DeepSpeed MoE key {key!r}; expected the gate "
                f"({_DS_GATE}), experts ({_DS_EXPERTS}*), mlp.* or coefficient.*"
            )
    if "router.wg.weight" not in converted:
        raise ValueError(
            f"no DeepSpeed gate weight '{prefix}{_DS_GATE}' in the state dict; pass the "
            "state_dict() of a deepspeed.moe.layer.MoE (and the prefix of the layer inside a model)"
        )
    return converted
