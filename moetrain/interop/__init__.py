"""Moving models in and out of moetrain: Hugging Face export/import, Megatron-DeepSpeed checkpoints,
dense-to-MoE upcycling. Every import writes a weights-only checkpoint that `moetrain train --load` fine-tunes."""

from moetrain.interop.checkpoint import save_model_checkpoint, train_command, train_flags
from moetrain.interop.hf import export_hf, hf_target, import_hf

__all__ = ["export_hf", "hf_target", "import_hf", "save_model_checkpoint", "train_command", "train_flags"]
