"""What every stage shares: one run at a time, and expected failures as one line for the user."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from chestxray.logs import quiet_libraries
from chestxray.pipeline.lock import lock_file_for, pipeline_lock

# Failures a user can fix (a missing file, a bad param, an unreachable source, another run in
# progress): one line, exit 1. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError,
                                                 KeyError)


class StageParser(argparse.ArgumentParser):
    """A stage's argument parser: `description` is the module docstring's first line, plus `--verbose`.

    Parsing applies `--verbose` (quiet_libraries) straight away, before the stage imports TensorFlow;
    a stage that never uses TensorFlow says `tensorflow=False` and does not import it.
    """

    def __init__(self, doc: str, tensorflow: bool = True):
        super().__init__(description=doc.splitlines()[0])
        self.tensorflow = tensorflow
        self.add_argument("--verbose", action="store_true",
                          help="show TensorFlow's and other libraries' log lines and warnings")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        quiet_libraries(parsed.verbose, self.tensorflow)
        return parsed, rest


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
