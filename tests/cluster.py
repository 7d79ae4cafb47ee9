"""Two worker processes on localhost under MultiWorkerMirroredStrategy, each a `runner.run` of the same config
(`TF_CONFIG` names the cluster), for the distribution tests; conftest's `two_worker_run` is one such run shared by
the tests of tests/test_distribute.py. The workers know the micro backbone (conftest.build_micro)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from conftest import REPO

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from pit_keras.config import RunConfig
    from pit_keras.models import backbones
    from pit_keras.training import distribute
    from pit_keras.training import runner

    sys.path.insert(0, "tests")
    import conftest
    backbones.BACKBONES["micro"] = conftest.micro_spec()  # this process is the test's alone

    strategy = distribute.make_strategy("multi_worker")
    config = RunConfig.from_json(json.loads(sys.argv[1]))
    if sys.argv[4] == "shard_ignored":
        # The mistake: every worker reads the whole data set instead of its shard.
        real = runner.build_dataset
        runner.build_dataset = lambda config, domains, batch_size, shard=None, skip_batches=0: real(
            config, domains, batch_size, None, skip_batches)
    initial = []
    real_build = runner.build_network
    def build_network(*args, **kwargs):
        network = real_build(*args, **kwargs)
        initial.extend(v.numpy() for v in network.weights)
        return network
    runner.build_network = build_network
    trainer, _ = runner.run(config, sys.argv[2], strategy=strategy, log_every=2, image_every=0,
                            checkpoint_every=2, evaluate=False, verbose=0)
    np.savez(sys.argv[3], *[v.numpy() for v in trainer.network.weights])
    np.savez(sys.argv[3] + ".initial.npz", *initial)
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_two_workers(config, folder, mistake=None):
    """Trains `config` on two local workers into FOLDER/run (a checkpoint every 2 steps), their temporary folder
    FOLDER/tmp; each worker's final weights go to FOLDER/wI.npz and the weights it started from to
    FOLDER/wI.npz.initial.npz. `mistake` "shard_ignored": every worker reads all the data. Asserts both exit 0."""
    os.makedirs(folder / "tmp", exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(folder / "tmp"),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(config.to_json()), str(folder / "run"),
             str(folder / f"w{index}.npz"), mistake or "right"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]


def load_weights(path):
    """The arrays `np.savez` wrote, in order."""
    saved = np.load(path)
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]
