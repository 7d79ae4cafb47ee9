"""Atomic file writes: readers see the old file or the new one, never a partial one, whatever happens to the
writing process (a crash, a kill, a full disk). Only `evaluation.reports` also fsyncs, so that a power loss
cannot leave an empty file behind either; the others are small files rewritten often, where that cost buys
little.

The new content goes to a temporary file in the destination's folder (os.replace is atomic only within one
file system), which is then renamed over the destination. Should writing fail (a full disk, an error while
serializing, Ctrl-C), the temporary file is removed and the destination keeps its previous content.

Only the standard library is imported, so numpy-only modules (evaluation.reports) and the tools can use it
without loading TensorFlow.
"""

import contextlib
import json
import os
import secrets


def atomic_write(path, write, suffix=""):
    """Writes a file through `write(tmp_path)`, then renames it to `path`.

    The temporary file is created by `write` itself (open(), np.savez, PIL), so its permissions, which the
    rename keeps, follow the umask like any new file's (tempfile.mkstemp would force 0o600).

    Args:
        path: destination (str or path-like); its folder must exist.
        write: called with the temporary path (a str); writes the whole file there.
        suffix: appended to the temporary name, for writers that pick the format from the extension
            (np.savez would otherwise add `.npz`, PIL needs `.png`).

    Raises:
        Whatever `write` or the rename raises (any BaseException, KeyboardInterrupt included), after removing
        the temporary file.
    """
    path = os.fspath(path)
    # Unique per call (process id and a random token): a stale file left by a killed process, or another
    # thread writing the same path, never shares the name.
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a missing file, or one we cannot remove: the first error matters
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Writes a str (in the locale's encoding, as open() does) atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path, payload):
    """Writes JSON (indent 2, sorted keys, trailing newline) atomically.

    The text is built before any file is touched, so a payload that is not JSON-serializable raises without
    writing anything.
    """
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
