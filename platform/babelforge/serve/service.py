"""What one replica does with a request, independent of HTTP and Ray.

:class:`EmbeddingService` owns an :class:`~babelforge.models.Embedder` and a
:class:`~babelforge.serve.batcher.TokenBudgetBatcher`. For each request it checks the limits
(count, empty texts, characters, tokens: truncate or reject), applies the prompt of the requested
input type and tokenises once, on the event loop; the batcher's thread only pads token ids and
runs the forward pass, so tokenising the next requests overlaps with the model. Each request then
gets its rows of raw pooled vectors, truncated to its Matryoshka dimension and L2-normalised. The
result equals ``Embedder.encode(texts, prompt_name=input_type, dim=dimensions)`` in process::

    >>> service = EmbeddingService.load(ServeConfig(model_path="models/me5-small"))   # doctest: +SKIP
    >>> inputs = TextInputs(["hello"], field="input", single=False)                       # doctest: +SKIP
    >>> result = await service.embed(inputs, input_type="query", dimensions=128)         # doctest: +SKIP
    >>> result.vectors.shape, result.prompt_tokens                                       # doctest: +SKIP
    ((1, 128), 5)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from babelforge.errors import ConfigError
from babelforge.models import Embedder, inference_placement, truncate_embeddings_np
from babelforge.serve.batcher import BatchLimits, BatchReport, TokenBudgetBatcher
from babelforge.serve.config import ServeConfig
from babelforge.serve.protocol import APIError, TextInputs

log = logging.getLogger(__name__)

__all__ = ["EmbeddingService", "EmbeddingResult", "load_embedder", "pad_token_ids"]


def load_embedder(config: ServeConfig, torch_threads: int | None = None) -> Embedder:
    """The model of ``config`` on its device (``auto``: CUDA when visible) and dtype (``auto``: bf16 on GPU)."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    device, dtype = inference_placement(config.device, config.dtype)
    model = Embedder.from_pretrained(config.model_path, device=device, dtype=dtype)
    log.info("loaded %s from %s on %s (%s), dims %s", config.served_model_name, config.model_path, device, dtype,
             model.embedding_dims)
    return model


def pad_token_ids(token_ids: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for rows of token ids, padded on ``side`` (left/right).

    >>> pad_token_ids([[5, 6, 7], [8]], pad_id=1, side="left")["input_ids"].tolist()
    [[5, 6, 7], [1, 1, 8]]
    """
    longest = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_ids), longest), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        cols = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
        input_ids[row, cols] = ids
        mask[row, cols] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray
    prompt_tokens: int


class EmbeddingService:
    """Validates, batches and post-processes embedding requests for one loaded model."""

    def __init__(self, model: Embedder, config: ServeConfig,
                 on_batch: Callable[[BatchReport], None] | None = None) -> None:
        self.model = model
        self.config = config
        self.model_name = config.served_model_name
        self.created = int(time.time())
        self.normalize_by_default = model.config.normalize
        # The batcher shares raw pooled vectors between requests; each request then truncates
        # and normalises its own rows (so `dimensions` and `normalize` may differ per request).
        model.config.normalize = False
        model_max = model.config.max_length
        self.max_tokens = min(config.limits.max_tokens or model_max, model_max)
        if config.limits.max_tokens and config.limits.max_tokens > model_max:
            log.warning("limits.max_tokens=%d exceeds the model's max_length; using %d",
                        config.limits.max_tokens, model_max)
        prompts = model.config.prompts
        if config.default_input_type is not None and prompts and config.default_input_type not in prompts:
            raise ConfigError(f"default_input_type={config.default_input_type!r} is not a prompt of "
                              f"{config.model_path}; known: {sorted(prompts)}")
        # Only the event loop tokenises (a fast tokenizer must not be shared across threads);
        # the batcher's thread pads the resulting ids itself.
        self._pad_id = int(model.tokenizer.pad_token_id)
        self._padding_side = str(model.tokenizer.padding_side)
        self.batcher: TokenBudgetBatcher[list[int]] = TokenBudgetBatcher(
            self._encode_forward_pass,
            BatchLimits(max_batch_size=config.batching.max_batch_size,
                        max_batch_tokens=config.batching.max_batch_tokens,
                        wait_timeout_s=config.batching.batch_wait_timeout_s),
            on_batch=on_batch)

    @classmethod
    def load(cls, config: ServeConfig, torch_threads: int | None = None,
             on_batch: Callable[[BatchReport], None] | None = None) -> "EmbeddingService":
        return cls(load_embedder(config, torch_threads), config, on_batch=on_batch)

    # ------------------------------------------------------------------ description
    @property
    def dimensions(self) -> list[int]:
        return self.model.embedding_dims

    @property
    def input_types(self) -> list[str]:
        return sorted(self.model.config.prompts)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ embedding
    async def embed(self, inputs: TextInputs, *, input_type: str | None = None,
                    input_type_param: str = "input_type", dimensions: int | None = None,
                    normalize: bool | None = None, truncate: bool | None = None) -> EmbeddingResult:
        """Embed ``inputs`` (raises :class:`APIError` naming the field for any invalid value)."""
        if dimensions is not None and dimensions not in self.dimensions:
            raise APIError(400, f"dimensions={dimensions} is not served by this model; choose one of "
                                f"{self.dimensions}", param="dimensions", code="unsupported_dimensions")
        if truncate is None:
            truncate = self.config.limits.overflow == "truncate"
        prefix = self._resolve_prefix(input_type, input_type_param)
        texts = self._checked_texts(inputs, truncate)
        token_ids = self._tokenize(inputs, [prefix + t for t in texts], truncate)
        token_counts = [len(ids) for ids in token_ids]
        raw = await self.batcher.embed(token_ids, token_counts)
        norm = self.normalize_by_default if normalize is None else normalize
        return EmbeddingResult(truncate_embeddings_np(raw, dimensions, normalize=norm), sum(token_counts))

    def _resolve_prefix(self, input_type: str | None, param: str) -> str:
        try:
            return self.model.resolve_prompt(input_type if input_type is not None else self.config.default_input_type)
        except KeyError:
            raise APIError(400, f"{param}={input_type!r} is not an input type of this model; known: "
                                f"{self.input_types}", param=param, code="unknown_input_type") from None

    def _checked_texts(self, inputs: TextInputs, truncate: bool) -> list[str]:
        limits = self.config.limits
        if len(inputs.texts) > limits.max_inputs:
            raise APIError(400, f"{inputs.field}: {len(inputs.texts)} inputs exceed the limit of "
                                f"{limits.max_inputs} per request", param=inputs.field, code="too_many_inputs")
        texts: list[str] = []
        for i, text in enumerate(inputs.texts):
            if not text.strip():
                raise APIError(400, f"{inputs.param(i)}: empty text", param=inputs.param(i), code="empty_input")
            if len(text) > limits.max_chars:
                if not truncate:
                    raise APIError(400, f"{inputs.param(i)}: {len(text)} characters exceed the limit of "
                                        f"{limits.max_chars}", param=inputs.param(i), code="input_too_long")
                text = text[:limits.max_chars]
            texts.append(text)
        return texts

    def _tokenize(self, inputs: TextInputs, prefixed: list[str], truncate: bool) -> list[list[int]]:
        """Token ids cut at ``max_tokens`` (special tokens kept), exactly as ``Embedder.encode`` cuts them."""
        encoded = self.model.tokenizer(prefixed, truncation=True, max_length=self.max_tokens,
                                       return_attention_mask=False, return_token_type_ids=False)
        if not truncate:
            for i, encoding in enumerate(encoded.encodings):
                if encoding.overflowing:
                    raise APIError(400, f"{inputs.param(i)}: more than {self.max_tokens} tokens (the limit, "
                                        "prompt included)", param=inputs.param(i), code="input_too_long")
        return encoded["input_ids"]

    def _encode_forward_pass(self, token_ids: list[list[int]]) -> np.ndarray:
        """Raw pooled vectors of one padded forward pass (runs in the batcher's thread)."""
        features = pad_token_ids(token_ids, self._pad_id, self._padding_side)
        with torch.inference_mode():
            pooled = self.model({k: v.to(self.model.device) for k, v in features.items()})
        return pooled.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "dimensions": self.dimensions, "max_tokens": self.max_tokens,
                "input_types": self.input_types, "device": str(self.model.device)}
