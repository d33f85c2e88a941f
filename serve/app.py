"""Application builder for ``serve run serve/config.yaml`` (Ray Serve's "application builder" pattern).

Serve calls ``build_app(args)`` with the application's ``args`` from the config file, i.e. the keys
of :class:`babelforge.serve.ServeConfig` (model_path, model_name, batching, limits, auth...); replica
resources, autoscaling and HTTP options are read from the config file by Serve itself. The builder
lives in the installed package, so images without this repository can use
``import_path: babelforge.serve.deployment:build_app`` instead.

    serve run serve/config.yaml
    serve run serve.app:build_app model_path=models/me5-small      # without a config file
"""

from babelforge.serve.deployment import build_app

__all__ = ["build_app"]
