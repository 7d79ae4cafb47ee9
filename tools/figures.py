"""The paper's qualitative figures from trained run folders, as PNGs.

    python tools/figures.py --model_dir=runs/results/demo/seed_0 \\
        --compare_dir=runs/results/source_only/seed_0 --output_dir=docs/figures --num_images=3

- `fig2_predictions.png` (paper Fig. 2): rows of target val images: the image, its ground truth, the
  `--compare_dir` run's prediction (source-only, say) and the `--model_dir` run's, each captioned with the
  image's own mIoU.
- `fig3_cams.png` (paper Fig. 3): for one target val image and a few classes present in it, the image with the
  class's true pixels tinted, then the class-activation map S^k(c) of every region-expansion unit as a heat map
  (each map scaled to its own range, blue low, red high), captioned with the unit's image-level prediction
  p = sigmoid(s^k(c)) and the class's true share y(c). Only for PIT runs (the baselines have no units).

Images are picked evenly over the val split (not by how well the method does on them) unless `--images` names
them. Networks are rebuilt from each run's run.json and its newest checkpoint (`pit_keras.runs.load_run`). Captions use Pillow's default
font; a figure over `--max_kb` as an RGB PNG is written with a 256-colour palette.
"""

import os

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from pit_keras import atomic
from pit_keras.errors import UserError, run_main

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_string("model_dir", None, "The run to show (PIT for Fig. 3).")
    flags.DEFINE_string("compare_dir", None, "A run to compare with in Fig. 2 (e.g. source-only); optional.")
    flags.DEFINE_string("output_dir", "docs/figures", "Folder the PNGs are written to.")
    flags.DEFINE_integer("num_images", 3, "Target val images in Fig. 2 (picked evenly over the split).")
    flags.DEFINE_list("images", [], "Indices of the val images to show instead (the first one is Fig. 3's).")
    flags.DEFINE_list("classes", [], "Classes Fig. 3 prefers, by name, if present in the image; the rest of the "
                      "--num_classes are the image's largest classes.")
    flags.DEFINE_integer("num_classes", 3, "Classes shown in Fig. 3.")
    flags.DEFINE_string("split", "val", "Target split the images come from.")
    flags.DEFINE_integer("max_kb", 300, "A figure larger than this as an RGB PNG is written with a 256-colour "
                         "palette; 0 never does.")


CAPTION_HEIGHT = 14
GAP = 2
BACKGROUND = (255, 255, 255)


# --- Runs ---


def target_split(config, split):
    """(image, label) pairs and the label reader of the run's target split (`config`: its `RunConfig`)."""
    from pit_keras.data import datasets

    pairs, reader, _ = datasets.target_pairs(config.target, config.target_root, split,
                                             require_labels=True, num_classes=config.num_classes)
    return pairs, reader


def pick_images(num_pairs, num_images, indices):
    """Indices of the images to show: `indices` if given, else `num_images` spread evenly over the split."""
    if indices:
        try:
            picked = [int(i) for i in indices]
        except ValueError:
            raise UserError(f"--images={','.join(indices)}: expected a comma list of image indices.") from None
        bad = [i for i in picked if not 0 <= i < num_pairs]
        if bad:
            raise UserError(f"--images: index {bad[0]} is outside the split's {num_pairs} images.")
        return picked
    if num_images <= 0:
        raise UserError(f"--num_images={num_images}: must be positive.")
    count = min(num_images, num_pairs)
    # Centres of `count` equal slices of the split: spread out, and never chosen by how well a model does.
    return [int((k + 0.5) * num_pairs / count) for k in range(count)]


def network_outputs(network, image, label_shape):
    """The network's outputs on one `[H, W, 3]` image, the fine logits upsampled to `label_shape` (H, W)."""
    import tensorflow as tf

    outputs = network(image[None], training=False)
    seg = tf.image.resize(outputs["seg"], label_shape, method="bilinear")[0].numpy()
    return {name: value[0].numpy() for name, value in outputs.items()}, seg


def image_miou(label, prediction, num_classes):
    from pit_keras.evaluation import metrics

    matrix = metrics.ConfusionMatrix(num_classes)
    matrix.update(label, prediction)
    return metrics.mean_iou(metrics.iou_per_class(matrix))


# --- Drawing ---


def font():
    return ImageFont.load_default()


def panel(array, caption, size):
    """An RGB panel of `size` (W, H) with a caption strip above it."""
    width, height = size
    picture = Image.fromarray(np.asarray(array, np.uint8)).resize((width, height), Image.NEAREST)
    canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT), BACKGROUND)
    canvas.paste(picture, (0, CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), caption, fill=(0, 0, 0), font=font())
    return canvas


def grid(rows):
    """Pastes rows of equally sized panels into one image, with a small gap between them."""
    width = max(sum(p.width for p in row) + GAP * (len(row) - 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + GAP * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    y = 0
    for row in rows:
        x = 0
        for p in row:
            canvas.paste(p, (x, y))
            x += p.width + GAP
        y += max(p.height for p in row) + GAP
    return canvas


def save_png(picture, path, max_kb=None):
    """Writes an RGB PNG; one larger than `max_kb` is written with a 256-colour adaptive palette instead (the
    noisy target images are what makes it large; labels and heat maps keep their look)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        picture.save(tmp, optimize=True)
        if max_kb and os.path.getsize(tmp) > max_kb * 1024:
            picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(tmp, optimize=True)
            print(f"{path}: over {max_kb} KB as RGB, written with a 256-colour palette")

    atomic.atomic_write(path, write, suffix=".png")  # PIL picks the format from the extension
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


def run_name(config):
    if config.method != "pit":
        name = {"source_only": "source only", "minent": "MinEnt"}.get(config.method, config.method)
        return f"{name} + self-training" if config.self_training else name
    name = "PIT (GT image labels)" if config.image_labels == "ground_truth" else "PIT"
    return f"{name} + self-training" if config.self_training else name


# --- Figures ---


def figure2(runs, pairs, reader, indices, class_set):
    """Fig. 2: per image, the image, its truth and each run's prediction (captioned with the image's mIoU);
    `runs`: `pit_keras.runs.LoadedRun`s."""
    from pit_keras import visualize
    from pit_keras.data import pipeline

    rows = []
    for index in indices:
        image_path, label_path = pairs[index]
        label = reader(label_path)
        size = (label.shape[1], label.shape[0])
        original = pipeline.load_image(image_path).numpy()
        row = [panel(original, f"target val #{index}", size),
               panel(visualize.colorize(label, class_set), "ground truth", size)]
        for run in runs:
            image = pipeline.load_image(image_path, run.config.target_size)
            _, seg = network_outputs(run.network, image, label.shape)
            prediction = seg.argmax(-1).astype(np.uint8)
            miou = image_miou(label, prediction, class_set.num_classes)
            row.append(panel(visualize.colorize(prediction, class_set), f"{run_name(run.config)}, mIoU {miou:.1f}",
                             size))
        rows.append(row)
    return grid(rows)


def pick_classes(label, class_set, preferred, count):
    """Classes present in the label: the preferred ones first, then the largest by pixel share."""
    from pit_keras.adaptation import soft_labels

    shares = soft_labels.shares(label, class_set.num_classes)
    chosen = [class_set.names.index(n) for n in preferred if shares[class_set.names.index(n)] > 0][:count]
    for c in np.argsort(-shares):
        if len(chosen) >= count or shares[c] <= 0:
            break
        if c not in chosen:
            chosen.append(int(c))
    return chosen, shares


def figure3(config, network, pairs, reader, index, class_set, preferred, count):
    """Fig. 3: for each chosen class of one image, the image with the class tinted and every unit's CAM."""
    import tensorflow as tf

    from pit_keras import losses, visualize
    from pit_keras.data import pipeline

    image_path, label_path = pairs[index]
    label = reader(label_path)
    size = (label.shape[1], label.shape[0])
    original = pipeline.load_image(image_path, size).numpy()
    outputs, _ = network_outputs(network, pipeline.load_image(image_path, config.target_size), label.shape)
    lse_r = config.lse_r
    key = "cam_{}_feat" if config.loss_resolution == "feature" else "cam_{}"
    chosen, shares = pick_classes(label, class_set, preferred, count)
    rows = []
    for c in chosen:
        name = class_set.names[c]
        tint = np.where((label == c)[..., None], np.array([255, 0, 255], np.uint8), original.astype(np.uint8))
        row = [panel(visualize.overlay(original, tint, 0.6), f"#{index} {name} (truth)", size)]
        for k, r in enumerate(lse_r):
            cam_at_input = tf.image.resize(outputs[f"cam_{k}"][None], label.shape, method="bilinear")[0].numpy()
            pooled = losses.lse_pool(outputs[key.format(k)][None], r, config.lse_normalize)
            probability = float(tf.sigmoid(pooled)[0, c])
            heat = visualize.heatmap(cam_at_input[..., c])
            row.append(panel(heat, f"unit {k + 1}, r={r:g}: p={probability:.2f}, y={shares[c]:.2f}", size))
        rows.append(row)
    return grid(rows)


def make_figures(model_dir, output_dir, compare_dir=None, num_images=3, images=(), classes=(), num_classes=3,
                 split="val", max_kb=300):
    """Writes fig2_predictions.png and (for a PIT run) fig3_cams.png; returns the paths written."""
    from pit_keras import runs as run_folders

    shown = run_folders.load_run(model_dir)
    config, network = shown.config, shown.network
    runs = [shown]
    if compare_dir:
        compare = run_folders.load_run(compare_dir)
        for key in ("num_classes", "target", "target_root"):
            if getattr(compare.config, key) != getattr(config, key):
                raise UserError(f"--compare_dir={compare_dir} has {key}={getattr(compare.config, key)}, but "
                                f"--model_dir={model_dir} has {getattr(config, key)}; compare runs on the same "
                                "target.")
        runs.insert(0, compare)
    class_set = config.classes
    unknown = [name for name in classes if name not in class_set.names]
    if unknown:
        raise UserError(f"--classes: {unknown[0]!r} is not a class of this run ({', '.join(class_set.names)}).")
    pairs, reader = target_split(config, split)
    indices = pick_images(len(pairs), num_images, list(images))
    written = [os.path.join(output_dir, "fig2_predictions.png")]
    save_png(figure2(runs, pairs, reader, indices, class_set), written[0], max_kb)
    if config.method != "pit":
        print(f"no Fig. 3: {model_dir} is a {config.method} run, without region-expansion units")
        return written
    written.append(os.path.join(output_dir, "fig3_cams.png"))
    save_png(figure3(config, network, pairs, reader, indices[0], class_set, list(classes), num_classes),
             written[1], max_kb)
    return written


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (a training run folder).")
    if FLAGS.num_classes <= 0:
        raise UserError(f"--num_classes={FLAGS.num_classes}: must be positive.")
    make_figures(FLAGS.model_dir, FLAGS.output_dir, FLAGS.compare_dir, FLAGS.num_images, FLAGS.images,
                 FLAGS.classes, FLAGS.num_classes, FLAGS.split, FLAGS.max_kb)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    run_main(main)
