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

The step is pure (no logging, images or host syncs); callbacks do the rest.
"""

import keras
import tensorflow as tf

from pit_keras import losses
from pit_keras.models.network import interaction_weights

METHODS = ("pit", "source_only", "minent")
DOMAINS = ("source", "target")
LOSS_RESOLUTIONS = ("feature", "input")


class PITTrainer(keras.Model):
    """Trains a network from `network.build_network` with PIT, source-only or MinEnt.

    Batches are dicts: `source_image` `[B, H, W, 3]`, `source_label` `[B, H, W]` (train ids), and for the
    adapting methods `target_image` and `target_image_labels` (`[B, C]` soft image-level labels).

    Args:
        network: the PIT network.
        num_classes: C.
        method: one of `METHODS`.
        lse_r: the r^k of the K coarse units (one per unit of the network).
        lse_normalize: divide the LSE pooling by r (off: Eq. 1 as printed).
        lambda_c: weight of the image-level loss L_c.
        lambda_r: weight of the reconstruction loss L_r.
        lambda_ent: weight of the target entropy (MinEnt).
        recon_domains: the domains L_r is computed on.
        loss_resolution: "feature" computes L_c and L_r on the coarse and fine logits before upsampling
            (bilinear upsampling is linear, the result differs only by interpolation, at a fraction of the
            cost); "input" computes them on the upsampled maps. L_f is always at label resolution.
        interaction_lr_multiplier: scales the gradient of the w^k (with SGD, their learning rate): at a
            demo-size learning rate, full-rate w^k swing wildly and make L_r blow up (DESIGN.md section 6).
        image_loss_reduction: "sum" the image-level BCE over classes (the paper's L_c as written) or take its
            "mean" (PyTorch's BCEWithLogitsLoss default; the same as lambda_c / C). See README.
    """

    def __init__(self, network, num_classes, method="pit", lse_r=(0.5, 1.0, 1.5), lse_normalize=False,
                 lambda_c=0.5, lambda_r=0.5, lambda_ent=0.001, recon_domains=DOMAINS,
                 loss_resolution="feature", interaction_lr_multiplier=0.01, image_loss_reduction="sum", **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, got {loss_resolution!r}")
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
        self.term_weights = self._term_weights(lambda_c, lambda_r, lambda_ent, tuple(recon_domains))
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *self.term_weights)}

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
        # A term with zero weight is neither computed nor logged.
        return {name: float(w) for name, w in weights.items() if w}

    @property
    def uses_target(self):
        """Whether target batches go through the network (source-only never touches them)."""
        return self.method != "source_only"

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

    def _pit_terms(self, outputs, image_labels, domain):
        cams, seg = self._unit_maps(outputs)
        terms = {}
        tag = "src" if domain == "source" else "trg"
        if f"img_{tag}" in self.term_weights:
            terms[f"img_{tag}"] = tf.add_n([
                losses.image_level_bce(image_labels, losses.lse_pool(cam, r, self.lse_normalize),
                                       self.image_loss_reduction)
                for cam, r in zip(cams, self.lse_r)])
        if f"rec_{tag}" in self.term_weights:
            terms[f"rec_{tag}"] = losses.reconstruction_loss(cams, interaction_weights(self.network), seg)
        return terms

    def compute_terms(self, batch, training=False):
        """The per-image loss terms of a batch: `{name: [B] float32}` for every term with a non-zero weight."""
        source = self.network(batch["source_image"], training=training)
        terms = {"seg_src": losses.pixel_cross_entropy(batch["source_label"], source["seg"])}
        if not self.uses_target:
            return terms
        target = self.network(batch["target_image"], training=training)
        if self.method == "pit":
            source_labels = losses.image_level_labels(batch["source_label"], self.num_classes)
            terms.update(self._pit_terms(source, source_labels, "source"))
            terms.update(self._pit_terms(target, batch["target_image_labels"], "target"))
        elif "ent_trg" in self.term_weights:  # lambda_ent = 0 keeps the target's BatchNorm statistics only
            terms["ent_trg"] = losses.entropy_loss(target["seg"])
        return terms

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            terms = self.compute_terms(batch, training=True)
            # Each term is reduced once, over the global batch: under a distribution strategy every replica
            # divides by the global batch size and the optimizer sums the replicas' gradients.
            means = {name: tf.nn.compute_average_loss(value) for name, value in terms.items()}
            total = tf.add_n([self.term_weights[name] * mean for name, mean in means.items()])
            # Under mixed_float16 the optimizer is a LossScaleOptimizer: scale here, it unscales in apply.
            scaled = self.optimizer.scale_loss(total)
        variables = self.network.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if self.interaction_lr_multiplier != 1.0 and self.method == "pit":
            w_path = interaction_weights(self.network).path
            gradients = [g * self.interaction_lr_multiplier if g is not None and v.path == w_path else g
                         for g, v in zip(gradients, variables)]
        self.optimizer.apply_gradients(zip(gradients, variables))
        # The trackers report each replica's own mean; Keras averages them across replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.trackers["loss"].update_state(total * replicas)
        for name, mean in means.items():
            self.trackers[name].update_state(mean * replicas)
        return {name: tracker.result() for name, tracker in self.trackers.items()}
