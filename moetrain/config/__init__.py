"""Every option of `moetrain train`: typed dataclasses whose fields declare their own flags.

    option.py      how a field declares its flags, help and choices (``option(...)`` metadata); ConfigError
    sections.py    the dataclasses (model, moe, data, training, parallel, distill) and Config
    validation.py  pure validation, and ``resolve``: the sizes a run derives, as a new Config
    parser.py      the argparse parser generated from the fields; flags -> Config; Config -> flags
    deepspeed.py   the DeepSpeed JSON mapping (``--deepspeed_config``)
    reference.py   docs/flags.md, generated (``python -m moetrain.config.reference``)
"""

from moetrain.config.option import ConfigError
from moetrain.config.parser import (
    TRAIN_DESCRIPTION,
    add_config_args,
    add_model_args,
    add_moe_args,
    add_train_args,
    build_train_parser,
    config_from_namespace,
    field_flags,
    given_fields,
    parse_train_args,
    to_flags,
)
from moetrain.config.sections import (
    DEVICES,
    DISTRIBUTED_BACKENDS,
    DROP_POLICIES,
    LR_DECAY_STYLES,
    MLP_TYPES,
    MODEL_STYLES,
    NOISY_GATE_POLICIES,
    PIPELINE_SCHEDULES,
    PRECISIONS,
    SCORE_FUNCS,
    SECTIONS,
    TOKENIZER_TYPES,
    ZERO_STAGES,
    Config,
    DataConfig,
    DistillConfig,
    ModelConfig,
    MoEConfig,
    MonitorConfig,
    ParallelConfig,
    TrainingConfig,
    config_summary,
)
from moetrain.config.validation import resolve

__all__ = [
    "DEVICES", "DISTRIBUTED_BACKENDS", "DROP_POLICIES", "LR_DECAY_STYLES", "MLP_TYPES", "MODEL_STYLES",
    "NOISY_GATE_POLICIES", "PIPELINE_SCHEDULES", "PRECISIONS", "SCORE_FUNCS", "SECTIONS", "TOKENIZER_TYPES",
    "TRAIN_DESCRIPTION", "ZERO_STAGES", "Config", "ConfigError", "DataConfig", "DistillConfig", "ModelConfig",
    "MoEConfig", "MonitorConfig", "ParallelConfig", "TrainingConfig", "add_config_args", "add_model_args",
    "add_moe_args", "add_train_args", "build_train_parser", "config_from_namespace", "config_summary", "field_flags",
    "given_fields", "parse_train_args", "resolve", "to_flags",
]
