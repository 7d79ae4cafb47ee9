"""Host memory for `--cache_images`: what the decoded training images would take, what the machine (or its
container's memory limit) has, and a refusal in one sentence before decoding starts when they do not fit."""

import numpy as np

from pit_keras.data import integrity
from pit_keras.errors import UserError


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # missing, or "max" (no limit)


def available_memory():
    """Bytes of memory a new allocation can get: Linux's MemAvailable, or less under a cgroup memory limit
    (Docker, Kubernetes: its limit minus its usage); None where neither can be read."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # cgroup v1
        limit, usage = _read_int(limit), _read_int(usage)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for no limit
            candidates.append(max(limit - usage, 0))
    return min(candidates) if candidates else None


def cache_footprint(domains, sample=32):
    """Estimated bytes `--cache_images` keeps: decoded source images with their labels (4 bytes a pixel) and
    target images (3), from the header sizes of up to `sample` files of each domain."""
    total = 0.0
    parts = [([image for image, _ in domains["source"][0]], 4)]
    if domains["target"] is not None:
        parts.append((domains["target"][0], 3))
    for paths, bytes_per_pixel in parts:
        if not paths:
            continue
        step = max(len(paths) // sample, 1)
        sizes = [integrity.image_size(path) for path in paths[::step][:sample]]
        total += len(paths) * bytes_per_pixel * float(np.mean([w * h for w, h in sizes]))
    return total


def check_cache_fits(domains, available=None, shards=1):
    """Refuses `--cache_images` when the decoded images would not fit in memory, before any is decoded (else
    the run would decode for a long time and then be killed without a word); prints the estimate otherwise.
    With `shards` input pipelines (one per worker), each keeps its shard. The margin (80% of what is available)
    does not cover the training step's own memory: a run that needs most of the machine should not cache."""
    needed = cache_footprint(domains) / shards
    available = available_memory() if available is None else available
    if available is not None and needed > 0.8 * available:
        raise UserError(f"--cache_images: the decoded training images need about {needed / 1e9:.1f} GB, more than "
                        f"the {available / 1e9:.1f} GB of memory available; train without --cache_images.")
    checked = "" if available is not None else " (not checked: the available memory could not be read)"
    print(f"--cache_images: about {needed / 1e6:.0f} MB of decoded training images will be kept in memory{checked}")
