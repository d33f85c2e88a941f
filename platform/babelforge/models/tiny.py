"""Tiny random models for tests and smoke runs, built offline and deterministically.

The tokenizer is a byte-level BPE trained on a slice of the bundled NTREX corpus (BPE training in
``tokenizers`` is deterministic, and byte-level means no script is ever out of vocabulary). The
weights come from a fixed seed, so two builds are identical.

    >>> from babelforge.models.tiny import build_tiny_embedder
    >>> emb = build_tiny_embedder("xlm-roberta")
    >>> emb.encode(["Hallo Welt", "你好"]).shape
    (2, 32)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from babelforge.models.embedder import Embedder, EmbedderConfig

__all__ = ["build_tiny_tokenizer", "build_tiny_embedder", "save_tiny_embedder", "TinyArch"]

TinyArch = Literal["xlm-roberta", "bert", "qwen2"]

_TRAIN_LANGS = ("en", "de", "fr", "es", "ru", "zh", "ja", "ar", "hi", "th", "sw", "vi")


def _training_lines(lines_per_lang: int = 200) -> list[str]:
    from babelforge.resources import ntrex_file

    out: list[str] = []
    for lang in _TRAIN_LANGS:
        out.extend(ntrex_file(lang).read_text(encoding="utf-8").splitlines()[:lines_per_lang])
    return out


@lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int, family: str) -> str:
    """Serialized tokenizer.json (cached per process: training takes about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if family == "decoder":
        specials = ["<|endoftext|>", "<|pad|>"]
        unk = None
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        unk = "<unk>"
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    if family == "decoder":
        # Append the end-of-text token so last-token pooling reads a state that has seen the whole text.
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
                                                           special_tokens=[("<|endoftext|>", eos)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return tok.to_str()


def build_tiny_tokenizer(family: Literal["encoder", "decoder"] = "encoder", vocab_size: int = 2000):
    """A fast tokenizer (``PreTrainedTokenizerFast``) trained on bundled multilingual text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_bpe(vocab_size, family))
    if family == "decoder":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                       model_max_length=512)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                   model_max_length=512)


def _backbone(arch: str, tokenizer: Any, hidden_size: int, layers: int, heads: int, max_positions: int):
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2Model, XLMRobertaConfig, XLMRobertaModel

    vocab = len(tokenizer)
    common = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden_size * 4, vocab_size=vocab)
    if arch == "xlm-roberta":
        cfg = XLMRobertaConfig(**common, max_position_embeddings=max_positions + 2, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               type_vocab_size=1)
        return XLMRobertaModel(cfg, add_pooling_layer=False)
    if arch == "bert":
        cfg = BertConfig(**common, max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id)
        return BertModel(cfg, add_pooling_layer=False)
    if arch == "qwen2":
        cfg = Qwen2Config(**common, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
        return Qwen2Model(cfg)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected xlm-roberta, bert or qwen2")


def build_tiny_embedder(arch: TinyArch = "xlm-roberta", *, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                        max_length: int = 128, seed: int = 0, vocab_size: int = 2000, pooling: str | None = None,
                        prompts: dict[str, str] | None = None, matryoshka_dims: list[int] | None = None,
                        padding_side: str = "right") -> Embedder:
    """An in-memory random :class:`Embedder` of the given architecture (deterministic per seed)."""
    family = "decoder" if arch == "qwen2" else "encoder"
    tokenizer = build_tiny_tokenizer(family, vocab_size)
    torch.manual_seed(seed)
    backbone = _backbone(arch, tokenizer, hidden_size, layers, heads, max_length)
    backbone.eval()
    cfg = EmbedderConfig(pooling=pooling or ("last_token" if family == "decoder" else "mean"), max_length=max_length,
                         prompts=dict(prompts if prompts is not None else {"query": "query: ", "passage": "passage: "}),
                         matryoshka_dims=list(matryoshka_dims or []), padding_side=padding_side,
                         base_model=f"tiny-{arch}-h{hidden_size}-l{layers}-seed{seed}")
    return Embedder(backbone, tokenizer, cfg)


def save_tiny_embedder(out_dir: str | Path, arch: TinyArch = "xlm-roberta", **kwargs: Any) -> Path:
    """Build a tiny embedder and save it as a babelforge model directory."""
    return build_tiny_embedder(arch, **kwargs).save_pretrained(out_dir)
