"""What every stage shares: turning expected failures into one line for the user."""
from __future__ import annotations

import sys
from typing import Callable

# Failures a user can fix (a missing file, a bad param, an unreachable source): one line, exit 1.
# Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError,
                                                 KeyError)


def run_stage(stage: Callable[[], object]) -> None:
    """Run a stage body; print `error: <message>` and exit 1 on a user-fixable failure."""
    try:
        stage()
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, KeyError):
            message = f"missing setting {message!r} in params.yaml"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
