"""``babelforge serve MODEL_DIR``: serve an exported model over HTTP until Ctrl-C.

    babelforge serve runs/main/model
    babelforge serve runs/main/model --config serve/config.yaml --port 8080 --set limits.max_inputs=64

``--config`` takes a ServeConfig YAML or the Ray Serve config file ``serve/config.yaml`` (its
application args, http_options and deployment options are read); see docs/serve.md.
"""

from __future__ import annotations

import argparse
import signal
import time
from types import FrameType

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve an embedder with Ray Serve (OpenAI-compatible API)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory exported by babelforge")
    parser.add_argument("--config", help="ServeConfig YAML or Ray Serve config file (e.g. serve/config.yaml)")
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. batching.max_batch_size=32 (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from babelforge.serve.config import load_serve_config
    from babelforge.serve.server import start_server

    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"http.host={args.host}")
    if args.port:
        overrides.append(f"http.port={args.port}")
    config = load_serve_config(args.config, model_path=args.model_dir, overrides=overrides)
    started_ray = not ray.is_initialized()
    server = start_server(config)
    try:
        # After Ray's init, which installs its own SIGTERM handler: stop gracefully under process managers too.
        signal.signal(signal.SIGTERM, _interrupt)
        print(f"serving {config.served_model_name} at {server.url} (OpenAI base URL {server.openai_base_url}); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.stop()
        if started_ray:
            ray.shutdown()
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
