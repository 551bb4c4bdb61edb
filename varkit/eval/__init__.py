"""Evaluation: FID/IS/precision/recall (torch-fidelity), reconstruction, digits metrics."""
