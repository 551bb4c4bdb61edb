"""Generators (raster, scales, neighbors, MAR) and their registry of named configs."""
from . import configs  # noqa: F401  (registers the named configs)
from .base import Generator
from .dd import DDRasterGenerator, DDScalesGenerator  # noqa: F401  (registers the distilled-decoding students)
from .mar import MARConfig, MARGenerator
from .neighbors import NeighborsConfig, NeighborsGenerator
from .raster import RasterConfig, RasterGenerator
from .registry import create_model, list_models, register_config

__all__ = ["Generator", "MARConfig", "MARGenerator", "NeighborsConfig", "NeighborsGenerator", "RasterConfig", "RasterGenerator", "create_model", "list_models", "register_config"]
