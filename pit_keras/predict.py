"""Segments images or a video with a trained or exported model; writes train-id PNGs and colour overlays.

    python -m pit_keras.predict --model=exports/demo --input=photos/ --output_dir=predictions/
    python -m pit_keras.predict --model=exports/demo/pit_int8.tflite --input=drive.mp4 --output_dir=out/

--model is a training run folder, a SavedModel (a folder with saved_model.pb, or an export folder) or a
.tflite file (run by LiteRT). --input is an image, a folder of images (its sub-folders included, e.g. the
Cityscapes layout; an image sequence: frames in name order) or a video file (.mp4, .avi, .mov, .mkv, .webm,
...; read with OpenCV). For each image NAME it writes NAME_labelTrainIds.png (8-bit Cityscapes train ids, 255
for none; a SYNTHIA run's 16 classes as their Cityscapes ids) and NAME_overlay.png (the Cityscapes palette over
the image), both at the image's size, in the same sub-folder of --output_dir as the image's in --input; for a
video NAME it writes NAME_overlay.mp4. It prints the frames per second after the first frame, whose start-up
(imports, warm-up) is timed apart. An image that cannot be read
is named on a line of its own and the others are segmented; the command then ends with one sentence counting them
and exit code 2.
"""

import os

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras.data import images as image_files
from pit_keras.deploy import predictors
from pit_keras.deploy import video
from pit_keras.errors import UserError, run_main

pit_flags.define_predict_flags()
flags.adopt_module_key_flags(pit_flags)  # --help lists this command's flags
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
    if os.path.exists(FLAGS.output_dir) and not os.path.isdir(FLAGS.output_dir):
        raise UserError(f"--output_dir={FLAGS.output_dir} is a file; give a folder (created if missing).")
    if video.is_video(FLAGS.input):
        # Checked before the model loads, so an unreadable video fails in a second.
        video.open_video(FLAGS.input)[0].release()
        predictor = predictors.load_predictor(FLAGS.model)
        output, seconds = video.predict_video(predictor, FLAGS.input, FLAGS.output_dir, alpha=FLAGS.overlay_alpha)
        print(f"segmented {len(seconds['all'])} frame(s) of {FLAGS.input} with the {predictor.kind} model "
              f"{FLAGS.model} {predictors.speed(seconds['all'], 'frame', seconds['model'])}; wrote {output}")
        return
    images = image_files.list_images(FLAGS.input, exclude=FLAGS.output_dir)
    if os.path.isfile(FLAGS.input):
        image_files.read_image(FLAGS.input)  # one image: refused before the model loads, in its own words
    names = image_files.output_names(images, FLAGS.input, FLAGS.output_dir)
    predictor = predictors.load_predictor(FLAGS.model)
    _, failed, seconds = predictors.predict_files(predictor, images, FLAGS.output_dir, alpha=FLAGS.overlay_alpha,
                                                  names=names)
    if seconds:
        print(f"segmented {len(seconds)} image(s) with the {predictor.kind} model {FLAGS.model} "
              f"{predictors.speed(seconds, 'image')}; wrote label and overlay PNGs to {FLAGS.output_dir}")
    if failed:
        reason = failed[0][1]
        raise UserError(f"{len(failed)} of {len(images)} image(s) could not be read and have no outputs (each is "
                        f"named above), e.g. {reason.rstrip('.')}.")


if __name__ == "__main__":
    run_main(main)
