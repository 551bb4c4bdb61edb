"""varkit: visual autoregressive image generation in one toolkit."""
from .errors import VarkitError
from .models import create_model, list_models
from .pipeline import Pipeline, PipelineOutput, bundled_models, load_pipeline

__version__ = "0.1.0"
__all__ = ["VarkitError", "create_model", "list_models", "load_pipeline", "Pipeline", "PipelineOutput", "bundled_models"]
