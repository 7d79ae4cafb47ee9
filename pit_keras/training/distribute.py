"""Distribution on tf.distribute: one device, MirroredStrategy over local devices, MultiWorkerMirroredStrategy
across hosts (from `TF_CONFIG`), and `--cpu_replicas` to split a CPU into logical devices so the distributed
paths run and are tested without GPUs.

`--batch_size` is the global batch per domain: every replica gets `batch_size / num_replicas` source and as
many target images, each replica divides its losses by the global batch (`tf.nn.compute_average_loss` in the
trainer) and the optimizer sums the replicas' gradients, so a step on N replicas equals a step on one device
with the same global batch. The learning rate is not rescaled with the number of replicas.
"""

import json
import os

import tensorflow as tf

from pit_keras.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker")


def configure_cpu_replicas(count):
    """Splits the first CPU into `count` logical devices; must run before TensorFlow touches a device."""
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    if len(tf.config.get_logical_device_configuration(cpus[0]) or ()) == count:
        return  # already split so (a second call in one process)
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise UserError("--cpu_replicas must be applied before TensorFlow starts; it was too late.") from None


def make_strategy(name, cpu_replicas=1):
    """The `tf.distribute.Strategy` for a `--strategy` value.

    Args:
        name: default | mirrored | multi_worker.
        cpu_replicas: logical CPU devices to create (mirrored uses them when there is no GPU).
    """
    if name not in STRATEGIES:
        raise UserError(f"--strategy={name} is not one of {', '.join(STRATEGIES)}.")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy=multi_worker needs the TF_CONFIG environment variable (see README).")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            raise UserError("TF_CONFIG is not valid JSON.") from None
        # Created first: the collective runtime must start before anything else initialises TensorFlow.
        return tf.distribute.MultiWorkerMirroredStrategy()
    configure_cpu_replicas(cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def num_workers(strategy):
    """Processes that train together (each with its own input pipeline): 1 unless multi-worker."""
    if not is_multi_worker(strategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")) or 1


def is_chief(strategy):
    """Whether this process writes checkpoints, events, results and exports (the chief, or worker 0)."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def per_replica_batch(global_batch, strategy):
    """The per-replica batch; the global batch must split evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise UserError(f"--batch_size={global_batch} does not split over {replicas} replicas; use a multiple of "
                        f"{replicas}.")
    return global_batch // replicas


def fit_custom_loop(trainer, data, strategy, epochs, initial_epoch, steps_per_epoch, verbose, callbacks):
    """`trainer.fit` for MultiWorkerMirroredStrategy, where Keras 3.15's `fit` fails (keras-team/keras#20585):
    the same `train_step` under `strategy.run`, the same callbacks, progress bar and logs.

    Args:
        trainer: a compiled `PITTrainer` built in `strategy.scope()`.
        data: a distributed dataset of per-replica batches.
        strategy: the strategy.
        epochs, initial_epoch, steps_per_epoch, verbose, callbacks: as for `fit`.
    """
    import keras

    iterator = iter(data)

    @tf.function
    def step():
        logs = strategy.run(trainer.train_step, args=(next(iterator),))
        # Each replica reports its own running means; their mean over replicas is the global mean.
        return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None) for name, value in logs.items()}

    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                                 model=trainer, verbose=verbose, epochs=epochs,
                                                 steps=steps_per_epoch)
    trainer.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        trainer.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        for batch in range(steps_per_epoch):
            callback_list.on_train_batch_begin(batch)
            logs = {name: float(value) for name, value in step().items()}
            callback_list.on_train_batch_end(batch, logs)
            if trainer.stop_training:
                break
        callback_list.on_epoch_end(epoch, logs)
        if trainer.stop_training:
            break
    callback_list.on_train_end(logs)
