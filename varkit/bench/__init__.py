"""Benchmarks behind ``varkit bench``: a table on stdout, JSON on disk."""
