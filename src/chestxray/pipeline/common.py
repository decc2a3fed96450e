"""What every stage shares: one run at a time, and expected failures as one line for the user."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from chestxray.pipeline.lock import lock_file_for, pipeline_lock

# Failures a user can fix (a missing file, a bad param, an unreachable source, another run in
# progress): one line, exit 1. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError,
                                                 KeyError)


def run_stage(stage: Callable[[], object], out: Path) -> None:
    """Run a stage body writing to `out` under the pipeline lock of out's artifacts folder.

    On a user-fixable failure (another run holding the lock included), print `error: <message>` and exit 1.
    """
    try:
        with pipeline_lock(lock_file_for(out)):
            stage()
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, KeyError):
            message = f"missing setting {message!r} in params.yaml"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
