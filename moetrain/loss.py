"""The training loss, composed in one place for the local and the pipeline path.

loss = LM term + aux_loss_coeff * aux + z_loss_coeff * z, where the LM term is the LM loss, or, while
distilling (moetrain.train.distill.DistillationLoss), alpha * LM + beta * KD. Under pipeline
parallelism the router terms of each stage reach the gradient at that stage (`router_loss`), and
the last stage's schedule loss is `compute_loss` of its final hidden states (router terms zero there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moetrain.model import ModelOutput


@dataclass(frozen=True)
class StepLosses:
    """Named scalar losses held as one stacked fp32 tensor: `values[i]` is the loss called `names[i]`.

    A step's logged losses travel as one of these from the loss function (`LossParts.logged`) through the
    executor and its all-reduces (of `values`, in place) to the trainer, whose one `to_host()` per step is
    their only host copy. Logging one more loss is one more name where it is computed.
    """

    names: tuple[str, ...]
    values: Tensor  # [len(names)] float32

    @classmethod
    def of(cls, named: dict[str, Tensor]) -> StepLosses:
        """From scalar tensors (detached, in fp32), in the order given."""
        return cls(tuple(named), torch.stack(list(named.values())).detach().float())

    @classmethod
    def mean(cls, parts: list[StepLosses]) -> StepLosses:
        """The mean of losses with the same names (a step's micro-batches)."""
        return cls(parts[0].names, torch.stack([part.values for part in parts]).sum(0) / len(parts))

    def extended(self, more: StepLosses) -> StepLosses:
        """These losses followed by `more` (on this one's device)."""
        return StepLosses(self.names + more.names, torch.cat([self.values, more.values.to(self.values.device)]))

    def get(self, name: str) -> Tensor | None:
        """The loss called `name` (a 0-d view of `values`), None if there is none."""
        return self.values[self.names.index(name)] if name in self.names else None

    def to_host(self) -> dict[str, float]:
        """name -> value, with one device-to-host copy."""
        return dict(zip(self.names, self.values.tolist(), strict=True))


@dataclass
class LossParts:
    """One micro-batch's loss and the unscaled terms it is made of (kd_loss: None when not distilling)."""

    loss: Tensor
    lm_loss: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    kd_loss: Tensor | None = None

    def logged(self) -> StepLosses:
        """loss, lm_loss, aux_loss, z_loss(, kd_loss while distilling)."""
        kd = {"kd_loss": self.kd_loss} if self.kd_loss is not None else {}
        return StepLosses.of({"loss": self.loss, "lm_loss": self.lm_loss, "aux_loss": self.aux_loss,
                              "z_loss": self.z_loss, **kd})


class LossFunction:
    """LM loss + aux_loss_coeff * sum(l_aux) + z_loss_coeff * sum(z-loss)."""

    def __init__(self, aux_loss_coeff: float, z_loss_coeff: float) -> None:
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff

    def distilling(self, iteration: int | None) -> bool:
        """Whether the step after `iteration` adds a distillation term (never in evaluation: None)."""
        return False

    def kd_loss(self, inputs: Tensor, logits: Tensor, routing_key: Tensor | None = None) -> Tensor:
        raise NotImplementedError("this loss does not distil")

    def lm_term(self, lm_loss: Tensor, kd_loss: Tensor | None) -> Tensor:
        return lm_loss

    def router_loss(self, aux_loss: Tensor, z_loss: Tensor) -> Tensor:
        """The weighted router terms, as one pipeline stage adds them to the gradient."""
        return self.aux_loss_coeff * aux_loss + self.z_loss_coeff * z_loss

    def total(self, lm_loss: Tensor, aux_loss: Tensor, z_loss: Tensor, kd_loss: Tensor | None = None) -> Tensor:
        return self.lm_term(lm_loss, kd_loss) + self.aux_loss_coeff * aux_loss + self.z_loss_coeff * z_loss

    def compute_loss(self, output: ModelOutput, batch: tuple[Tensor, Tensor], iteration: int | None) -> LossParts:
        """The loss of one micro-batch (inputs, targets) at training step `iteration` (None: evaluation)."""
        inputs, targets = batch
        lm_loss = output.lm_loss if output.lm_loss is not None else output.loss_of(targets)
        kd = self.kd_loss(inputs, output.logits, output.routing_key) if self.distilling(iteration) else None
        return LossParts(self.total(lm_loss, output.aux_loss, output.z_loss, kd), lm_loss, output.aux_loss,
                         output.z_loss, kd)
