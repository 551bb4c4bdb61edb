"""Converters from each published checkpoint family to varkit model folders."""
