"""Soft prompts as artifacts: the file format and its checks, deep prompts, the registry, PEFT interop."""
