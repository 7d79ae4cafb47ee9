"""Segments images with a trained or exported model; writes train-id PNGs and colour overlays.

    python -m pit_keras.predict --model=exports/demo --input=photos/ --output_dir=predictions/

--model is a training run folder, a SavedModel (a folder with saved_model.pb, or an export folder) or a
.tflite file (run by LiteRT). For each image NAME it writes NAME_labelTrainIds.png (8-bit train ids, 255 for
none) and NAME_overlay.png (the Cityscapes palette over the image), both at the image's size.
"""

import os

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras import inference
from pit_keras.errors import UserError, run_main

pit_flags.define_predict_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    for name in ("model", "input", "output_dir"):
        if not FLAGS[name].value:
            raise UserError(f"--{name} is required.")
    if not 0.0 <= FLAGS.overlay_alpha <= 1.0:
        raise UserError(f"--overlay_alpha={FLAGS.overlay_alpha}: must be in [0, 1].")
    if not os.path.exists(FLAGS.model):
        raise UserError(f"--model={FLAGS.model}: no such file or folder.")
    images = inference.list_images(FLAGS.input)
    predictor = inference.load_predictor(FLAGS.model)
    inference.predict_files(predictor, images, FLAGS.output_dir, alpha=FLAGS.overlay_alpha)
    print(f"segmented {len(images)} image(s) with the {predictor.kind} model {FLAGS.model}; "
          f"wrote label and overlay PNGs to {FLAGS.output_dir}")


if __name__ == "__main__":
    run_main(main)
