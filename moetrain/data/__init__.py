"""Data for pre-training: tokenizers, the offline default corpus, the prepared .bin/.idx formats (moetrain's and
Megatron's), blends, batches."""

from moetrain.data.blend import BlendedBatches
from moetrain.data.corpus import default_corpus, read_documents
from moetrain.data.errors import DataError
from moetrain.data.indexed import IndexedDataset, open_prefix, prepare_data, write_megatron, write_prepared
from moetrain.data.loader import TokenBatches, load_training_data
from moetrain.data.megatron import MegatronDataset
from moetrain.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["BlendedBatches", "DataError", "IndexedDataset", "MegatronDataset", "TokenBatches", "Tokenizer",
           "build_tokenizer", "default_corpus", "load_training_data", "open_prefix", "prepare_data",
           "read_documents", "write_megatron", "write_prepared"]
