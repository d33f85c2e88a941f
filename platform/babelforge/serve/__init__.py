"""Serving embedders with Ray Serve: OpenAI-compatible ``/v1/embeddings``, TEI-style ``/embed``.

Importing this package does not import Ray; :func:`start_server` does::

    >>> from babelforge.serve import ServeConfig, start_server
    >>> with start_server(ServeConfig(model_path="runs/main/model")) as server:   # doctest: +SKIP
    ...     server.embed(["hello"], input_type="query").shape
    (1, 384)

Modules: ``config`` (ServeConfig), ``protocol`` (wire formats), ``batcher`` (token-budget
batching), ``service`` (one replica's request handling), ``auth``, ``metrics``, ``api`` (FastAPI
app), ``deployment`` (Serve deployment), ``server`` (start/stop), ``cli``.
"""

from babelforge.serve.config import ServeConfig, load_serve_config
from babelforge.serve.server import RunningServer, start_server, stop_server

__all__ = ["ServeConfig", "load_serve_config", "RunningServer", "start_server", "stop_server"]
