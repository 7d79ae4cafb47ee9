"""The trainer: a `keras.Model` that wraps the PIT network and owns one `train_step` for every method.

A method is a set of weighted loss terms, named by term and domain as they are logged:

| term      | what                                                        | weight      | methods        |
|-----------|-------------------------------------------------------------|-------------|----------------|
| `seg_src` | pixel cross-entropy of the fine output on source (L_f)      | 1           | all            |
| `img_src` | image-level BCE of every coarse unit on source (L_c)        | lambda_c    | pit            |
| `img_trg` | the same on target, against the estimated image labels      | lambda_c    | pit            |
| `rec_src` | reconstruction of S by sum_k w^k S^k on source (L_r)        | lambda_r    | pit            |
| `rec_trg` | the same on target                                          | lambda_r    | pit            |
| `ent_trg` | ADVENT's entropy of the fine prediction on target           | lambda_ent  | minent         |
| `st_trg`  | self-training: weighted cross-entropy of the student on the ClassMix image against the mixed label (source label, teacher pseudo-label on target) | lambda_st x ramp | any, with `self_training` |

With self-training, `st_confident` reports the mean confidence weight of the pseudo-labels (not a loss), and
PIT may take its target image labels from the teacher (`image_labels_from_teacher`): the class shares of the
teacher's soft predictions on each target batch, ramped in with the self-training term; with
`image_label_prior`, L_c on target starts on a prior estimate (the batch's `target_image_labels`, e.g. the
regressor's) and the ramp blends it into the teacher's. `image_label_confidence` weighs the target L_c per
image and class: by the teacher's confidence in the pixels behind each share ("entropy"), or by how far the
teacher and the prior agree ("agreement").

The step is pure (no logging, images or host syncs); callbacks do the rest.
"""
import dataclasses

import keras
import tensorflow as tf

from pit_keras import losses
from pit_keras.adaptation import self_training
from pit_keras.config import (DOMAINS, IMAGE_LABEL_CONFIDENCES as LABEL_CONFIDENCES, IMAGE_LABEL_KINDS,
                              LOSS_RESOLUTIONS, METHODS, RECON_SPACES, RECON_STOP_GRADIENTS)
from pit_keras.models.network import head_variables, interaction_weights


@dataclasses.dataclass(frozen=True)
class SelfTraining:
    """Self-training settings (`pit_keras/adaptation/self_training.py`).

    Args:
        weight: lambda_st, the weight of the self-training term once ramped in.
        ema: the teacher's EMA coefficient.
        threshold: the top probability a pseudo-labelled pixel needs to count as confident.
        teacher_bn: "target_batch" or "running" (`self_training.TEACHER_BN`).
        classmix: paste half of each source image's classes onto its target image; off, the student learns
            the target image itself against the pseudo-labels.
        start: steps of source warm-up before the term (and teacher image labels) switch on.
        ramp: steps over which they then ramp from 0 to full weight.
        flip: average the teacher's prediction with the one on the mirrored image.
        seed: seed of the ClassMix class draws.
        class_portion: 0 for DACS's per-image confidence weight; above 0, CBST's class-balanced pixel selection
            keeping at least this portion of each predicted class's pixels in each image
            (`self_training.class_balanced_mask`).
    """

    weight: float = 1.0
    ema: float = 0.99
    threshold: float = 0.968
    teacher_bn: str = "target_batch"
    classmix: bool = True
    start: int = 0
    ramp: int = 0
    flip: bool = False
    seed: int = 0
    class_portion: float = 0.0


class PITTrainer(keras.Model):
    """Trains a network from `network.build_network` with PIT, source-only or MinEnt.

    Batches are dicts: `source_image` `[B, H, W, 3]`, `source_label` `[B, H, W]` (train ids), and for the
    adapting methods `target_image` and `target_image_labels` (`[B, C]` soft image-level labels).

    Args:
        network: the PIT network.
        num_classes: C.
        method: one of `METHODS`.
        lse_r: the r^k of the K coarse units (one per unit of the network).
        lse_normalize: divide the LSE pooling by r (the default; off: Eq. 1 as printed, docs/method.md).
        lambda_c: weight of the image-level loss L_c.
        lambda_r: weight of the reconstruction loss L_r.
        lambda_ent: weight of the target entropy (MinEnt).
        recon_domains: the domains L_r is computed on.
        loss_resolution: "feature" computes L_c and L_r on the coarse and fine logits before upsampling
            (bilinear upsampling is linear, the result differs only by interpolation, at a fraction of the
            cost); "input" computes them on the upsampled maps. L_f is always at label resolution.
        interaction_lr_multiplier: the w^k's learning rate relative to the heads' (with SGD: a gradient scale);
            below 1 it tames the w^k at large learning rates (docs/method.md).
        image_loss_reduction: "mean" the image-level BCE over classes (the default; PyTorch's BCEWithLogitsLoss
            reduction, the same as lambda_c / C) or "sum" it (the paper's L_c as written). See docs/method.md.
        head_lr_multiplier: scales the gradient (with SGD, the learning rate) of the new layers: the fine and
            coarse heads and the w^k, as DeepLab practice trains its classifier at 10x the backbone's rate.
        image_label_kind: "shares" (each class's share of the image) or "presence" (1 where a class is
            present, the paper's Table 5 weak labels), for both domains' L_c.
        self_training: a `SelfTraining`, or None.
        image_labels_from_teacher: PIT's target image labels are the teacher's class shares (needs
            self_training); the batches' `target_image_labels` are then not read.
        recon_stop_gradient: "none" (the paper), "fine" (L_r trains the coarse units and w^k towards the fine
            map) or "coarse" (L_r trains the fine branch towards the units' reconstruction).
        recon_space: L_r on "logits" (the paper's S) or on "probabilities" (softmax of each map).
        image_label_prior: with teacher image labels, L_c on target starts on the batch's `target_image_labels`
            and the teacher's ramp blends them into the teacher's shares (no ramp of the term itself).
        image_label_confidence: "none", "entropy" (the teacher's confidence in each share,
            `self_training.class_confidence`) or "agreement" (of teacher and prior,
            `self_training.label_agreement`; needs the prior) as per-image, per-class weights of the target L_c.
    """

    def __init__(self, network, num_classes, method="pit", lse_r=(0.5, 1.0, 1.5), lse_normalize=True,
                 lambda_c=0.5, lambda_r=0.5, lambda_ent=0.001, recon_domains=DOMAINS,
                 loss_resolution="feature", interaction_lr_multiplier=1.0, image_loss_reduction="mean",
                 head_lr_multiplier=1.0, image_label_kind="shares", self_training=None,
                 image_labels_from_teacher=False, recon_stop_gradient="none", recon_space="logits",
                 image_label_prior=False, image_label_confidence="none", **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, got {loss_resolution!r}")
        if image_label_kind not in IMAGE_LABEL_KINDS:
            raise ValueError(f"image_label_kind must be one of {IMAGE_LABEL_KINDS}, got {image_label_kind!r}")
        if recon_stop_gradient not in RECON_STOP_GRADIENTS:
            raise ValueError(f"recon_stop_gradient must be one of {RECON_STOP_GRADIENTS}, got {recon_stop_gradient!r}")
        if recon_space not in RECON_SPACES:
            raise ValueError(f"recon_space must be one of {RECON_SPACES}, got {recon_space!r}")
        if image_labels_from_teacher and self_training is None:
            raise ValueError("image_labels_from_teacher needs self_training")
        if (image_label_prior or image_label_confidence != "none") and not image_labels_from_teacher:
            raise ValueError("image_label_prior and image_label_confidence need image_labels_from_teacher")
        if image_label_confidence not in LABEL_CONFIDENCES:
            raise ValueError(f"image_label_confidence must be one of {LABEL_CONFIDENCES}, got "
                             f"{image_label_confidence!r}")
        if image_label_confidence == "agreement" and not image_label_prior:
            raise ValueError("image_label_confidence='agreement' needs image_label_prior")
        unknown = set(recon_domains) - set(DOMAINS)
        if unknown:
            raise ValueError(f"recon_domains must be among {DOMAINS}, got {sorted(unknown)}")
        self.network = network
        self.num_classes = num_classes
        self.method = method
        # Only PIT has coarse units; the other methods train a plain segmenter.
        self.lse_r = tuple(float(r) for r in lse_r) if method == "pit" else ()
        self.lse_normalize = lse_normalize
        self.loss_resolution = loss_resolution
        self.interaction_lr_multiplier = interaction_lr_multiplier
        self.image_loss_reduction = image_loss_reduction
        self.head_lr_multiplier = float(head_lr_multiplier)
        self.recon_stop_gradient = recon_stop_gradient
        self.recon_space = recon_space
        self.image_label_kind = image_label_kind
        self.self_training = self_training
        self.image_labels_from_teacher = image_labels_from_teacher and method == "pit"
        self.image_label_prior = bool(image_label_prior) and self.image_labels_from_teacher
        self.image_label_confidence = image_label_confidence if self.image_labels_from_teacher else "none"
        # Built by `build_teacher` inside the strategy's scope, after the network.
        self.teacher = None
        self.term_weights = self._term_weights(lambda_c, lambda_r, lambda_ent, tuple(recon_domains))
        names = ("loss", *self.term_weights) + (("st_confident",) if "st_trg" in self.term_weights else ())
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self._gradient_scales = self._lr_multipliers()

    def build_teacher(self):
        """Creates the EMA teacher's variables from the network's current ones (call in the strategy scope)."""
        if self.self_training is not None and self.teacher is None:
            self.teacher = self_training.EMATeacher(self.network, self.self_training.ema,
                                                    self.self_training.teacher_bn)
        return self.teacher

    def _lr_multipliers(self):
        """`{variable path: gradient scale}` for the variables that do not learn at the base rate."""
        scales = {}
        if self.head_lr_multiplier != 1.0:
            scales.update({v.path: self.head_lr_multiplier for v in head_variables(self.network)})
        if self.method == "pit":
            w = interaction_weights(self.network)
            scales[w.path] = self.head_lr_multiplier * self.interaction_lr_multiplier
        return {path: scale for path, scale in scales.items() if scale != 1.0}

    def learning_rate_multiplier(self, variable):
        """How many times the base learning rate `variable` learns at (with SGD)."""
        return self._gradient_scales.get(variable.path, 1.0)

    def _term_weights(self, lambda_c, lambda_r, lambda_ent, recon_domains):
        weights = {"seg_src": 1.0}
        if self.method == "pit":
            if not self.lse_r:
                raise ValueError("pit needs at least one coarse unit (lse_r)")
            weights.update(img_src=lambda_c, img_trg=lambda_c)
            weights.update(rec_src=lambda_r if "source" in recon_domains else 0.0,
                           rec_trg=lambda_r if "target" in recon_domains else 0.0)
        elif self.method == "minent":
            weights["ent_trg"] = lambda_ent
        if self.self_training is not None:
            weights["st_trg"] = self.self_training.weight
        # A term with zero weight is neither computed nor logged.
        return {name: float(w) for name, w in weights.items() if w}

    @property
    def uses_target(self):
        """Whether target batches are read (source-only without self-training never touches them)."""
        return self.method != "source_only" or self.self_training is not None

    def compile(self, optimizer, **kwargs):
        """Keras's compile, then the optimizer's slots built on the network's trainable weights, in the trainer's
        strategy scope (they are mirrored like the weights they follow), once. Left to the first step, they
        would be made while it is traced, and tf.function traces a step that makes variables twice."""
        super().compile(optimizer=optimizer, **kwargs)
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.network.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        # Keras builds a model under a distribution strategy by calling it on a training batch.
        images = inputs["source_image"] if isinstance(inputs, dict) else inputs
        return self.network(images, training=training)

    def _unit_maps(self, outputs):
        suffix = "_feat" if self.loss_resolution == "feature" else ""
        cams = [outputs[f"cam_{k}{suffix}"] for k in range(len(self.lse_r))]
        return cams, outputs[f"seg{suffix}"]

    def _pit_terms(self, outputs, image_labels, domain, label_weights=None):
        cams, seg = self._unit_maps(outputs)
        terms = {}
        tag = "src" if domain == "source" else "trg"
        if f"img_{tag}" in self.term_weights:
            terms[f"img_{tag}"] = tf.add_n([
                losses.image_level_bce(image_labels, losses.lse_pool(cam, r, self.lse_normalize),
                                       self.image_loss_reduction, label_weights)
                for cam, r in zip(cams, self.lse_r)])
        if f"rec_{tag}" in self.term_weights:
            # Which branch teaches which: a stop-gradient on one side makes L_r train only the other.
            if self.recon_stop_gradient == "fine":
                seg = tf.stop_gradient(seg)
            elif self.recon_stop_gradient == "coarse":
                cams = [tf.stop_gradient(cam) for cam in cams]
            if self.recon_space == "probabilities":
                cams = [tf.nn.softmax(tf.cast(cam, tf.float32), axis=-1) for cam in cams]
                seg = tf.nn.softmax(tf.cast(seg, tf.float32), axis=-1)
            terms[f"rec_{tag}"] = losses.reconstruction_loss(cams, interaction_weights(self.network), seg)
        return terms

    def _image_labels(self, shares):
        if self.image_label_kind == "presence":
            return tf.cast(shares > 0.0, tf.float32)
        return shares

    def compute_terms(self, batch, training=False, step=None):
        """The per-image loss terms of a batch: `{name: [B] float32}` for every term with a non-zero weight,
        plus `st_confident` with self-training. `step` (the optimizer's step, for the ClassMix draws) defaults
        to the optimizer's iterations."""
        source = self.network(batch["source_image"], training=training)
        terms = {"seg_src": losses.pixel_cross_entropy(batch["source_label"], source["seg"])}
        if not self.uses_target:
            return terms
        teacher_probabilities = None
        if self.self_training is not None and ("st_trg" in self.term_weights or self.image_labels_from_teacher):
            teacher_probabilities = self_training.teacher_probabilities(
                self.teacher, batch["target_image"], self.self_training.flip)
        if self.method != "source_only":
            target = self.network(batch["target_image"], training=training)
        if self.method == "pit":
            source_labels = self._image_labels(losses.image_level_labels(batch["source_label"], self.num_classes))
            terms.update(self._pit_terms(source, source_labels, "source"))
            label_weights = None
            if self.image_labels_from_teacher:
                # Class shares of the teacher's soft prediction; presence: the classes it predicts anywhere.
                shares = self_training.class_shares(teacher_probabilities)
                if self.image_label_kind == "presence":
                    hard = tf.one_hot(tf.argmax(teacher_probabilities, axis=-1), self.num_classes)
                    shares = tf.reduce_mean(hard, axis=[1, 2])
                target_labels = self._image_labels(shares)
                if self.image_label_prior:
                    prior = self._image_labels(tf.cast(batch["target_image_labels"], tf.float32))
                    alpha = self._teacher_ramp()
                    if self.image_label_confidence == "agreement":
                        label_weights = self_training.label_agreement(target_labels, prior)
                    target_labels = alpha * target_labels + (1.0 - alpha) * prior
                if self.image_label_confidence == "entropy":
                    label_weights = self_training.class_confidence(teacher_probabilities)
            else:
                target_labels = self._image_labels(batch["target_image_labels"])
            terms.update(self._pit_terms(target, target_labels, "target", label_weights))
        elif "ent_trg" in self.term_weights:  # lambda_ent = 0 keeps the target's BatchNorm statistics only
            terms["ent_trg"] = losses.entropy_loss(target["seg"])
        if "st_trg" in self.term_weights:  # lambda_st = 0 keeps the teacher for PIT's image labels only
            terms.update(self._self_training_terms(batch, teacher_probabilities, training, step))
        return terms

    def _self_training_terms(self, batch, probabilities, training, step):
        config = self.self_training
        pseudo, confidence = self_training.pseudo_labels(probabilities, config.threshold)
        target_image = batch["target_image"]
        size = tf.shape(target_image)[1:3]
        if config.class_portion > 0:
            weight = tf.cast(self_training.class_balanced_mask(probabilities, config.threshold,
                                                               config.class_portion), tf.float32)
            confidence = tf.reduce_mean(weight, axis=[1, 2])
        else:
            weight = tf.broadcast_to(confidence[:, None, None], tf.shape(pseudo))
        if config.classmix:
            # ClassMix at the target's size: the source image and label are resized to it if they differ.
            source_image = tf.image.resize(tf.cast(batch["source_image"], tf.float32), size)
            source_label = tf.cast(tf.image.resize(batch["source_label"][..., None], size, method="nearest")[..., 0],
                                   tf.int32)
            step = self.optimizer.iterations if step is None else step
            keys = self_training.global_example_keys(config.seed, step, tf.shape(source_label)[0],
                                                     self.num_classes)
            mask = self_training.classmix_masks(source_label, keys, self.num_classes)
            image = self_training.mix(mask, source_image, tf.cast(target_image, tf.float32))
            label = tf.where(mask, source_label, pseudo)
            weight = tf.where(mask, 1.0, weight)
        else:
            image, label = target_image, pseudo
        student = self.network(image, training=training)
        return {"st_trg": losses.weighted_pixel_cross_entropy(label, student["seg"], weight),
                "st_confident": confidence}

    def _teacher_ramp(self):
        return self_training.ramp(self.optimizer.iterations, self.self_training.start, self.self_training.ramp)

    def _dynamic_scale(self, name):
        """The ramp of the self-training term and of teacher image labels at the current step (teacher labels
        blended from a prior need none: L_c on target is on from the first step)."""
        if self.self_training is None:
            return 1.0
        if name == "st_trg" or (name == "img_trg" and self.image_labels_from_teacher and not self.image_label_prior):
            return self._teacher_ramp()
        return 1.0

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            terms = self.compute_terms(batch, training=True)
            # Each term is reduced once, over the global batch: under a distribution strategy every replica
            # divides by the global batch size and the optimizer sums the replicas' gradients.
            means = {name: tf.nn.compute_average_loss(value) for name, value in terms.items()}
            total = tf.add_n([self.term_weights[name] * self._dynamic_scale(name) * mean
                              for name, mean in means.items() if name in self.term_weights])
            # Under mixed_float16 the optimizer is a LossScaleOptimizer: scale here, it unscales in apply.
            scaled = self.optimizer.scale_loss(total)
        variables = self.network.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if self._gradient_scales:
            gradients = [g * self._gradient_scales[v.path] if g is not None and v.path in self._gradient_scales
                         else g for g, v in zip(gradients, variables)]
        self.optimizer.apply_gradients(zip(gradients, variables))
        if self.teacher is not None:
            self.teacher.update(self.optimizer.iterations)
        # The trackers report each replica's own mean; Keras averages them across replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.trackers["loss"].update_state(total * replicas)
        for name, mean in means.items():
            self.trackers[name].update_state(mean * replicas)
        return {name: tracker.result() for name, tracker in self.trackers.items()}
