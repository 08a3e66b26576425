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


# botocore's credential errors, matched by name so that this module needs no botocore
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}


def credentials_message(error: BaseException) -> str | None:
    """One line naming the fix when ``error`` (or its cause) is an object store's missing or partial
    credentials (botocore, under s3fs), else None. The CLI prints it instead of the traceback."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(cls.__name__ in _CREDENTIAL_ERRORS for cls in type(error).__mro__):
            return (f"no usable credentials for the object store ({error}). Set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance role); for an S3-compatible "
                    "server also AWS_ENDPOINT_URL; for a public bucket SADPIPE_STORAGE_OPTIONS='{\"anon\": true}'. "
                    "See docs/cache_format.md, section \"Where a store may live\".")
        error = error.__cause__ or error.__context__
    return None
