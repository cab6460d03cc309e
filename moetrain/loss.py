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


@dataclass
class LossParts:
    """One micro-batch's loss and the unscaled terms it is made of (kd_loss: None when not distilling)."""

    loss: Tensor
    lm_loss: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    kd_loss: Tensor | None = None

    def logged(self) -> Tensor:
        """[loss, lm_loss, aux_loss, z_loss(, kd_loss)], detached, in fp32."""
        kd = [self.kd_loss] if self.kd_loss is not None else []
        return torch.stack([self.loss, self.lm_loss, self.aux_loss, self.z_loss, *kd]).detach().float()


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
