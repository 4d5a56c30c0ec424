"""The run's logger: stdout and `<folder>/log.txt` on rank 0, silent on the other ranks. A log.txt that
cannot be written (a full disk) drops out with one warning instead of a traceback at every line."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Optional


class LogFile(logging.FileHandler):
    """log.txt; when a line cannot be written, one warning on stderr and the file is no longer written."""

    def __init__(self, path: str, logger: logging.Logger):
        super().__init__(path)
        self.logger = logger

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.logger.removeHandler(self)
        with contextlib.suppress(OSError):  # the buffered line cannot be flushed either
            self.close()
        print(f"warning: cannot write {self.baseFilename} ({error.strerror or error}); logging to the console "
              f"only from now on", file=sys.stderr, flush=True)


def create_logger(logging_dir: Optional[str], is_main: bool = True) -> logging.Logger:
    """A logger writing to stdout and `<logging_dir>/log.txt` on rank 0, silent elsewhere."""
    logger = logging.getLogger("sit")
    logger.handlers.clear()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if logging_dir is not None:
        handlers.append(LogFile(os.path.join(logging_dir, "log.txt"), logger))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger
