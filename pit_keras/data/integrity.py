"""Cheap start-up checks of a dataset's files: every image and label must exist, be non-empty, have a readable
header (and, for PNGs, the closing IEND chunk that a truncated file lacks), and an image and its label must have
the same size. Reading the first and last bytes only keeps this to seconds even for GTA5's 25,000 pairs. A file
damaged in its middle passes them: the input pipeline finds it when it first decodes it (`pipeline`), and the
run's `SkippedFiles` adds it to the same list, MODEL_DIR/skipped_files.txt. Decoding every file at start-up
instead would cost GTA5's 25,000 pairs tens of minutes before the first step."""

import os
import struct
import threading
import zlib

from PIL import Image

from pit_keras import atomic, console

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def image_size(path):
    """(width, height) from a file's header; raises ValueError with the reason if it cannot be read."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ValueError("the file is empty")
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(max(size - len(_PNG_END), 0))
            tail = f.read()
    except OSError as err:
        raise ValueError(err.strerror or str(err)) from None
    if head.startswith(_PNG_SIGNATURE):
        # Pillow cannot open SYNTHIA's 16-bit multi-channel labels, so PNG sizes come from the IHDR chunk.
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ValueError("truncated PNG header")
        # A file cut short (a crash while copying, an interrupted download) has lost its closing IEND chunk.
        if tail != _PNG_END:
            raise ValueError("truncated PNG (no IEND chunk at its end)")
        return struct.unpack(">II", head[16:24])
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as err:  # noqa: BLE001 -- Pillow raises many types for unreadable files
        raise ValueError(f"not a readable image ({err})") from None


def png_damage(data):
    """Why the PNG `data` is damaged, or None if each of its chunks is whole and matches its CRC-32 (for bytes
    that are not a PNG, None: there is nothing to check). A PNG damaged in its middle, whose header and end are
    intact, fails here without being decoded: about a millisecond for a GTA5 frame."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    view = memoryview(data)
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", view[position:position + 8])
        end = position + 12 + length
        name = kind.decode("latin-1")
        if end > len(data):
            return f"damaged PNG (its {name} chunk at byte {position} runs past the end of the file)"
        if zlib.crc32(view[position + 4:end - 4]) != struct.unpack(">I", view[end - 4:end])[0]:
            return f"damaged PNG (the checksum of its {name} chunk at byte {position} does not match)"
        if kind == b"IEND":
            return None
        position = end
    return "truncated PNG (no IEND chunk at its end)"


def check_pairs(pairs):
    """Splits (image, label-or-None) pairs into the usable ones and `(path, reason)` problems."""
    good, problems = [], []
    for image, label in pairs:
        try:
            size = image_size(image)
        except ValueError as err:
            problems.append((image, str(err)))
            continue
        if label is not None:
            try:
                label_size = image_size(label)
            except ValueError as err:
                problems.append((label, str(err)))
                continue
            if label_size != size:
                problems.append((label, f"label is {label_size[0]}x{label_size[1]} but its image is "
                                        f"{size[0]}x{size[1]}"))
                continue
        good.append((image, label))
    return good, problems


class SkippedFiles:
    """The files a run skips, as `path: reason` lines in one file (MODEL_DIR/skipped_files.txt): those refused
    by the start-up checks and those the input pipeline fails to decode, added as it meets them (once each).

    Args:
        path: the list's file, rewritten (atomically) on each addition; None: nothing is written (a worker
            other than the chief).
        entries: the `(path, reason)` list found at start-up; additions are appended to it.
    """

    def __init__(self, path, entries):
        self.path = path
        self.entries = entries
        self.lock = threading.Lock()

    def add(self, path, reason):
        """Records a file the input pipeline could not use and says so in one line; safe from any thread."""
        with self.lock:
            if any(p == path for p, _ in self.entries):
                return
            self.entries.append((path, reason))
            if self.path is not None:
                atomic.write_text_atomic(self.path, "".join(f"{p}: {r}\n" for p, r in self.entries))
            where = f", listed in {self.path}" if self.path is not None else ""
            console.message(f"skipped {path}: {reason} ({len(self.entries)} files skipped so far{where})")
