"""Every absl flag of every command, defined once. Commands call the `define_*` groups they need; flagfiles
compose (`--flagfile=` lines inside a flagfile). This module only defines flags and parses values given to it;
only the commands read flags (tests/test_layout.py), and pass values down."""

import os

from absl import flags

from pit_keras import config
from pit_keras.errors import UserError

DEFAULT_BENCHMARK_ROOT = os.path.join("~", ".cache", "pit_keras", "benchmark")

_CONSOLE_FLAGS = []  # the FlagHolder of --tf_logs, once defined


def define_console_flags():
    """`--tf_logs`, which every command takes (`errors.run_main` defines it); idempotent. Returns its
    `FlagHolder`, whose `.value` is the parsed flag."""
    if not _CONSOLE_FLAGS:
        from pit_keras import console

        _CONSOLE_FLAGS.append(flags.DEFINE_boolean("tf_logs", False, console.TF_LOGS_HELP))
    return _CONSOLE_FLAGS[0]


def define_data_flags():
    """The source and the target dataset (train, image_labels)."""
    define_source_flags()
    define_target_flags()


def define_source_flags():
    flags.DEFINE_enum("source", "gta5", config.SOURCES,
                      "Source dataset (labelled); folder: your own, ROOT/images with ROOT/labels (README: "
                      "Datasets).")
    flags.DEFINE_string("source_root", None, "Source dataset root (for synthetic: the benchmark folder, made on "
                        f"first use; default {DEFAULT_BENCHMARK_ROOT}).")
    flags.DEFINE_string("label_map", None, "For --source=folder: a JSON object from the raw ids of the label PNGs "
                        "to train ids, e.g. {\"7\": 0, \"8\": 1}; ids it does not list are ignored (255). "
                        "Without it the label PNGs hold the 19 train ids.")


def define_target_flags():
    flags.DEFINE_enum("target", "cityscapes", config.TARGETS,
                      "Target dataset (unlabelled); folder: every JPEG/PNG under --target_root (sub-folders "
                      "included), an optional labelled val set in ROOT/val (README: Datasets).")
    flags.DEFINE_string("target_root", None, "Target dataset root (for synthetic: the benchmark folder).")
    flags.DEFINE_string("target_size", "1024,512", "Target images are resized to W,H.")
    flags.DEFINE_integer("benchmark_seed", None, "For synthetic data: the generator seed of the embedded "
                         "benchmark made on first use (default 0; a benchmark already at the root is taken as "
                         "it is unless this is set).")


def define_model_flags():
    flags.DEFINE_enum("backbone", "tiny", config.BACKBONE_NAMES, "Backbone (README: The paper's setting).")
    flags.DEFINE_string("backbone_weights", "none", "Backbone weights: imagenet | none | a local weights file.")
    flags.DEFINE_list("lse_r", ["0.5", "1", "1.5"], "r^k of the coarse region-expansion units (one unit each).")


def define_train_flags():
    define_console_flags()  # first, so that the command's --help lists it too
    define_data_flags()
    define_model_flags()
    flags.DEFINE_string("model_dir", None, "Run folder: checkpoints, TensorBoard events, results.")
    flags.DEFINE_string("source_size", "1280,640", "Source images are resized to W,H.")
    flags.DEFINE_enum("method", "pit", config.METHODS, "Training method.")
    flags.DEFINE_boolean("lse_normalize", True, "Divide the LSE pooling by r (Pinheiro & Collobert's form, under "
                         "which r changes what a unit computes; --nolse_normalize: Eq. 1 as printed, where r only "
                         "rescales the head; docs/method.md).")
    flags.DEFINE_float("lambda_c", 0.5, "Weight of the image-level loss L_c.")
    flags.DEFINE_float("lambda_r", 0.5, "Weight of the reconstruction loss L_r.")
    flags.DEFINE_float("lambda_ent", 0.001, "Weight of the target entropy (minent).")
    flags.DEFINE_list("recon_domains", ["source", "target"], "Domains the reconstruction loss L_r covers.")
    flags.DEFINE_enum("loss_resolution", "feature", config.LOSS_RESOLUTIONS,
                      "Compute L_c and L_r on the logits before (feature) or after (input) upsampling.")
    flags.DEFINE_float("interaction_lr_multiplier", 1.0, "Learning rate of the w^k relative to the heads' "
                       "(below 1 tames them at large learning rates; docs/method.md).")
    flags.DEFINE_enum("recon_stop_gradient", "none", config.RECON_STOP_GRADIENTS,
                      "L_r trains both branches (none, the paper), only the coarse units and w^k (fine: the fine "
                      "map is held fixed) or only the fine branch (coarse).")
    flags.DEFINE_enum("recon_space", "logits", config.RECON_SPACES,
                      "L_r compares the maps as logits (the paper's S) or as per-pixel class probabilities.")
    flags.DEFINE_float("head_lr_multiplier", 1.0, "Learning rate of the new layers (fine and coarse heads, w^k) "
                       "relative to the backbone's (DeepLab practice: 10).")
    flags.DEFINE_enum("image_loss_reduction", "mean", config.IMAGE_LOSS_REDUCTIONS,
                      "Reduce the image-level BCE over classes by mean (PyTorch's BCEWithLogitsLoss default: "
                      "lambda_c / C; measured better in every setting, docs/results.md) or sum (the paper's L_c "
                      "as written).")
    flags.DEFINE_string("image_labels", None,
                        "Target image-level labels: teacher (the self-training teacher's class shares, no target "
                        "label read; needs --self_training), a JSON file (python -m pit_keras.image_labels) or "
                        "ground_truth (the weakly supervised setting). Required by pit.")
    flags.DEFINE_string("image_labels_prior", None,
                        "With --image_labels=teacher: a JSON of target image labels (python -m "
                        "pit_keras.image_labels) that the target L_c starts on; the teacher's shares are blended in "
                        "over --st_start/--st_ramp instead of ramping the term.")
    flags.DEFINE_enum("image_label_confidence", "none", config.IMAGE_LABEL_CONFIDENCES,
                      "With --image_labels=teacher: weigh the target L_c per image and class by the teacher's "
                      "confidence in the pixels behind each share (entropy) or by the agreement of teacher and "
                      "--image_labels_prior (agreement).")
    flags.DEFINE_enum("image_label_kind", "shares", config.IMAGE_LABEL_KINDS,
                      "What L_c learns on both domains: each class's share of the image, or its presence (1 if "
                      "present: the paper's Table 5 weak labels; JSON image labels must then be 0 or 1).")
    flags.DEFINE_boolean("self_training", False, "Self-training with an EMA teacher, confidence-weighted "
                         "pseudo-labels and ClassMix (DACS), on top of any --method.")
    flags.DEFINE_float("lambda_st", 1.0, "Weight of the self-training term.")
    flags.DEFINE_float("st_ema", 0.99, "EMA coefficient of the self-training teacher.")
    flags.DEFINE_float("st_threshold", 0.968, "Top probability a pseudo-labelled pixel needs to count towards "
                       "its image's confidence weight.")
    flags.DEFINE_enum("st_teacher_bn", "target_batch", config.TEACHER_BNS,
                      "The teacher normalises each target batch with that batch's BatchNorm statistics, or with "
                      "its running statistics (which mix the domains). Only for backbones that train their "
                      "BatchNorm (tiny, MobileNetV3); DeepLab-v2's is frozen.")
    flags.DEFINE_boolean("st_classmix", True, "ClassMix: paste half of each source image's classes onto a "
                         "target image; off: learn the target image against its pseudo-labels.")
    flags.DEFINE_integer("st_start", 0, "Source warm-up steps before self-training (and teacher image labels) "
                         "switch on.")
    flags.DEFINE_integer("st_ramp", 0, "Steps over which self-training then ramps to full weight.")
    flags.DEFINE_float("st_class_portion", 0.0, "Above 0: class-balanced pseudo-labels (CBST): a target pixel "
                       "counts when it passes --st_threshold or is among this portion of the most confident pixels "
                       "of its predicted class in its image; the others are left out. 0: every pixel is weighted "
                       "by its image's confident fraction (DACS).")
    flags.DEFINE_boolean("st_flip", False, "Average the teacher's prediction with the one on the mirrored "
                         "image.")
    flags.DEFINE_integer("batch_size", 4, "Global batch size per domain.")
    flags.DEFINE_integer("num_steps", 200000, "Training steps.")
    flags.DEFINE_float("learning_rate", 2.5e-5, "Initial learning rate (SGD, polynomial decay).")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay of the SGD optimizer.")
    flags.DEFINE_float("poly_power", 0.9, "Power of the polynomial learning-rate decay.")
    flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.")
    flags.DEFINE_integer("log_every", 100, "Steps between progress lines and TensorBoard scalars.")
    flags.DEFINE_integer("image_every", 1000, "Steps between TensorBoard images (0: never).")
    flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints.")
    flags.DEFINE_integer("eval_every", 0, "Steps between evaluations on the target val split (0: only at the end); "
                         "the best checkpoint by val mIoU is kept in MODEL_DIR/best.")
    flags.DEFINE_integer("keep_checkpoints", 3, "How many of the newest checkpoints are kept.")
    flags.DEFINE_boolean("evaluate", True, "Evaluate on the target val split after training; a target without "
                         "val labels (a --target=folder without ROOT/val) is said in one line and not evaluated.")
    flags.DEFINE_integer("verbose", 1, "Training progress: 0 none, 1 a line of steps, rate, ETA and losses "
                         "(redrawn on a terminal; one plain line per --log_every steps elsewhere), 2 plain "
                         "lines only.")
    flags.DEFINE_enum("strategy", "default", config.STRATEGIES,
                      "tf.distribute strategy: one device, all local GPUs (or --cpu_replicas CPUs), or the hosts "
                      "of TF_CONFIG.")
    flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices (test distribution without GPUs).")
    flags.DEFINE_enum("mixed_precision", "float32", config.MIXED_PRECISIONS,
                      "Keras dtype policy; losses stay in float32, mixed_float16 scales the loss. On CPUs "
                      "(docs/performance.md): mixed_bfloat16 makes DeepLab-v2 steps ~1.5x faster on CPUs with "
                      "AVX512_BF16 but small backbones no faster or slower; mixed_float16 is for GPUs only "
                      "(1.9-4.5x slower on these CPUs).")
    flags.DEFINE_boolean("jit_compile", False, "Compile the training step with XLA (for GPUs: on CPUs it made "
                         "float32 steps 1.8-6.9x slower than TensorFlow's oneDNN kernels; docs/performance.md).")
    flags.DEFINE_boolean("cache_images", False, "Keep every decoded training image in memory after its first "
                         "read (the same batches; for datasets that fit in RAM, e.g. the embedded benchmark: "
                         "about 130 MB; docs/performance.md).")
    flags.DEFINE_enum("aspp_implementation", "matmul", config.ASPP_IMPLEMENTATIONS,
                      "How DeepLab-v2's ASPP heads are computed (the same function and weights): one matrix "
                      "product and shifted sums (32% less time per DeepLab-v2 PIT step on CPUs, a third of the "
                      "memory at the paper's sizes), or four dilated convolutions (exports always use these).")
    flags.DEFINE_boolean("deterministic", False, "Deterministic TensorFlow ops "
                         "(tf.config.experimental.enable_op_determinism): bit-identical resumed runs on GPUs, at "
                         "some speed. On CPUs runs are reproducible without it.")


def define_eval_flags():
    define_console_flags()  # first, so that the command's --help lists it too
    define_target_flags()  # evaluate scores on a target; it reads no source
    flags.DEFINE_string("model_dir", None, "A training run folder (its newest checkpoint is evaluated); its own "
                        "--target and --target_root are the defaults.")
    flags.DEFINE_string("saved_model", None, "Score an exported SavedModel (a folder with saved_model.pb, or an "
                        "export folder) as served: uint8 images at their own size. Results go beside the export "
                        "folder, never inside it.")
    flags.DEFINE_string("tflite", None, "Score a .tflite model in LiteRT (images resized to its fixed input). "
                        "Results go beside the export folder, never inside it: EXPORT_pit_int8_eval_SPLIT.json for "
                        "EXPORT/pit_int8.tflite.")
    flags.DEFINE_string("predictions_dir", None,
                        "Score saved predictions instead of a run: 8-bit train-id PNGs at label resolution, "
                        "PRED/CITY/NAME_leftImg8bit.png for ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png, "
                        "or the one PRED/**/CITY_SSSSSS_FFFFFF*.png; for --target=folder, PRED/REL/NAME.png or "
                        "PRED/REL/NAME_labelTrainIds.png (predict's) for ROOT/SPLIT/images/REL/NAME.jpg.")
    flags.DEFINE_enum("prediction_classes", "19", ["19", "16"],
                      "Train ids the --predictions_dir PNGs are in: 19 Cityscapes or 16 SYNTHIA classes.")
    flags.DEFINE_enum("classes", None, ["19", "16", "13"],
                      "Classes to score: 19 (GTA5 -> Cityscapes), 16 or 13 (SYNTHIA -> Cityscapes: mIoU, "
                      "mIoU*). Default: the run's classes, or --prediction_classes.")
    flags.DEFINE_string("split", "val", "Target split to evaluate (for --target=folder: the labelled set "
                        "ROOT/SPLIT).")
    flags.DEFINE_enum("checkpoint", "last", ["last", "best"],
                      "With --model_dir: the newest checkpoint, or the best on target val (kept by --eval_every).")
    flags.DEFINE_string("output", None,
                        "Results JSON; SAME.csv (per-class IoU) and SAME_confusion.png are written beside it. "
                        "Default MODEL_DIR/eval_SPLIT.json (eval_SPLIT_best.json for --checkpoint=best, "
                        "eval_SPLIT_TARGET_ROOTNAME.json for another target than the run's), "
                        "DIR/NAME_eval_SPLIT.json for --predictions_dir=DIR/NAME, or beside the export folder for "
                        "--saved_model/--tflite (a path inside it is refused).")


def define_image_labels_flags():
    define_console_flags()  # first, so that the command's --help lists it too
    define_data_flags()
    flags.DEFINE_string("features", "InceptionResNetV2",
                        "Frozen image features: a keras.applications model name (global-average pooled), "
                        "backbone for the backbone of the trained run in --model_dir, predictions to take the "
                        "class shares that run predicts as the estimate (no regressor), or soft_predictions for "
                        "the mean of its softmax, flip-averaged (what a self-training teacher gives PIT). The "
                        "report compares predictions with the truth over the pixels the truth labels.")
    flags.DEFINE_string("features_weights", "imagenet",
                        "Weights of a keras.applications --features model: imagenet | none | a local weights "
                        "file of the model without its top.")
    flags.DEFINE_string("model_dir", None, "A training run folder, for --features=backbone, predictions or "
                        "soft_predictions; its --source, --target, their roots and --label_map are the defaults.")
    flags.DEFINE_string("output", None, "The target image-labels JSON to write (train's --image_labels).")
    flags.DEFINE_string("image_size", "512,256", "Images are resized to W,H for the features.")
    flags.DEFINE_integer("epochs", 100, "Training epochs of the softmax regressor (SGD lr 1e-4, momentum 0.9, "
                         "decay 0.99 per epoch, floor 1e-6).")
    flags.DEFINE_string("cache_dir", os.path.join("~", ".cache", "pit_keras", "features"),
                        "Where computed features are cached (.npz, keyed by images, extractor, weights, size).")
    flags.DEFINE_integer("seed", 0, "Seed of the regressor's training order.")
    flags.DEFINE_enum("feature_alignment", "none", ["none", "standardize", "whiten", "adabn", "adabn_standardize"],
                      "Before the regressor: none (the paper); standardize or whiten (ZCA) each domain's features "
                      "with its own mean and (co)variance; adabn: --features=backbone with its BatchNorm "
                      "normalising each single-domain batch of 16 images with that batch's statistics; "
                      "adabn_standardize: both. No target labels needed.")
    flags.DEFINE_enum("feature_pooling", "global", ["global", "pyramid"],
                      "For --features=backbone: average the final feature map globally, or also over each cell of "
                      "a 2x2 grid (pyramid: 5x the dimensions).")
    flags.DEFINE_enum("feature_stages", "last", ["last", "all"],
                      "For --features=backbone: pool the final feature map, or also the output of each earlier "
                      "stage of the backbone (all: the last layer at each output stride).")


def parse_size(name, value):
    """Parses a W,H flag value into a tuple of two positive ints."""
    try:
        width, height = (int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--{name}={value}: expected W,H (two integers), e.g. 1024,512.") from None
    if width <= 0 or height <= 0:
        raise UserError(f"--{name}={value}: width and height must be positive.")
    return width, height


def parse_floats(name, values):
    """Parses a list flag into floats."""
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise UserError(f"--{name}={','.join(values)}: expected a comma-separated list of numbers.") from None


def dataset_root(name, value, dataset, benchmark_seed=None):
    """The root of a dataset flag (`name`: source_root/target_root, given `value`) of the dataset `dataset`
    (the --source/--target value), with `~` expanded; the benchmark by default for a synthetic dataset
    (`DEFAULT_BENCHMARK_ROOT`, or `DEFAULT_BENCHMARK_ROOT_seedN` for `--benchmark_seed=N`)."""
    if value is None:
        if dataset != "synthetic":
            raise UserError(f"--{name} is required for --{name.replace('_root', '')}={dataset}.")
        value = DEFAULT_BENCHMARK_ROOT
        seed = benchmark_seed
        if seed:  # another generator seed: another folder
            value = f"{DEFAULT_BENCHMARK_ROOT}_seed{seed}"
    return os.path.expanduser(value)


def dataset_and_root(domain, dataset, root, benchmark_seed, given, run=None):
    """(dataset, root, benchmark seed) of `domain` ("source" or "target") from its flags' values: `dataset`
    (--source/--target), `root` (--source_root/--target_root) and `benchmark_seed`, where `given` names the flags
    given on the command line. With a run's config `run` (a command's --model_dir), the run's own dataset, root and
    benchmark seed stand where the flags do not name them; a dataset other than the run's needs its root."""
    root_name = f"{domain}_root"
    if run is not None and (domain not in given or dataset == getattr(run, domain)):
        dataset = getattr(run, domain)
        root = root if root_name in given else getattr(run, root_name)
        benchmark_seed = benchmark_seed if "benchmark_seed" in given else run.benchmark_seed
    return dataset, dataset_root(root_name, root, dataset, benchmark_seed), benchmark_seed


def define_export_flags():
    define_console_flags()  # first, so that the command's --help lists it too
    flags.DEFINE_string("model_dir", None, "A training run folder (its newest checkpoint is exported).")
    flags.DEFINE_string("output_dir", None, "The export folder to create (SavedModel, .tflite models, metadata).")
    flags.DEFINE_boolean("overwrite", False, "Replace an earlier export in --output_dir, once the new one is "
                         "complete; a folder holding anything else is never replaced.")
    flags.DEFINE_string("tflite_size", None, "Fixed W,H input of the .tflite models (default: the run's "
                        "--target_size).")
    flags.DEFINE_integer("calibration_images", 100, "Target training images that calibrate the full-int8 model.")
    flags.DEFINE_list("formats", ["saved_model", "float32", "float16", "dynamic_int8", "int8", "gpu_float16"],
                      "What to export: saved_model and the .tflite variants float32, float16, dynamic_int8, int8 "
                      "(full integer) and gpu_float16 (for the LiteRT GPU delegate: no ArgMax).")


def define_predict_flags():
    define_console_flags()  # first, so that the command's --help lists it too
    flags.DEFINE_string("model", None, "A training run folder, a SavedModel (or an export folder) or a .tflite "
                        "file.")
    flags.DEFINE_string("input", None, "An image, a folder of images (its sub-folders included) or a video file.")
    flags.DEFINE_string("output_dir", None, "Where NAME_labelTrainIds.png and NAME_overlay.png are written, in the "
                        "sub-folders the images have in --input.")
    flags.DEFINE_float("overlay_alpha", 0.5, "Opacity of the class colours in the overlays.")
