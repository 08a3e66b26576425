"""Progress on the terminal: a progress bar in images, and images per second."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def progress_bar(total_images: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
    """Images/s and ETA; refreshes rarely when stderr is not a terminal (CI logs)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total_images, initial=initial, desc=desc, unit="img", unit_scale=False, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, disable=not enabled, file=sys.stderr)


class Throughput:
    """Images per second since creation."""

    def __init__(self):
        self.t0, self.images = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.images += n

    @property
    def images_per_s(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.t0)
