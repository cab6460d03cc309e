"""Mixture-of-Students: knowledge distillation from a frozen teacher checkpoint (DeepSpeed-MoE's MoS).

The teacher is a plain `GPT` rebuilt from its checkpoint, exactly as a student is built, so whatever shards a
student can shard a teacher the same way: built on the meta device, cut to what this rank needs (the last
pipeline stage, which holds the logits, runs the whole depth; an earlier stage holds only the layers its
student stage is initialised from, or none) and to its tensor- and expert-parallel pieces, and only those read
from the checkpoint. It runs in eval mode (eval capacity factor, no dropout) under `torch.no_grad()` on the
student's batch, is never a submodule of the student (so it is neither optimised nor saved with it), and is
dropped once `--kd-stop-iter` is reached (staged KD).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moetrain.checkpoint import (
    CheckpointReader,
    load_model_into,
    read_model_config,
    resolve_checkpoint_dir,
)
from moetrain.config import Config, ConfigError, MoEConfig
from moetrain.data import Tokenizer
from moetrain.loss import LossFunction
from moetrain.model import GPT
from moetrain.moe.routing_noise import teacher_routing_key
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.parallelize import parallelize
from moetrain.parallel.pieces import Piece, model_pieces
from moetrain.parallel.pipeline import stage_layers


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per token, averaged over tokens.

    T^2 keeps the gradient scale of the soft targets independent of T (Hinton et al.); this is
    Megatron-DeepSpeed's KLDivLoss(batchmean) / seq_length.
    """
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
    return temperature ** 2 * kl / student.shape[0]


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (same model vocabulary/merges and special tokens)."""
    first, second = json.loads(a.to_json()), json.loads(b.to_json())
    return a.vocab_size == b.vocab_size and all(
        first.get(key) == second.get(key) for key in ("model", "added_tokens", "pre_tokenizer"))


def teacher_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer each student layer starts from: evenly spaced, the first and last always kept.

    Student layer i takes teacher layer round(i * (L_teacher - 1) / (L_student - 1)), halves rounded up: 21 of 24
    layers drops teacher layers 4, 11 and 19 (0-based); equal depths map i to i; a 1-layer student takes the last.
    """
    if student_layers == 1:
        return [teacher_layers - 1]
    span, gaps = teacher_layers - 1, student_layers - 1
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(student_layers)]  # i * span / gaps, rounded half up


def _teacher_flag_mismatches(cfg: Config, teacher_cfg: Config) -> list[str]:
    """The --*-teacher flags given that disagree with the teacher checkpoint."""
    dc, tm = cfg.distill, teacher_cfg.model
    wrong = [f"{flag} {given} (checkpoint: {actual})" for flag, given, actual in (
        ("--num-layers-teacher", dc.num_layers_teacher, tm.num_layers),
        ("--hidden-size-teacher", dc.hidden_size_teacher, tm.hidden_size),
        ("--num-attention-heads-teacher", dc.num_attention_heads_teacher, tm.num_attention_heads),
    ) if given is not None and given != actual]
    if dc.num_experts_teacher is not None:
        actual = teacher_cfg.experts_per_layer()
        given_moe = MoEConfig(num_experts=dc.num_experts_teacher, expert_interval=teacher_cfg.moe.expert_interval)
        try:
            matches = given_moe.experts_per_layer(tm.num_layers) == actual
        except ConfigError:  # a list whose length does not fit the teacher's MoE layers
            matches = False
        if not matches:
            wrong.append(f"--num-experts-teacher {' '.join(map(str, dc.num_experts_teacher))} "
                         f"(checkpoint: {[count for count in actual if count] or 'dense'})")
    return wrong


class Distiller:
    """The teacher of one training run and the distillation term it adds to the student's loss."""

    teacher: GPT | None  # what this rank holds of it; None where it holds none, or once released

    def __init__(self, cfg: Config, tokenizer: Tokenizer, device: torch.device, state: ParallelState,
                 log: Callable[[str], None] = print) -> None:
        """Check the teacher against the student's flags and tokenizer, then read what this rank holds of it."""
        self.cfg, self.log = cfg.distill, log
        load_dir = self.cfg.load_teacher
        checkpoint = resolve_checkpoint_dir(load_dir)  # one iteration for the config and the weights
        self.teacher_cfg, teacher_tokenizer = read_model_config(checkpoint)
        wrong = _teacher_flag_mismatches(cfg, self.teacher_cfg)
        if wrong:
            raise ConfigError(f"teacher checkpoint {load_dir} does not match {', '.join(wrong)}; "
                              f"drop these flags or fix them")
        if not same_vocabulary(tokenizer, teacher_tokenizer):
            raise ConfigError(f"teacher {load_dir} uses a different tokenizer (vocab {teacher_tokenizer.vocab_size}) "
                              f"than the student (vocab {tokenizer.vocab_size}); distil with the teacher's data and "
                              f"--tokenizer-type so both share one vocabulary")
        if self.teacher_cfg.model.positions() < cfg.model.seq_length:
            raise ConfigError(f"teacher {load_dir} handles {self.teacher_cfg.model.positions()} tokens per sequence, "
                              f"the student's --seq-length is {cfg.model.seq_length}; use at most the teacher's")
        heads = self.teacher_cfg.model.num_attention_heads
        if heads % state.tp:
            raise ConfigError(f"the teacher's {heads} attention heads do not split over --tensor-parallel-size "
                              f"{state.tp}; use a size that divides both models' head counts")
        self.initialises_student = self.cfg.student_init_from_teacher and not cfg.training.load
        with torch.random.fork_rng(devices=[]):  # building the teacher must not shift the student's RNG stream
            with torch.device("meta"):
                teacher = GPT(self.teacher_cfg.model, self.teacher_cfg.moe, seed=0)
            counts = teacher.parameter_counts()  # of the whole teacher, before it is cut
            layers = self._layers_held(cfg.model.num_layers, state)
            self.teacher = None if layers is None else _read_teacher(teacher, layers, checkpoint, state, device)
        self.stopped = False
        tm = self.teacher_cfg.model
        experts = [count for count in self.teacher_cfg.experts_per_layer() if count] or "dense"
        stop = f", until iteration {self.cfg.stop_iter}" if self.cfg.stop_iter is not None else ""
        self.log(f"teacher: {load_dir}, {tm.num_layers} layers, hidden {tm.hidden_size}, experts {experts}, "
                 f"{counts['total'] / 1e6:.2f}M parameters | loss = {self.cfg.alpha_ce} x LM + {self.cfg.beta_ce} x "
                 f"KD (T = {self.cfg.temperature}){stop}")

    def _layers_held(self, student_layers: int, state: ParallelState) -> range | None:
        """The teacher layers this rank holds: all on the last pipeline stage, which runs the teacher; on an
        earlier stage, the run its student blocks are initialised from (see teacher_layer_map), or none."""
        teacher_layers = self.teacher_cfg.model.num_layers
        if state.is_last_stage:
            return range(teacher_layers)
        if not self.initialises_student:
            return None
        sources = teacher_layer_map(student_layers, teacher_layers)
        stage = stage_layers(student_layers, state.pp, state.pp_rank)
        return range(sources[stage.start], sources[stage.stop - 1] + 1)  # the map never decreases

    def init_student(self, student: GPT) -> tuple[int, int]:
        """Copy the teacher's weights into the student (see teacher_layer_map); return (copied, kept) counts.

        Both models are whole or this rank's pieces, sharded alike (a pipeline stage's teacher holds the layers
        its blocks take). A tensor is copied where the student has the same global name (after renumbering the
        blocks), global shape and piece (the position table is cut to the student's length); the rest (a
        different expert count or FFN kind in a layer) keep their init.
        """
        if self.teacher is None:
            raise ConfigError("--student-init-from-teacher needs the teacher, but distillation has stopped")
        if student.cfg.hidden_size != self.teacher_cfg.model.hidden_size:
            raise ConfigError(f"--student-init-from-teacher needs the teacher's hidden size "
                              f"{self.teacher_cfg.model.hidden_size}, the student has {student.cfg.hidden_size}")
        layers = teacher_layer_map(student.cfg.num_layers, self.teacher_cfg.model.num_layers)
        teacher_pieces = {name: (tensor, piece) for name, tensor, piece in model_pieces(self.teacher).values()}
        copied = kept = 0
        with torch.no_grad():
            for name, tensor, piece in model_pieces(student).values():
                source = name
                if name.startswith("blocks."):
                    _, index, rest = name.split(".", 2)
                    source = f"blocks.{layers[int(index)]}.{rest}"
                value, source_piece = teacher_pieces.get(source, (None, None))
                if name == "pos_emb.weight" and value is not None:  # whole; the student's sequences are shorter
                    value, source_piece = value[:piece.shape[0]], Piece(piece.shape)
                part = piece.cut_from(value, source_piece) if value is not None else None
                if part is not None and part.shape == tensor.shape:  # (a ZeRO-3 shard is cut from the teacher's)
                    tensor.copy_(part)
                    copied += 1
                else:
                    kept += 1
        self.log(f"student initialised from teacher layers {layers}: {copied} tensors copied, "
                 f"{kept} kept their random init")
        return copied, kept

    def active(self, iteration: int) -> bool:
        """Whether the step after `iteration` distils; reaching --kd-stop-iter frees the teacher for good."""
        if not self.stopped and self.cfg.stop_iter is not None and iteration >= self.cfg.stop_iter:
            self.stop()
            self.log(f"distillation stopped at iteration {iteration} (--kd-stop-iter); teacher released")
        return not self.stopped

    def stop(self) -> None:
        self.stopped = True
        self.release_teacher()

    def release_teacher(self) -> None:
        """Free the teacher's memory (a stopped distillation, or the part an earlier pipeline stage initialised
        its student from)."""
        self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def loss(self, inputs: Tensor, student_logits: Tensor, routing_key: Tensor | None = None) -> Tensor:
        """The unweighted distillation loss of one micro-batch; the teacher's routing noise (top-2 sampling
        draws in eval mode too) is keyed by the student's `routing_key`, so every layout distils alike."""
        with torch.no_grad():
            key = None if routing_key is None else teacher_routing_key(routing_key)
            teacher_logits = self.teacher(inputs, routing_key=key).logits
        return kd_loss(student_logits, teacher_logits, self.cfg.temperature)

    def state_dict(self) -> dict[str, bool]:
        return {"stopped": self.stopped}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        """A run that had stopped distilling stays stopped when resumed."""
        if state["stopped"] and not self.stopped:
            self.stop()


def _read_teacher(teacher: GPT, layers: range, checkpoint: str, state: ParallelState, device: torch.device) -> GPT:
    """The (meta-device) teacher cut to `layers` and this rank's tensor- and expert-parallel pieces, materialised
    on `device` and read from `checkpoint` piece by piece; frozen, in eval mode."""
    if len(layers) < teacher.cfg.num_layers:
        teacher = teacher.pipeline_stage(layers)
    parallelize(teacher, state, device)
    load_model_into(CheckpointReader(checkpoint, verify_extra_files=False, optimizer=False), teacher)
    return teacher.requires_grad_(False).eval()


class DistillationLoss(LossFunction):
    """While the teacher is active, alpha * LM + beta * KD takes the LM loss's place (Megatron-DeepSpeed's MoS)."""

    def __init__(self, aux_loss_coeff: float, z_loss_coeff: float, distiller: Distiller) -> None:
        super().__init__(aux_loss_coeff, z_loss_coeff)
        self.distiller = distiller

    def distilling(self, iteration: int | None) -> bool:
        return iteration is not None and self.distiller.active(iteration)

    def kd_loss(self, inputs: Tensor, logits: Tensor, routing_key: Tensor | None = None) -> Tensor:
        return self.distiller.loss(inputs, logits, routing_key)

    def lm_term(self, lm_loss: Tensor, kd_loss: Tensor | None) -> Tensor:
        if kd_loss is None:
            return lm_loss
        return self.distiller.cfg.alpha_ce * lm_loss + self.distiller.cfg.beta_ce * kd_loss
