"""Exception types raised by reme.

All derive from the built-in type a caller would expect (``ValueError`` for bad input,
``FileNotFoundError`` for missing weights), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not available locally and cannot be fetched.

    The message names the model, where to download it and which flag or environment
    variable points reme at a local copy.
    """


class ImageReadError(ValueError):
    """An image file is missing, truncated, corrupt or of an unsupported kind."""


class ReferenceSetError(ValueError):
    """A reference set on disk is incomplete, corrupt, or does not match the encoders in use."""


class ImageTypeError(ImageReadError, TypeError):
    """The image argument is of a kind reme does not read (bytes, None, a list, a tensor);
    the message lists the accepted inputs. Also a ``TypeError``."""


class CorruptWeightsError(ValueError):
    """Weights reme converted and cached earlier no longer match the sha256 recorded at
    conversion (changed, truncated) or record none; the message names the file and says what to
    delete so the next run converts them again."""
