"""Starting or joining a Ray cluster the same way from every job.

A job either joins an existing cluster (``address="auto"``, or ``RAY_ADDRESS`` set, as under
``ray job submit``) or starts a local one. For a local cluster we pin Ray (and the gloo process
group that Ray Train creates) to 127.0.0.1: on machines whose hostname resolves to an address
that is not routable from the machine itself, the default picks that address and collective
setup hangs. Ray reads the switch at import time, so :func:`prepare_local_ray_env` must run
before the first ``import ray``; importing this module does that when no cluster address is set.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _joins_existing_cluster(address: str | None) -> bool:
    if address not in (None, "", "local"):
        return True
    return bool(os.environ.get("RAY_ADDRESS"))


def prepare_local_ray_env() -> None:
    """Make a local Ray cluster bind to loopback (no-op when joining a real cluster)."""
    if _joins_existing_cluster(None):
        return
    os.environ.setdefault(_LOOPBACK_SWITCH, "0")
    # Ray Data progress bars interleave badly with job logs on a 2-core box; keep them compact.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


prepare_local_ray_env()


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             runtime_env: dict[str, Any] | None = None, **kwargs: Any):
    """``ray.init`` for babelforge jobs; reuses an already-initialised Ray.

    ``num_cpus`` for a local cluster defaults to the machine's cores: declaring more logical CPUs
    than exist lets Ray Data schedule actor pools it cannot run, which stalls pipelines.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if _joins_existing_cluster(address):
        return ray.init(address=address or "auto", runtime_env=runtime_env, **kwargs)
    if os.environ.get(_LOOPBACK_SWITCH) is None:
        log.warning("ray was imported before babelforge.utils.ray_env; a local cluster may bind to a "
                    "non-loopback address. Import babelforge first or set %s=0.", _LOOPBACK_SWITCH)
    init_kwargs: dict[str, Any] = dict(kwargs)
    if num_cpus is not None:
        init_kwargs["num_cpus"] = num_cpus
    if num_gpus is not None:
        init_kwargs["num_gpus"] = num_gpus
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("log_to_driver", True)
    return ray.init(runtime_env=runtime_env, **init_kwargs)


def cluster_gpus() -> int:
    """Number of GPUs the running cluster has (0 on CPU clusters)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
