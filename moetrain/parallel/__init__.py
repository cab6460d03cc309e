"""Parallelism applied from outside the model: mesh, data/expert/tensor/pipeline parallel, ZeRO.

Modules: mesh (sizes, ranks, groups), data_parallel (gradient reduction, global norm), zero (ZeRO 1/2),
grad_sync (DP or ZeRO, one object), tensor_parallel, pipeline, parallelize (applies them). The autograd
collectives live in moetrain.comm, below both this package and moetrain.moe. Import from the modules.
"""
