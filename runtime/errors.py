"""Errors a user can hit. Each carries a one-line cause and, where known, a fix.

The CLI prints ``str(err)`` and exits non-zero; it never shows a traceback for
a ``MagnetarError``.
"""


class MagnetarError(Exception):
    """Base class for every error we expect users to see."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message} ({fix})")


class GGUFError(MagnetarError):
    """The model file is not a valid DeepSeek V4 GGUF for this runtime."""


class TokenizerError(MagnetarError):
    """The tokenizer metadata is missing or inconsistent."""


class ConvertError(MagnetarError):
    """A transformers checkpoint cannot be converted."""


class UsageError(MagnetarError):
    """A command was called with arguments that cannot work."""


class ContextFull(MagnetarError):
    """The sequence would not fit in the engine's context."""


class ChatError(MagnetarError):
    """A conversation cannot be rendered into the V4 chat format."""


class ExpertReadError(MagnetarError):
    """Routed experts could not be read from the model file while streaming them."""
