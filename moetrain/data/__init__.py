"""Data for pre-training: tokenizers, the offline default corpus, the prepared .bin/.idx format, batches."""


class DataError(ValueError):
    """Bad data input or settings; the message names the culprit and the fix in one line."""


# Imported after DataError, which every submodule raises.
from moetrain.data.corpus import default_corpus, read_documents
from moetrain.data.indexed import IndexedDataset, prepare_data, prepare_data_main
from moetrain.data.loader import TokenBatches, load_training_data
from moetrain.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["DataError", "IndexedDataset", "TokenBatches", "Tokenizer", "build_tokenizer", "default_corpus",
           "load_training_data", "prepare_data", "prepare_data_main", "read_documents"]
