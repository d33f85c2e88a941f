"""Running babelforge on Ray clusters: job submission (``babelforge submit``) over Ray's Jobs SDK.

Cluster definitions (cluster launcher YAML, KubeRay manifests, the GPU image) live in the
repository's ``cluster/`` directory; ``docs/operations.md`` is the operator guide.
"""
