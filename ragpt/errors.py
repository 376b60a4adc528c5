"""Errors raised at ragpt's boundaries. Each message names the thing that is wrong."""


class RagptError(Exception):
    """Base class: every error ragpt raises on bad input or state derives from it."""


class ConfigError(RagptError):
    """A setting or config file is invalid."""


class DocumentError(RagptError):
    """A document cannot be read: missing, unsupported format, or no text."""


class IndexNotFoundError(RagptError):
    """The named index does not exist."""


class IndexCorruptError(RagptError):
    """An index on disk fails its checksum or is incomplete."""


class EmbedderMismatchError(RagptError):
    """The index was built with a different embedder than the one querying it."""


class UnknownDepartmentError(RagptError):
    """The department has no documents in the index (or is not configured)."""


class EmptyQuestionError(RagptError):
    """The question is empty or whitespace only."""


class ModelLoadError(RagptError):
    """A generator or embedder cannot be found or loaded."""


class SoftPromptError(RagptError):
    """A soft-prompt tensor or artifact is invalid."""


class PromptMismatchError(SoftPromptError):
    """An intact soft prompt made for another base model, model size or embedder than the one that
    would use it: nothing to restore, it has to be retrained or rolled back."""
