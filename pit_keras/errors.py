"""User-facing errors: one clear sentence and a non-zero exit instead of a traceback."""

import sys


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a folder); its message names it in one sentence."""


def run_main(main):
    """Runs an absl `main`, turning a `UserError` into `error: <sentence>` on stderr and exit code 2."""
    from absl import app, logging

    def guarded(argv):
        # TensorFlow logs routine INFO lines (checkpoint sharding, ...) through absl once app.run starts.
        logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
