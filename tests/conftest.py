"""One intra-op thread per test process: the suite runs tiny models, where a second thread only
adds synchronisation (a tiny forward took 8 ms with 1 thread, 0.5 s with 2 on a busy 2-core box)."""

import torch

torch.set_num_threads(1)
