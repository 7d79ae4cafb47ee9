"""What the commands print: TensorFlow's start-up noise kept quiet, a progress line that counts steps, and
messages and errors that always start on a line of their own.

Quiet TensorFlow (every command, unless `--tf_logs`). On a machine without a GPU, importing TensorFlow 2.21
prints absl's `WARNING: All log messages before absl::InitializeLog() ...` banner, oneDNN's and cudart's INFO
lines (twice: two of its libraries log them while they load, before `TF_CPP_MIN_LOG_LEVEL` is read) and, when
the devices are first listed, the CUDA plugin's `E0000 ... failed call to cuInit`; later its runtime logs
WARNING lines (`local_rendezvous.cc ... aborting` whenever an op fails); the TFLite converter and LiteRT add
their own lines. `configure` sets `TF_CPP_MIN_LOG_LEVEL=2` (INFO and WARNING hidden; a value the user set is
kept) and imports TensorFlow, when a command first imports it, with file descriptor 2 captured: the known
start-up lines are dropped and any other line is written out after the import (the whole capture if the
import fails). Inside the same window the physical devices are listed, which is when cuInit runs (at level 2
it would still show: it is an ERROR line); that does not initialise the runtime, so logical devices
(`--cpu_replicas`), memory growth and distribution strategies are configured afterwards as before. No GPU is
hidden; TensorFlow's other errors (`E` lines) still show.

Progress (`ProgressLine`): `step 120/1500  3.4 steps/s  ETA 6m45s  loss 1.234 ...`. On a terminal the line is
redrawn in place (carriage return and spaces, no escape codes) and ended every `every` steps; anywhere else
(a cluster job's log, CI) one plain line is written every `every` steps and at the end, nothing in between.
Anything printed through `message`, and every error `errors.run_main` prints, first ends an open progress
line.

Only the standard library is imported: the commands import this module before TensorFlow.
"""

import contextlib
import importlib.abc
import importlib.util
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time

_lock = threading.RLock()
_open_stream = None  # the stream whose progress line is drawn without its newline
_quiet = False  # TensorFlow's noise is filtered (configure)

# Lines TensorFlow, its CUDA plugin, the TFLite converter and LiteRT print at start-up that say nothing to a
# user; only dropped inside `quiet_stderr` windows.
_NOISE = [re.compile(pattern) for pattern in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    # absl/glog INFO and WARNING lines: I0000 00:00:1796219453.893700   28185 port.cc:153] ...
    r"^[IW]\d{4} [\d:.]+\s+\d+ [\w./+-]+:\d+\] ",
    r"^E\d{4} [\d:.]+\s+\d+ [\w./+-]+:\d+\] .*(failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) "
    r"factory)",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$",
    r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$",
    # The TFLite converter's quantizer, calibrating the full-integer model.
    r"^fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+$",
)]


def is_noise(line):
    """Whether a line of captured stderr is known start-up noise."""
    line = line.rstrip("\r\n")
    return any(pattern.search(line) for pattern in _NOISE)


def quiet():
    """Whether TensorFlow's noise is being filtered."""
    return _quiet


@contextlib.contextmanager
def quiet_stderr():
    """Captures file descriptor 2 (C++ logs and Python's stderr alike) for the block; afterwards writes out every
    captured line that is not `is_noise`, or all of them if the block raised. Does nothing unless quiet."""
    if not _quiet:
        yield
        return
    with _lock:
        sys.stderr.flush()
        saved = os.dup(2)
        capture = tempfile.TemporaryFile()
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            capture.close()
            kept = lines if failed else [line for line in lines if not is_noise(line)]
            if kept:
                end_line()
                sys.stderr.write("".join(line if line.endswith("\n") else line + "\n" for line in kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` inside `quiet_stderr`, then lists the devices there too."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with quiet_stderr():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the CUDA plugin's cuInit; the runtime stays unstarted
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and wraps its loader in `_QuietLoader`; removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def configure(tf_logs=False):
    """Sets up the console of a command; call it after its flags are parsed and before TensorFlow is imported.

    Args:
        tf_logs: keep TensorFlow's start-up lines and its INFO and WARNING logs (`--tf_logs`).
    """
    global _quiet
    _quiet = not tf_logs
    if tf_logs:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


TF_LOGS_HELP = ("Show TensorFlow's start-up and INFO/WARNING log lines (the oneDNN, cudart and cuInit lines a "
                "CPU-only machine prints, converter output), which are hidden by default.")


def end_line():
    """Ends an open progress line, so that what is printed next starts on a line of its own."""
    global _open_stream
    with _lock:
        if _open_stream is not None:
            with contextlib.suppress(OSError, ValueError):
                _open_stream.write("\n")
                _open_stream.flush()
            _open_stream = None


def message(text, file=None):
    """Prints `text` on a line of its own (after ending an open progress line); safe from any thread."""
    with _lock:
        end_line()
        stream = file or sys.stdout
        stream.write(f"{text}\n")
        stream.flush()


def is_terminal(stream):
    """Whether `stream` is an interactive terminal (progress is redrawn there, and only there)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def format_duration(seconds):
    """`45s`, `6m05s`, `2h03m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_value(value):
    value = float(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3) or not math.isfinite(value):
        return f"{value:.3g}"
    return f"{value:.4f}"


class ProgressLine:
    """`unit done/total`, the rate, the time left and named values (the losses), on one line.

    Args:
        total: the count at the end (`num_steps`).
        unit: what is counted ("step", "image").
        every: a plain line is written every `every` counts (and at `total`); on a terminal the line is also
            redrawn in between (at most every `min_interval` seconds) and ended at these counts.
        stream: where it goes (default stdout).
        interactive: redraw in place; None: if `stream` is a terminal.
        min_interval: seconds between redraws on a terminal.
    """

    def __init__(self, total, unit="step", every=None, stream=None, interactive=None, min_interval=0.2):
        self.total = total
        self.unit = unit
        self.every = every
        self.stream = stream or sys.stdout
        self.interactive = is_terminal(self.stream) if interactive is None else interactive
        self.min_interval = min_interval
        self._window = None  # (count, time) where the current rate window starts
        self._rate = None  # what the line shows
        self._previous_rate = None  # the rate over the last whole window
        self._drawn_at = 0.0
        self._width = 0

    def _update_rate(self, done, now, boundary=False):
        if self._window is None:
            # The first count sets the origin: the first step's time includes tracing and compilation.
            self._window = (done, now)
            return
        start, since = self._window
        if done > start and now > since:
            rate = (done - start) / (now - since)
            # A window of less than a second is too noisy to replace the previous window's rate; it goes on
            # past the boundary until it spans a second (fast steps logged often would otherwise show the first
            # window's rate for good).
            if self._previous_rate is None or now - since >= 1.0:
                self._rate = rate
            if boundary and (self._previous_rate is None or now - since >= 1.0):
                self._previous_rate = self._rate
                self._window = (done, now)

    def text(self, done, values=None):
        """The line for `done` counts and `values` ({name: number})."""
        width = len(str(self.total))
        parts = [f"{self.unit} {done:>{width}}/{self.total}"]
        if self._rate:
            parts.append(f"{self._rate:.{2 if self._rate < 100 else 0}f} {self.unit}s/s")
            if done < self.total:
                parts.append(f"ETA {format_duration((self.total - done) / self._rate)}")
        for name, value in (values or {}).items():
            parts.append(f"{name} {_format_value(value)}")
        return "  ".join(parts)

    def update(self, done, values=None):
        """Records that `done` counts are done; writes or redraws the line when it is due."""
        now = time.monotonic()
        boundary = bool(done >= self.total or (self.every and done % self.every == 0))
        self._update_rate(done, now, boundary)
        if boundary:
            self._write(self.text(done, values), final=True)
        elif self.interactive and now - self._drawn_at >= self.min_interval:
            self._write(self.text(done, values), final=False)
            self._drawn_at = now

    def close(self):
        """Ends the line (if it was redrawn since the last plain line)."""
        with _lock:
            if _open_stream is self.stream:
                end_line()

    def _write(self, line, final):
        global _open_stream
        with _lock:
            if not self.interactive:
                if final:
                    end_line()
                    self.stream.write(line + "\n")
                    self.stream.flush()
                return
            if _open_stream is not None and _open_stream is not self.stream:
                end_line()
            if not final:  # a redrawn line must not wrap, or the carriage return would not reach its start
                line = line[:max(shutil.get_terminal_size().columns - 1, 20)]
            padding = " " * max(self._width - len(line), 0)
            self.stream.write("\r" + line + padding + ("\n" if final else ""))
            self.stream.flush()
            self._width = 0 if final else len(line)
            _open_stream = None if final else self.stream
