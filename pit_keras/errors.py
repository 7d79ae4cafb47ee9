"""User-facing errors: one clear sentence and a non-zero exit instead of a traceback."""

import sys


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a folder); its message names it in one sentence."""

    exit_code = 2
    prefix = "error"


class Diverged(UserError):
    """Training produced a non-finite loss or weights; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(UserError):
    """Training was stopped by a signal after writing a checkpoint; rerunning the command resumes it."""

    prefix = "stopped"

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


def run_main(main):
    """Runs an absl `main`, turning a `UserError` into `error: <sentence>` on stderr and its exit code."""
    from absl import app, logging

    def guarded(argv):
        # TensorFlow logs routine INFO lines (checkpoint sharding, ...) through absl once app.run starts.
        logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as err:
            print(f"{err.prefix}: {err}", file=sys.stderr)
            sys.exit(err.exit_code)

    app.run(guarded)
