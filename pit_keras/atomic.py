"""Atomic file writes: readers see the old file or the new one, never a partial one, whatever happens to the
writing process (a crash, a kill, a full disk). Only `evaluation.reports` also fsyncs, so that a power loss
cannot leave an empty file behind either; the others are small files rewritten often, where that cost buys
little.

The new content goes to a temporary file in the destination's folder (os.replace is atomic only within one
file system), which is then renamed over the destination. Should writing fail (a full disk, an error while
serializing, Ctrl-C), the temporary file is removed and the destination keeps its previous content.

`replace_folder` puts a whole folder in the place of another (an export) the same way.

Only the standard library is imported, so numpy-only modules (evaluation.reports) and the tools can use it
without loading TensorFlow.
"""

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil


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


def _exchange(a, b):
    """Swaps two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the C library, the
    kernel or the file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def replace_folder(new, destination):
    """Moves the complete folder `new` to `destination`; an old `destination` is deleted only once `new` is in
    its place.

    On Linux the two folders are swapped in one atomic step, so `destination` holds the old folder or the new
    one whatever happens; the old one is then deleted under the temporary name. Elsewhere the old one steps
    aside first (to `NEW-old`) and is put back should the second rename fail: only a kill between the two
    renames leaves it under that name.
    """
    if not os.path.exists(destination):
        os.rename(new, destination)
        return
    if _exchange(new, destination):
        shutil.rmtree(new)
        return
    old = f"{new}-old"
    os.rename(destination, old)
    try:
        os.rename(new, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    shutil.rmtree(old)
