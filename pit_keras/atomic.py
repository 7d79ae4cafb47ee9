"""Atomic file writes: readers see the old file or the new one, never a partial one, whatever happens to the
writing process (a crash, a kill, a full disk). Only `evaluation.reports` also fsyncs, so that a power loss
cannot leave an empty file behind either; the others are small files rewritten often, where that cost buys
little.

The new content goes to a temporary file in the destination's folder (os.replace is atomic only within one
file system), which is then renamed over the destination. Should writing fail (a full disk, an error while
serializing, Ctrl-C), the temporary file is removed and the destination keeps its previous content.

`replace_folder` puts a whole folder in the place of another (an export) the same way; the new folder is built
in a hidden sibling from `staging_folder`, which also removes the ones killed processes left behind.

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
import socket


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


def missing_folders(folder):
    """`(outermost, existing)`: the outermost of `folder` and its parents that does not exist yet (the first
    folder `os.makedirs(folder)` would create, whose removal undoes it; None if `folder` exists), and the
    nearest of them that does exist."""
    folder, outermost = os.path.abspath(folder), None
    while not os.path.exists(folder):
        outermost, folder = folder, os.path.dirname(folder)
    return outermost, folder


def staging_prefix(name):
    """The name of the hidden folder beside `name` that a whole new `name` is built in, up to the building
    process's id and a random token: `.NAME.partial-HOST-PID-TOKEN`. HOST is the host name and, on Linux, the
    process-id namespace (containers may share a host name and a folder, but not their process ids)."""
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        host += f".pidns{os.stat('/proc/self/ns/pid').st_ino}"
    return f".{name}.partial-{host}-"


def staging_folder(parent, name, what, log):
    """Creates `PARENT/.NAME.partial-HOST-PID-TOKEN` (`staging_prefix`), a new empty folder to build a whole new
    PARENT/NAME in (on the same file system, so that the final rename is atomic), and returns its path.

    First removes the staging folders of NAME that processes of this host left when they were killed where they
    could not clean up (SIGKILL, power loss): those whose process is gone, each logged through `log` as "removed
    PATH, left by WHAT that was stopped". Those of a running process, or of another host, stay; so do all on
    Windows, where whether a process runs is not asked.
    """
    prefix = staging_prefix(name)
    for entry in sorted(os.listdir(parent)):
        pid = entry[len(prefix):].partition("-")[0] if entry.startswith(prefix) else ""
        if pid.isascii() and pid.isdigit() and not _running(int(pid)):
            path = os.path.join(parent, entry)
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):  # not another user's, say, that this one may not remove
                log(f"removed {path}, left by {what} that was stopped")
    staging = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(staging)
    return staging


def _running(pid):
    """Whether process `pid` exists (taken as running where that cannot be asked safely)."""
    if os.name == "nt":  # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no process id at all
        return False
    except PermissionError:  # another user's process
        return True
    return True
