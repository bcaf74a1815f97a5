"""`fedslim simulate` on a Ray cluster that is already running (run config ``ray-address``).

Flower's simulation engine runs its virtual nodes in Ray actors; given an
address, this process joins that cluster as its driver instead of starting a
Ray of its own, and the actors run on the cluster's machines. Each machine
needs fedslim (and the task's code and data) installed; the base it does not
need: the server's checkpoint goes into the cluster's key-value store once,
and every worker process of the run starts by writing it where its machine's
task looks for it, unless a file is there already (Ray's
``worker_process_setup_hook``, :func:`receive_base`). No machine pretrains,
and no node is sent the base over the run's own messages.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from fedslim.base import cache_dir

BASE_KEY_VARIABLE = "FEDSLIM_RAY_BASE_KEY"
"""The key of the base's bytes in the cluster's key-value store, in every worker's environment."""
BASE_FILE_VARIABLE = "FEDSLIM_RAY_BASE_FILE"
"""Where a worker keeps the base: relative to its machine's fedslim cache folder, or absolute."""
KEY_PREFIX = "fedslim-base-"


def join_cluster(address: str, base_path: Path, fingerprint: str, verbose: bool) -> None:
    """Connect this process to the Ray cluster at ``address`` as the driver of the run, and put the base
    checkpoint at ``base_path`` (of the given fingerprint) in the cluster's key-value store for
    :func:`receive_base` in each worker. The base stays there, under its fingerprint, for later runs."""
    import ray
    from ray.experimental import internal_kv

    # As Flower does when it starts Ray itself: the workers import what this process imports.
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        relative = base_path.resolve().relative_to(cache_dir().resolve())
    except ValueError:
        relative = base_path.resolve()
    key = KEY_PREFIX + fingerprint
    environment = {"PYTHONPATH": pythonpath, BASE_KEY_VARIABLE: key, BASE_FILE_VARIABLE: str(relative)}
    ray.init(
        address=address,
        runtime_env={"env_vars": environment, "worker_process_setup_hook": f"{__name__}.receive_base"},
        logging_level="INFO" if verbose else "ERROR",
        log_to_driver=verbose,
    )
    if not internal_kv._internal_kv_exists(key):
        internal_kv._internal_kv_put(key, base_path.read_bytes())


def receive_base() -> None:
    """Ray's setup hook of each worker process of the run: write the server's base where this machine keeps it,
    unless a file is there already (one whose fingerprint differs is refused by the identity query, not
    replaced)."""
    from ray.experimental import internal_kv

    target = cache_dir() / os.environ[BASE_FILE_VARIABLE]
    if target.is_file():
        return
    data = internal_kv._internal_kv_get(os.environ[BASE_KEY_VARIABLE])
    if data is None:
        raise RuntimeError(f"the cluster's key-value store holds no base {os.environ[BASE_KEY_VARIABLE]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers of one machine may write at once: each its own file, renamed into place whole.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.replace(temporary, target)
