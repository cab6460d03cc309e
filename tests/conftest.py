"""One intra-op thread per test process: the suite runs tiny models, where a second thread only
adds synchronisation (a tiny forward took 8 ms with 1 thread, 0.5 s with 2 on a busy 2-core box)."""

import torch

torch.set_num_threads(1)

TEXT = "the quick brown fox jumps over the lazy dog. " * 12  # 540 bytes per document


def write_corpus(root) -> str:
    """Five .txt documents: with split 80,20 four train and one validation document."""
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(TEXT)
    return str(corpus)
