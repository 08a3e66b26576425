"""The exceptions that report a user's mistake (bad input, config or file), not a bug.

The CLI prints them as one line and exits with status 2; everything else keeps its traceback.
"""

from .config import ConfigError
from .data.coco import CocoFormatError
from .data.dataset import DataConfigError
from .data.images import ImageReadError
from .models import CheckpointError
from .training import TrainingError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CocoFormatError, DataConfigError, ImageReadError,
                                                CheckpointError, TrainingError, FileNotFoundError)
