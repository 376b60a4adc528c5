"""ragpt: retrieval-augmented generation with department-specific soft prompts."""

from ragpt.config import Settings, load_settings
from ragpt.errors import RagptError
from ragpt.pipeline import Answer, Citation, Pipeline, Question

__all__ = ["Answer", "Citation", "Pipeline", "Question", "RagptError", "Settings", "load_settings"]
__version__ = "0.1.0"
