"""ragpt: retrieval-augmented generation with department-specific soft prompts.

`import ragpt` stays light (no torch, no faiss): the names below load their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ragpt.config import Settings, load_settings
from ragpt.errors import RagptError

if TYPE_CHECKING:
    from ragpt.serving.contract import InputContract
    from ragpt.serving.pipeline import Pipeline
    from ragpt.serving.request import Answer, ChatRequest, Citation

_LAZY = {"Answer": "ragpt.serving.request", "ChatRequest": "ragpt.serving.request",
         "Citation": "ragpt.serving.request", "InputContract": "ragpt.serving.contract",
         "Pipeline": "ragpt.serving.pipeline"}

__all__ = ["Answer", "ChatRequest", "Citation", "InputContract", "Pipeline", "RagptError", "Settings",
           "load_settings"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ragpt' has no attribute {name!r}")
