"""Running the commands from tests, two ways with the same result (`subprocess.CompletedProcess`: returncode,
stdout, stderr).

`run` starts `python -m pit_keras.MODULE ARGS` in a process of its own: the command exactly as users run it (its
own interpreter and TensorFlow start-up, C++ log lines on file descriptor 2, signals). Each costs a TensorFlow
import (5-10 s of CPU), so only tests that check the process itself use it, and one end-to-end test per command.

`run_in_process` runs the same command in the test's own process: the module imported afresh (its flags defined
on absl's global `FLAGS`), ARGS parsed by absl as `sys.argv`, its `main` called through `errors.run_main` (the
one-sentence errors and exit codes) from the repository root, Python's stdout and stderr captured. Afterwards
the command's flags are deleted and the module forgotten, so any command can run next (commands that define the
same flags would otherwise clash), and the process-wide state the command sets (the dtype policy, --deterministic's
op determinism, what `run_main` sets) is put back. Not for what only a separate process shows: TensorFlow's C++
output, signals, a hang at exit.
"""

import contextlib
import gc
import importlib
import io
import os
import subprocess
import sys

from conftest import REPO


def run(module, *args, timeout=300):
    """`python -m pit_keras.MODULE ARGS` in a new process, from the repository root, TensorFlow's INFO and
    WARNING logs off."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", f"pit_keras.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(module, *args):
    """`python -m pit_keras.MODULE ARGS`, run in this process (see the module's docstring)."""
    name = f"pit_keras.{module}"
    return _main_in_process(name, f"{name}.py", args, define_flags=False)


def run_tool_in_process(name, *args):
    """`python tools/NAME.py ARGS`, run in this process like `run_in_process` runs a command: tools/NAME.py
    imported afresh (tools/ is on the tests' path: setup.cfg), its flags defined (`define_flags`), ARGS parsed
    by absl, its `main` called through `errors.run_main` from the repository root, Python's stdout and stderr
    captured; afterwards the flags it defined are deleted, so the next command can define the same names."""
    return _main_in_process(name, f"tools/{name}.py", args, define_flags=True)


@contextlib.contextmanager
def flags_defined_within():
    """absl's global `FLAGS`, given back unparsed and without the flags defined inside the block, so that the next
    command or tool can define the same names."""
    from absl import flags

    FLAGS = flags.FLAGS
    defined = set(FLAGS)
    try:
        yield FLAGS
    finally:
        FLAGS.unparse_flags()
        for flag in set(FLAGS) - defined:
            delattr(FLAGS, flag)


def _main_in_process(name, program, args, define_flags):
    """Imports module `name` afresh, defines its flags (`define_flags()`, for a tool; a command defines them on
    import), runs its `main` through `errors.run_main` with `sys.argv = [program, *args]` from the repository
    root, and puts back the process-wide state it changed."""
    from absl import app
    from absl import logging as absl_logging

    from tensorflow.python.framework import config as tf_config

    from pit_keras import console, errors
    from pit_keras import flags as pit_flags

    pit_flags.define_console_flags()  # --tf_logs and absl's help flags stay defined for good
    app.define_help_flags()
    sys.modules.pop(name, None)
    keras = sys.modules.get("keras")  # train and the benchmarks set the global dtype policy; unset, it is floatx
    saved = (sys.argv, list(sys.meta_path), console._quiet, absl_logging.get_verbosity(),
             keras and keras.mixed_precision.global_policy().name, tf_config.is_op_determinism_enabled())
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    with errors._background_lock:
        errors._background.clear()  # a pipeline error some earlier test raised is not this command's
    # run_main ends with a full garbage collection (for the process's exit), ~0.3 s over the heap of a test
    # process that holds TensorFlow; frozen, what existed before the command is left out of it.
    gc.freeze()
    try:
        with flags_defined_within(), contextlib.chdir(REPO), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            module = importlib.import_module(name)
            if define_flags:
                module.define_flags()
            sys.argv = [program, *args]
            try:
                errors.run_main(module.main)
            except SystemExit as exit:
                code = exit.code
                returncode = code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        gc.unfreeze()
        sys.argv = saved[0]
        sys.meta_path[:] = saved[1]
        console._quiet = saved[2]
        absl_logging.set_verbosity(saved[3])
        if "keras" in sys.modules:
            keras = sys.modules["keras"]
            keras.mixed_precision.set_global_policy(saved[4] or keras.config.floatx())
        if not saved[5]:
            tf_config.disable_op_determinism()  # --deterministic's; TensorFlow has no public way back
        sys.modules.pop(name, None)
        with errors._background_lock:
            errors._background.clear()
    return subprocess.CompletedProcess([program if define_flags else name, *args], returncode, stdout.getvalue(),
                                       stderr.getvalue())
