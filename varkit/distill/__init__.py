"""Distilled Decoding (DD1): the flow map from noise to a teacher's tokens, its (noise, tokens) data, the CLI.

``flow`` holds the per-token map and its driver along a generator's layout; ``data`` writes and reads the
(noise, tokens, class) shards ``varkit train distill`` learns from; the student models are in
``varkit.models.dd``, the sampler in ``varkit.samplers.distilled``. Importing this package imports no torch
(the CLI parsers live here).
"""
