"""The exceptions that report a user's mistake (bad input, config or file), not a bug.

The CLI prints them as one line and exits with status 2; everything else keeps its traceback.
"""

from .cache.format import CacheStoreError
from .config import ConfigError
from .data.coco import CocoFormatError
from .data.dataset import DataConfigError
from .data.images import ImageReadError
from .models import CheckpointError
from .training import TrainingError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CocoFormatError, DataConfigError, ImageReadError,
                                                CheckpointError, TrainingError, CacheStoreError, FileNotFoundError)


def _late_errors() -> tuple[type[BaseException], ...]:
    from .dump import DumpError
    return (DumpError,)


USER_ERRORS = USER_ERRORS + _late_errors()
