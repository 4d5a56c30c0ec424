"""The run's logger: stdout and `<folder>/log.txt` on rank 0, silent on the other ranks."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional


def create_logger(logging_dir: Optional[str], is_main: bool = True, name: str = "sit") -> logging.Logger:
    """A logger writing to stdout and `<logging_dir>/log.txt` on rank 0, silent elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if logging_dir is not None:
        handlers.append(logging.FileHandler(os.path.join(logging_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger
