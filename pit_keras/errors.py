"""User-facing errors: one clear sentence and a non-zero exit instead of a traceback."""

import gc
import re
import sys
import threading
import traceback


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


_background = []  # UserErrors raised where they cannot reach the main thread as themselves
_background_lock = threading.Lock()


def raise_in_background(error):
    """Raises `error` (a UserError) from code TensorFlow runs for the main thread, e.g. inside an input
    pipeline: there it reaches the main thread wrapped in a TensorFlow error, so it is also kept here, and
    `run_main` reports it as itself."""
    with _background_lock:
        _background.append(error)
    raise error


def background_error():
    """The first UserError passed to `raise_in_background`, or None."""
    with _background_lock:
        return _background[0] if _background else None


def run_main(main):
    """Runs an absl `main`, turning a `UserError` into `error: <sentence>` on stderr (on a line of its own) and
    its exit code. Defines `--tf_logs` and sets up the console (`console.configure`) before `main` runs.

    The exit happens outside the `except` block, once the exception and the frames it holds are released and
    collected: an input pipeline still held by them would otherwise be torn down while Python finalizes, when a
    `tf.py_function` call of its threads can no longer take the interpreter, and the process would hang.
    """
    from absl import app, logging

    from pit_keras import console
    from pit_keras import flags as pit_flags

    tf_logs = pit_flags.define_console_flags()

    def guarded(argv):
        console.configure(tf_logs=tf_logs.value)
        # TensorFlow logs routine INFO lines (checkpoint sharding, ...) through absl once app.run starts.
        logging.set_verbosity(logging.INFO if tf_logs.value else logging.WARNING)
        try:
            return main(argv)
        except UserError as err:
            failure = f"{err.prefix}: {err}", err.exit_code
        except Exception:
            # A UserError raised inside an input pipeline arrives wrapped in a TensorFlow error.
            original = background_error()
            if original is not None:
                failure = f"{original.prefix}: {original}", original.exit_code
            else:  # a bug: its traceback, exit code 1
                console.end_line()
                sys.stdout.flush()
                traceback.print_exc()
                failure = None, 1
        except BaseException:
            console.end_line()
            raise
        message, exit_code = failure
        if message:
            console.end_line()
            sys.stdout.flush()
            print(message, file=sys.stderr, flush=True)
        _release_background()
        gc.collect()
        sys.exit(exit_code)

    app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parsing of `argv`; a flag it refuses (unknown, a bad value, a flagfile that cannot be read) is bad
    input like any other: one sentence, exit code 2 (absl's own parser says FATAL and exits 1, the code kept
    for bugs). `--help` and `--helpfull` exit 0 once they have printed the flags."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError) as err:  # ValueError: `--noflag=x`, a flagfile that is not text
        print(f"error: {flag_error_sentence(err, argv)}", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)
    except SystemExit as stop:  # only absl's help flags exit while parsing, once they have printed the flags
        sys.exit(0 if stop.code == 1 else stop.code)


def flag_error_sentence(err, argv=()):
    """The sentence for an absl flag-parsing error raised while parsing `argv`: absl's message, with its
    near-miss suggestions as flags."""
    from absl import flags

    text = str(err).strip()
    if isinstance(err, flags.UnrecognizedFlagError):
        guesses = [g.strip() for g in text.partition("Did you mean:")[2].rstrip(" ?").split(",") if g.strip()]
        hint = f" (did you mean {' or '.join('--' + g for g in guesses)}?)" if guesses else ""
        return f"unknown flag --{err.flagname}{hint}; --help lists the flags."
    if isinstance(err, UnicodeDecodeError):
        return f"a --flagfile is not a text file ({err.reason} at byte {err.start})."
    unreadable = re.fullmatch(r".*Unable to open flagfile: \[Errno \d+\] (.+): (['\"])(.+)\2", text)
    if unreadable:
        reason, path = unreadable[1], unreadable[3]
        given = any(arg.partition("=")[2] == path for arg in argv if arg.startswith(("--flagfile=", "-flagfile=")))
        return f"--flagfile={path}{'' if given else ' (named in a flagfile)'}: cannot be read ({reason})."
    not_boolean = re.fullmatch(r"flag (--\S+): \('Non-boolean argument to boolean flag'.*", text)
    if not_boolean:
        return f"{not_boolean[1]}: expected true or false."
    text = text.removeprefix("ERROR:: ").removeprefix("flag ")
    return text[:1].lower() + text[1:] + ("" if text.endswith(".") else ".")


def _release_background():
    with _background_lock:
        for error in _background:
            error.__traceback__ = error.__context__ = error.__cause__ = None
