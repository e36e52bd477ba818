"""Data attribution (issue 13): datamodels and LDS, shard values by composition, the credit of
paper eq. 6, sparsified unlearning, and the global properties that are attributed.

A layer beside ``lifecycle`` and ``provenance``: it may import jobs, training, eval, models, data,
store and core, never cli, paper or lifecycle.
"""
