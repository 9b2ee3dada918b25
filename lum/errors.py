"""Errors raised by more than one module of `lum`, defined apart so that those modules import them at the top.

`lum.tokenizer` uses `lum.semantic_tokens` and both raise `TokenizerError`; with the class in `lum.tokenizer`,
`lum.semantic_tokens` could only import it inside its functions (an import loop). `lum.tokenizer` re-exports it.
"""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded; the message says what was expected."""
