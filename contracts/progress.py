"""Whether a progress bar is drawn: the same rule for every component's tqdm bars."""

from __future__ import annotations

import os
import sys

# `lum --no-progress` (or a non-terminal stderr) sets this; child processes inherit it
PROGRESS_ENV = "LUM_PROGRESS"


def bars_off(progress: bool = True) -> bool:
    """True when a bar must not be drawn: the caller asked for none, `LUM_PROGRESS=0`, or stderr is not a terminal
    (a log file full of bar redraws helps nobody); `LUM_PROGRESS=1` forces bars on."""
    if not progress:
        return True
    setting = os.environ.get(PROGRESS_ENV)
    if setting is not None:
        return setting == "0"
    return not sys.stderr.isatty()
