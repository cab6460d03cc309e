"""Parallelism applied from outside the model: mesh, data/expert/tensor/pipeline parallel, ZeRO.

Modules: mesh (sizes, ranks, groups), comm (autograd collectives), data_parallel (gradient
reduction, global norm), zero (ZeRO 1/2), tensor_parallel, pipeline, parallelize (applies them).
Import from the modules; this package imports nothing so that moetrain.moe can use `comm`.
"""
