"""Data for pre-training: tokenizers, the offline default corpus, the prepared .bin/.idx formats (moetrain's and
Megatron's), blends, batches."""


class DataError(ValueError):
    """Bad data input or settings; the message names the culprit and the fix in one line."""


# Imported after DataError, which every submodule raises.
from moetrain.data.blend import BlendedBatches
from moetrain.data.corpus import default_corpus, read_documents
from moetrain.data.indexed import IndexedDataset, open_prefix, prepare_data, write_megatron, write_prepared
from moetrain.data.loader import TokenBatches, load_training_data
from moetrain.data.megatron import MegatronDataset
from moetrain.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["BlendedBatches", "DataError", "IndexedDataset", "MegatronDataset", "TokenBatches", "Tokenizer",
           "build_tokenizer", "default_corpus", "load_training_data", "open_prefix", "prepare_data",
           "read_documents", "write_megatron", "write_prepared"]
