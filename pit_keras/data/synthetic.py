"""An embedded two-domain benchmark: procedural street scenes as a small stand-in for GTA5 -> Cityscapes.

The real datasets are tens of gigabytes and need GPUs; this renders street scenes in the Cityscapes label
space at a size that trains on CPUs in minutes. One layout generator (sky, skyline, a road in perspective with
sidewalks, vegetation, walls, fences, poles with signs and lights, cars, buses, trucks, persons, riders) makes
the label maps of both domains, so their class statistics match; only the appearance differs:

- source ("game render" look): flat per-class colours with small per-instance jitter and sharp edges;
- target ("real" look): a global colour shift, per-class texture, per-image white balance and brightness,
  lower contrast, vignetting, blur and sensor noise.

Class shares vary from image to image (how many cars, a bus or not, buildings versus vegetation, persons or
none), because the benchmarked method learns from each image's class shares. A few images carry an ego-vehicle
strip (label id 1), which maps to ignore. Files are written in the official GTA5 and Cityscapes layouts, so
the real loaders read the benchmark unchanged.
"""

import inspect
import json
import os
import shutil

import numpy as np
from PIL import Image

from pit_keras import atomic
from pit_keras.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS, label_id_palette

SOURCE_DIR = "gta5"
TARGET_DIR = "cityscapes"
_FORMAT_VERSION = 1
_CITIES = {"train": ("synthtown", "procburg"), "val": ("mockfurt",)}
_FRAME = "000019"

_ID = dict(zip(CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS))
_EGO_VEHICLE = 1


def _table(values, width):
    """`[256, width]` float32 table indexed by label id, from {class name: row}; other ids get zeros."""
    table = np.zeros((256, width), np.float32)
    for name, row in values.items():
        table[_ID[name]] = row
    return table


# Source colour of each label id: distinct, saturated, game-like.
_SOURCE_RGB = _table({
    "road": (100, 95, 105), "sidewalk": (185, 170, 160), "building": (150, 110, 90), "wall": (170, 165, 140),
    "fence": (130, 120, 80), "pole": (90, 90, 100), "traffic light": (40, 40, 30),
    "traffic sign": (230, 200, 30), "vegetation": (60, 140, 50), "terrain": (150, 180, 80),
    "sky": (110, 170, 240), "person": (200, 60, 70), "rider": (230, 120, 40), "car": (40, 60, 170),
    "truck": (90, 70, 130), "bus": (60, 150, 160), "motorcycle": (120, 30, 120), "bicycle": (160, 40, 40),
}, 3)
_SOURCE_RGB[_EGO_VEHICLE] = (30, 30, 35)

# Target texture amplitude (grey levels) per label id for the fields of _texture_fields:
# fine grain, medium blobs, coarse shading, window grid, diagonal stripes.
_TEXTURE = _table({
    "road": (18, 8, 0, 0, 0), "sidewalk": (10, 0, 0, 8, 0), "building": (0, 10, 0, 25, 0),
    "wall": (6, 12, 0, 0, 0), "fence": (0, 0, 0, 0, 25), "pole": (5, 0, 0, 0, 0), "traffic sign": (5, 0, 0, 0, 0),
    "vegetation": (15, 30, 0, 0, 0), "terrain": (12, 15, 0, 0, 0), "sky": (0, 0, 20, 0, 0),
    "person": (0, 15, 0, 0, 0), "rider": (0, 15, 0, 0, 0), "car": (5, 0, 10, 0, 0), "truck": (0, 10, 0, 0, 0),
    "bus": (0, 10, 0, 0, 0), "motorcycle": (8, 0, 0, 0, 0), "bicycle": (8, 0, 0, 0, 0),
}, 5)

# The target domain's global colour shift: desaturate towards grey, rotate hues, warm cast; this (not the
# per-image jitter) is what a source-trained model must get over.
_GREY = np.full((3, 3), 1 / 3, np.float32)
_HUE = np.array([[0.98, -0.14, 0.16], [0.16, 0.98, -0.14], [-0.14, 0.16, 0.98]], np.float32)  # 15 degrees
_TARGET_MATRIX = 0.15 * _GREY + 0.85 * _HUE
_TARGET_OFFSET = np.array([18, 10, -4], np.float32)


class _Canvas:
    """Label ids and instance indices of a `w` x `h` image, painted back to front; shapes touch only their box."""

    def __init__(self, w, h):
        self.ids = np.full((h, w), _ID["sky"], np.uint8)
        self.inst = np.zeros((h, w), np.int32)
        self.count = 1

    def new(self):
        """A fresh instance index (instances get their own colour jitter)."""
        self.count += 1
        return self.count - 1

    def _box(self, x0, y0, x1, y1):
        h, w = self.ids.shape
        return (slice(max(0, int(round(y0))), max(0, min(h, int(round(y1))))),
                slice(max(0, int(round(x0))), max(0, min(w, int(round(x1))))))

    def mask(self, where, name, inst, box=(slice(None), slice(None))):
        self.ids[box][where] = _ID[name] if isinstance(name, str) else name
        self.inst[box][where] = inst

    def rect(self, x0, y0, x1, y1, name, inst):
        box = self._box(x0, y0, x1, y1)
        self.mask(np.s_[...], name, inst, box)

    def ellipse(self, cx, cy, rx, ry, name, inst):
        box = self._box(cx - rx, cy - ry, cx + rx + 1, cy + ry + 1)
        yy, xx = np.ogrid[box[0], box[1]]
        self.mask(((xx + 0.5 - cx) / max(rx, 0.5)) ** 2 + ((yy + 0.5 - cy) / max(ry, 0.5)) ** 2 <= 1,
                  name, inst, box)


def _car(c, rng, x, y, s):
    i = c.new()
    c.rect(x - s / 2, y - 0.35 * s, x + s / 2, y - 0.08 * s, "car", i)
    c.rect(x - 0.33 * s, y - 0.6 * s, x + 0.3 * s, y - 0.34 * s, "car", i)
    for dx in (-0.3, 0.3):
        c.ellipse(x + dx * s, y - 0.09 * s, 0.1 * s, 0.09 * s, "car", i)


def _bus_or_truck(c, rng, x, y, s):
    i, name = c.new(), "bus" if rng.random() < 0.6 else "truck"
    if name == "bus":
        c.rect(x - s / 2, y - 0.85 * s, x + s / 2, y - 0.06 * s, "bus", i)
    else:  # a tall box behind a lower cab
        c.rect(x - s / 2, y - 0.8 * s, x + 0.15 * s, y - 0.08 * s, "truck", i)
        c.rect(x + 0.15 * s, y - 0.5 * s, x + s / 2, y - 0.08 * s, "truck", i)
    for dx in (-0.35, 0.3):
        c.ellipse(x + dx * s, y - 0.07 * s, 0.08 * s, 0.07 * s, name, i)


def _person(c, rng, x, y, s, name="person", seated=False):
    i = c.new()
    top = y - (1.05 if seated else 1.0) * s
    c.ellipse(x, top + 0.08 * s, 0.07 * s, 0.08 * s, name, i)
    c.rect(x - 0.12 * s, top + 0.15 * s, x + 0.12 * s, top + 0.55 * s, name, i)
    if not seated:
        c.rect(x - 0.09 * s, y - 0.45 * s, x + 0.09 * s, y, name, i)


def _rider(c, rng, x, y, s):
    vehicle = "motorcycle" if rng.random() < 0.3 else "bicycle"
    _person(c, rng, x, y - 0.35 * s, s * 0.8, "rider", seated=True)
    i = c.new()
    for dx in (-0.25, 0.25):
        c.ellipse(x + dx * s, y - 0.17 * s, 0.17 * s, 0.17 * s, vehicle, i)
    c.rect(x - 0.25 * s, y - 0.3 * s, x + 0.25 * s, y - 0.22 * s, vehicle, i)


def _layout(rng, w, h):
    """Draw one scene's label ids and instance indices; the draws never depend on the domain."""
    c = _Canvas(w, h)
    hz = h * rng.uniform(0.36, 0.5)  # horizon row
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point column
    road = w * rng.uniform(0.3, 0.6)  # road half-width at the bottom row
    walk = w * rng.uniform(0.08, 0.25)  # sidewalk width at the bottom row
    urban = rng.uniform(0.1, 1.0)  # buildings versus vegetation: a per-image knob on the class shares
    ground_h = h - hz
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    depth = (yy - hz) / ground_h  # 0 at the horizon, 1 at the bottom row
    off = xx - vx

    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = w * rng.uniform(0.06, 0.25)
        kind = rng.random()
        if kind < urban:
            c.rect(x, hz * rng.uniform(0.0, 0.8), x + bw, hz + 1, "building", c.new())
        elif kind < urban + 0.6 * (1 - urban):
            ry = hz * rng.uniform(0.2, 0.6)
            c.ellipse(x + bw / 2, hz - 0.6 * ry, bw / 2 + 2, ry, "vegetation", c.new())
        x += bw

    ground = depth >= 0
    for side in (-1, 1):
        kind = "building" if rng.random() < 0.7 * urban else rng.choice(["terrain", "vegetation"])
        c.mask(ground & (off * side > 0), kind, c.new())
    c.mask(ground & (np.abs(off) < depth * (road + walk)), "sidewalk", c.new())
    c.mask(ground & (np.abs(off) < depth * road), "road", c.new())

    if rng.random() < 0.5:  # a wall or fence standing on the outer edge of one sidewalk
        side = rng.choice([-1, 1])
        edge_t = np.abs(off) / (road + walk)  # depth at which the sidewalk's outer edge crosses each column
        edge_y = hz + edge_t * ground_h
        lo, hi = np.sort(rng.uniform(0, vx if side < 0 else w - vx, 2))
        span = (off * side > lo) & (off * side < hi)
        c.mask(span & (yy < edge_y) & (yy >= edge_y - rng.uniform(0.1, 0.3) * h * edge_t),
               rng.choice(["wall", "fence"]), c.new())

    for _ in range(rng.integers(0, 5)):  # poles, some carrying a sign or a traffic light
        t, side = rng.uniform(0.2, 1.0), rng.choice([-1, 1])
        px, py = vx + side * t * (road + walk * rng.uniform(0.3, 0.9)), hz + t * ground_h
        pw, top = max(1.0, 0.012 * w * t), py - t * ground_h * rng.uniform(1.6, 2.6)
        c.rect(px - pw / 2, top, px + pw / 2, py, "pole", c.new())
        kind = rng.random()
        if kind < 0.4:
            c.rect(px - 2 * pw, top, px + 2 * pw, top + 3 * pw, "traffic sign", c.new())
        elif kind < 0.75:
            c.rect(px - 1.2 * pw, top, px + 1.2 * pw, top + 5 * pw, "traffic light", c.new())

    # Objects stand at depth t (their foot row is hz + t * ground_h) and scale with it; the per-image rates
    # make the shares of cars, persons, riders and large vehicles differ from image to image.
    objects = [(rng.uniform(0.15, 1.0), _car, rng.uniform(-0.85, 0.85) * road, 0.3 * w * rng.uniform(0.85, 1.15))
               for _ in range(rng.poisson(rng.uniform(0, 5)))]
    if rng.random() < 0.35:
        objects.append((rng.uniform(0.3, 0.9), _bus_or_truck, rng.uniform(-0.6, 0.6) * road, 0.5 * w))
    objects += [(rng.uniform(0.25, 1.0), _person, rng.choice([-1, 1]) * (road + walk * rng.uniform(0.2, 0.8)),
                 0.4 * h) for _ in range(rng.poisson(rng.uniform(0, 3)))]
    objects += [(rng.uniform(0.25, 1.0), _rider, rng.choice([-1, 1]) * (road + walk * rng.uniform(-0.3, 0.5)),
                 0.4 * h) for _ in range(rng.integers(1, 3) if rng.random() < 0.35 else 0)]
    for t, paint, x, s in sorted(objects, key=lambda o: o[0]):
        paint(c, rng, vx + t * x, hz + t * ground_h, t * s)

    if rng.random() < 0.2:  # the ego vehicle's bonnet, labelled "ego vehicle" (ignored in training)
        c.ellipse(w / 2, h * 1.05, w * 0.7, h * rng.uniform(0.08, 0.15), _EGO_VEHICLE, c.new())
    return c


def _smooth_noise(rng, h, w, cell):
    """Unit-variance-ish noise, bilinearly interpolated from a grid with `cell` pixels between nodes."""
    grid = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None].astype(np.float32), (xs - x0)[None, :].astype(np.float32)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture_fields(rng, h, w):
    """`[H, W, 5]` fields in [-1, 1]-ish: fine grain, medium blobs, coarse shading, window grid, stripes."""
    scale = h / 64  # keep texture sizes proportional to the image
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(3.0, 5 * scale)
    windows = (((xx + rng.uniform(0, period)) % period < 0.55 * period) & (yy % period < 0.55 * period)) * 2.0 - 1
    stripes = np.sign(np.sin((xx + yy) * 2 * np.pi / max(2.5, 3 * scale)))
    return np.stack([rng.standard_normal((h, w)).astype(np.float32), _smooth_noise(rng, h, w, max(1.5, 3 * scale)),
                     _smooth_noise(rng, h, w, max(4.0, 16 * scale)), windows, stripes], axis=-1)


def _blur(img):
    """Separable [1, 2, 1] / 4 blur with replicated edges."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    v = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]) / 4


def render_scene(rng: np.random.Generator, size: tuple[int, int], domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Render one street scene.

    The layout is drawn first, so the same generator state gives the same label map in both domains.

    Args:
        rng: the generator to draw everything from.
        size: `(W, H)` in pixels.
        domain: "source" (flat game-like colours) or "target" (textured, shifted, noisy "real" look).

    Returns:
        `(image uint8 [H, W, 3], label_ids uint8 [H, W])`, label ids as in Cityscapes' labelIds.
    """
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', not {domain!r}")
    w, h = size
    c = _layout(rng, w, h)
    jitter = rng.normal(0, 6, (c.count, 3)).astype(np.float32)
    if domain == "source":
        img = _SOURCE_RGB[c.ids] + jitter[c.inst]
    else:
        tex = np.einsum("hwk,hwk->hw", _texture_fields(rng, h, w), _TEXTURE[c.ids])
        img = _SOURCE_RGB[c.ids] @ _TARGET_MATRIX.T + _TARGET_OFFSET + 1.5 * jitter[c.inst] + tex[..., None]
        img = img * rng.uniform(0.8, 1.15) * rng.normal(1, 0.06, 3).astype(np.float32)  # exposure, white balance
        img = img.mean() + rng.uniform(0.7, 0.9) * (img - img.mean())  # haze: lower contrast
        yy, xx = np.ogrid[-1:1:h * 1j, -1:1:w * 1j]
        img = img * (1 - rng.uniform(0.1, 0.3) * (xx ** 2 + yy ** 2) / 2)[..., None]  # vignetting
        img = _blur(img) + rng.normal(0, rng.uniform(3, 8), img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), c.ids


def _params(num_source, num_target_train, num_target_val, size, seed):
    w, h = (int(v) for v in size)
    if min(w, h) < 8 or min(num_source, num_target_train, num_target_val) < 0:
        raise ValueError(f"Need a size of at least (8, 8) and non-negative counts, got size={size} and counts "
                         f"{num_source}, {num_target_train}, {num_target_val}.")
    return {"format_version": _FORMAT_VERSION, "num_source": int(num_source),
            "num_target_train": int(num_target_train), "num_target_val": int(num_target_val),
            "size": [w, h], "seed": int(seed)}


def _save(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:  # putpalette turns an "L" image into mode "P" with the ids as indices
        image.putpalette(palette)
    image.save(path)


def _write(folder, p):
    size, seed, palette = tuple(p["size"]), p["seed"], label_id_palette()
    src = os.path.join(folder, SOURCE_DIR)
    for i in range(p["num_source"]):
        img, ids = render_scene(np.random.default_rng([seed, 0, i]), size, "source")
        _save(os.path.join(src, "images", f"{i + 1:05d}.png"), img)
        _save(os.path.join(src, "labels", f"{i + 1:05d}.png"), ids, palette)
    for domain_id, split in ((1, "train"), (2, "val")):
        cities = _CITIES[split]
        for i in range(p[f"num_target_{split}"]):
            img, ids = render_scene(np.random.default_rng([seed, domain_id, i]), size, "target")
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_{_FRAME}"
            _save(os.path.join(folder, TARGET_DIR, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), img)
            _save(os.path.join(folder, TARGET_DIR, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"), ids)


def _occupied(root):
    return os.path.exists(root) and (not os.path.isdir(root) or bool(os.listdir(root)))


def read_params(root):
    """The parameters of the benchmark under `root` (its benchmark.json), or None."""
    return _read_params(root)


def _read_params(root):
    try:
        with open(os.path.join(root, "benchmark.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate(root, num_source=400, num_target_train=400, num_target_val=100, size=(256, 128), seed=0,
             log=print) -> None:
    """Write the benchmark under `root`: `root/gta5` (GTA5 layout) and `root/cityscapes` (Cityscapes layout).

    Everything is written into a hidden sibling folder (`atomic.staging_folder`), `benchmark.json` last, and
    then renamed to `root`, so an interrupted run leaves no `root` that looks complete; the staging folders that
    killed generations left are removed first. Output is byte-identical for a seed.

    Args:
        root: folder to create; must not exist or be empty.
        num_source: source (GTA5-layout) images.
        num_target_train, num_target_val: target (Cityscapes-layout) images in train and val.
        size: `(W, H)` of every image.
        seed: seed of the whole benchmark; image k uses `default_rng([seed, d, k])`, d = 0 for the source,
            1 for target train, 2 for target val.
        log: called with the line naming each stale staging folder removed.
    """
    params = _params(num_source, num_target_train, num_target_val, size, seed)
    root = os.path.abspath(os.fspath(root))
    if _occupied(root):
        raise ValueError(f"Cannot generate the synthetic benchmark in {root}: it exists and is not empty.")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = atomic.staging_folder(parent, os.path.basename(root), "a generation", log)
    try:
        _write(tmp, params)
        with open(os.path.join(tmp, "benchmark.json"), "w") as f:
            json.dump(params, f, indent=2)
        if os.path.isdir(root):
            os.rmdir(root)  # empty, checked above
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure(root, **params) -> tuple[str, str]:
    """Generate the benchmark under `root` unless an identical one is already there (saying so in one line).

    Args:
        root: benchmark folder.
        **params: keyword arguments of `generate` (its defaults apply to the ones left out).

    Returns:
        `(source_root, target_root)` = `(root/gta5, root/cityscapes)`.

    Raises:
        ValueError: `root` holds something else (other parameters, or no `benchmark.json`); it is left alone.
    """
    bound = inspect.signature(generate).bind(root, **params)
    bound.apply_defaults()
    wanted = _params(**{k: v for k, v in bound.arguments.items() if k not in ("root", "log")})
    root = os.path.abspath(os.fspath(root))
    paths = (os.path.join(root, SOURCE_DIR), os.path.join(root, TARGET_DIR))
    if _occupied(root):
        found = _read_params(root)
        if found != wanted:
            what = "no benchmark.json" if found is None else f"parameters {found}"
            raise ValueError(f"{root} holds {what}, not a synthetic benchmark with {wanted}; "
                             "choose another folder or remove it yourself.")
        return paths
    count = wanted["num_source"] + wanted["num_target_train"] + wanted["num_target_val"]
    print(f"generating the embedded benchmark: {count} images with their labels ({wanted['num_source']} source, "
          f"{wanted['num_target_train']} target train, {wanted['num_target_val']} target val, "
          f"{wanted['size'][0]}x{wanted['size'][1]}) into {root}; this happens once, later runs reuse it",
          flush=True)
    try:
        generate(root, **params)
    except OSError:
        if _read_params(root) != wanted:  # unless a concurrent run just finished the same benchmark
            raise
    return paths
