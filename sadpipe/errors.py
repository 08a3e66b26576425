"""The base of every exception that reports a user's mistake (bad input, config, file or store),
not a bug.

Each module defines its own errors as subclasses of :class:`UserError` (with the builtin they
refine, e.g. ``ValueError``, so ``except ValueError`` still catches them). The CLI prints any
``UserError`` as one line and exits with status 2; everything else keeps its traceback. Under
torchrun, ``engine.distributed.fail_together`` re-raises a rank's user error on every rank.

This module imports nothing from sadpipe, so every module can import it.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the file or key at fault and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or folder the user named does not exist."""


class TrainingError(UserError, RuntimeError):
    """A training run cannot start or go on as asked (a refused resume, a loss that became NaN, ...)."""
