"""The embedding model core: pooling on padded batches, prompts, Matryoshka, save/load parity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from babelforge.errors import ModelLoadError
from babelforge.models import Embedder, EmbedderConfig, pool, truncate_embeddings, truncate_embeddings_np
from babelforge.models.tiny import build_tiny_embedder

TEXTS = ["Hallo Welt", "Москва — столица России, и это длинное предложение с несколькими словами.",
         "東京は日本の首都です", "a", "مرحبا بالعالم"]


# ----------------------------------------------------------------------------- pooling (pure)
def test_pooling_matches_manual_computation_for_left_and_right_padding():
    torch.manual_seed(0)
    lengths = [3, 5, 1]
    h_right = torch.randn(3, 5, 4)
    right = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    # The same real tokens placed at the end of each row (left padding).
    h_left = torch.zeros_like(h_right)
    for i, n in enumerate(lengths):
        h_left[i, 5 - n:] = h_right[i, :n]
    left = torch.tensor([[0] * (5 - n) + [1] * n for n in lengths])

    for mode in ("cls", "mean", "last_token"):
        a, b = pool(h_right, right, mode), pool(h_left, left, mode)
        assert torch.allclose(a, b, atol=1e-6), mode
    expected_last = torch.stack([h_right[i, n - 1] for i, n in enumerate(lengths)])
    expected_mean = torch.stack([h_right[i, :n].mean(0) for i, n in enumerate(lengths)])
    assert torch.allclose(pool(h_right, right, "last_token"), expected_last)
    assert torch.allclose(pool(h_right, right, "mean"), expected_mean, atol=1e-6)
    assert torch.allclose(pool(h_right, right, "cls"), h_right[:, 0])


def test_pooling_rejects_unknown_mode_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")
    with pytest.raises(ValueError, match="does not match"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 3), "mean")


def test_matryoshka_truncation_renormalises():
    x = torch.randn(4, 16)
    t = truncate_embeddings(x, 8)
    assert t.shape == (4, 8)
    assert torch.allclose(t.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(t, torch.nn.functional.normalize(x[:, :8], dim=-1))
    assert np.allclose(truncate_embeddings_np(x.numpy(), 8), t.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="outside 1..16"):
        truncate_embeddings(x, 32)


# ----------------------------------------------------------------------------- embedder
@pytest.mark.parametrize("arch", ["xlm-roberta", "qwen2"])
def test_batch_composition_and_padding_side_do_not_change_embeddings(arch):
    """A text's embedding is the same alone, in a padded batch, and with left or right padding."""
    right = build_tiny_embedder(arch, padding_side="right")
    left = build_tiny_embedder(arch, padding_side="left")
    alone = np.stack([right.encode([t], prompt_name="query")[0] for t in TEXTS])
    batched_right = right.encode(TEXTS, prompt_name="query", batch_size=len(TEXTS))
    batched_left = left.encode(TEXTS, prompt_name="query", batch_size=len(TEXTS))
    feats = left.tokenize(TEXTS, prompt_name="query")
    assert (feats["attention_mask"][:, 0] == 0).any(), "left padding did not pad on the left"
    np.testing.assert_allclose(batched_right, alone, atol=2e-5)
    np.testing.assert_allclose(batched_left, alone, atol=2e-5)


def test_last_token_pooling_reads_the_appended_eos_of_decoders():
    emb = build_tiny_embedder("qwen2")
    feats = emb.tokenize(["Hallo Welt", "a"])
    for row, mask in zip(feats["input_ids"], feats["attention_mask"]):
        last = int(mask.nonzero().max())
        assert int(row[last]) == emb.tokenizer.eos_token_id


def test_prompts_are_prepended_and_change_the_embedding():
    emb = build_tiny_embedder("xlm-roberta", prompts={"query": "query: ", "passage": "passage: ",
                                                      "bitext": "Instruct: Retrieve the translation\nQuery: "})
    q = emb.encode(["Hallo Welt"], prompt_name="query")
    p = emb.encode(["Hallo Welt"], prompt_name="passage")
    raw = emb.encode(["query: Hallo Welt"])
    explicit = emb.encode(["Hallo Welt"], prompt="query: ")
    np.testing.assert_allclose(q, raw, atol=1e-6)
    np.testing.assert_allclose(q, explicit, atol=1e-6)
    assert not np.allclose(q, p, atol=1e-3)
    ids = emb.tokenize(["x"], prompt_name="bitext")["input_ids"][0]
    assert emb.tokenizer.decode(ids, skip_special_tokens=True).startswith("Instruct: Retrieve the translation\nQuery: ")
    with pytest.raises(KeyError, match="prompt_name 'nope'"):
        emb.encode(["x"], prompt_name="nope")


def test_encode_dim_truncates_and_normalises():
    emb = build_tiny_embedder("xlm-roberta", matryoshka_dims=[16, 8])
    full = emb.encode(TEXTS)
    small = emb.encode(TEXTS, dim=8)
    assert small.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(small, truncate_embeddings_np(full, 8), atol=1e-5)
    assert emb.embedding_dims == [32, 16, 8]


def test_max_length_truncates_long_inputs():
    emb = build_tiny_embedder("xlm-roberta", max_length=16)
    long_text = "Wort " * 200
    assert emb.count_tokens([long_text]) == [16]
    # Anything past the limit is ignored, so two texts sharing the first 16 tokens embed identically.
    a = emb.encode([long_text + " Ende"])
    b = emb.encode([long_text + " ganz anderes Ende"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_rejects_empty_and_non_string_inputs():
    emb = build_tiny_embedder("xlm-roberta")
    with pytest.raises(ValueError, match=r"texts\[1\]: empty text"):
        emb.encode(["ok", "   "])
    with pytest.raises(TypeError, match=r"texts\[0\]: expected str, got int"):
        emb.encode([3])
    assert emb.encode([]).shape == (0, 32)


def test_embedder_config_validation_names_the_field():
    with pytest.raises(ValueError, match="pooling: unknown mode 'max'"):
        EmbedderConfig(pooling="max")
    with pytest.raises(ValueError, match="default_prompt_name 'q'"):
        EmbedderConfig(prompts={"query": "query: "}, default_prompt_name="q")


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ["xlm-roberta", "bert", "qwen2"])
def test_save_load_roundtrip_and_sentence_transformers_parity(tmp_path, arch):
    from sentence_transformers import SentenceTransformer

    emb = build_tiny_embedder(arch, matryoshka_dims=[16, 8], prompts={"query": "query: ", "passage": "passage: "})
    path = emb.save_pretrained(tmp_path / arch)
    stored = json.loads((path / "babelforge.json").read_text())
    assert stored["pooling"] == emb.config.pooling and stored["matryoshka_dims"] == [16, 8]
    assert stored["prompts"] == {"query": "query: ", "passage": "passage: "}

    reloaded = Embedder.from_pretrained(path)
    assert reloaded.config == emb.config
    ours = emb.encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(reloaded.encode(TEXTS, prompt_name="query"), ours, atol=1e-6)

    st = SentenceTransformer(str(path), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="query"), ours, atol=1e-5)
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="passage"), emb.encode(TEXTS, prompt_name="passage"), atol=1e-5)
    st8 = SentenceTransformer(str(path), device="cpu", truncate_dim=8)
    np.testing.assert_allclose(st8.encode(TEXTS, normalize_embeddings=True), emb.encode(TEXTS, dim=8), atol=1e-5)


def test_plain_sentence_transformers_directory_is_read(tmp_path):
    """A directory without babelforge.json takes pooling and prompts from sentence-transformers files."""
    emb = build_tiny_embedder("xlm-roberta", pooling="cls", prompts={"query": "q: "})
    path = emb.save_pretrained(tmp_path / "m")
    (path / "babelforge.json").unlink()
    loaded = Embedder.from_pretrained(path)
    assert loaded.config.pooling == "cls" and loaded.config.prompts == {"query": "q: "}
    np.testing.assert_allclose(loaded.encode(TEXTS, prompt_name="query"), emb.encode(TEXTS, prompt_name="query"), atol=1e-6)


def test_overrides_replace_stored_config(tiny_encoder_dir):
    loaded = Embedder.from_pretrained(tiny_encoder_dir, pooling="cls", max_length=64)
    assert loaded.config.pooling == "cls" and loaded.config.max_length == 64


# ----------------------------------------------------------------------------- bad model sources
def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Embedder.from_pretrained(tmp_path / "nope")


def test_hub_id_fails_offline_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"hub model .intfloat/multilingual-e5-small. is not a local directory and HF_HUB_OFFLINE=1"):
        Embedder.from_pretrained("intfloat/multilingual-e5-small")


def test_corrupt_weights_are_reported(tmp_path, tiny_encoder_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_encoder_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        Embedder.from_pretrained(bad)


def test_corrupt_babelforge_config_is_reported(tmp_path, tiny_encoder_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_encoder_dir, bad)
    (bad / "babelforge.json").write_text('{"pooling": "mean", "polling": 1}')
    with pytest.raises(ModelLoadError, match=r"unknown keys \['polling'\]"):
        Embedder.from_pretrained(bad)
    (bad / "babelforge.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="babelforge.json: not valid JSON"):
        Embedder.from_pretrained(bad)


def test_missing_config_json_is_reported(tmp_path, tiny_encoder_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_encoder_dir, bad)
    (bad / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="cannot read config.json"):
        Embedder.from_pretrained(bad)


def test_object_storage_model_dir_is_copied_to_the_cache_once(tmp_path, monkeypatch, tiny_encoder_dir):
    """Trained models exported to cluster storage (s3://, gs://) load through fsspec; memory:// stands in."""
    import fsspec

    from babelforge.models.sources import resolve_model_dir

    monkeypatch.setenv("BABELFORGE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_encoder_dir), "/bucket/run/final", recursive=True)
    local = resolve_model_dir("memory://bucket/run/final")
    assert local.is_relative_to(tmp_path / "cache") and (local / "babelforge.json").is_file()
    assert resolve_model_dir("memory://bucket/run/final") == local  # cached, not copied again
    remote = Embedder.from_pretrained("memory://bucket/run/final")
    np.testing.assert_allclose(remote.encode(TEXTS), Embedder.from_pretrained(tiny_encoder_dir).encode(TEXTS), atol=1e-6)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir("memory://bucket/run/missing")


def test_inference_placement_puts_bf16_on_cuda_only_and_keeps_explicit_choices(monkeypatch):
    from babelforge.models import inference_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_placement() == ("cpu", "float32")
    assert inference_placement("auto", "auto") == ("cpu", "float32")
    assert inference_placement("cpu", "bfloat16") == ("cpu", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_placement() == ("cuda", "bfloat16")
    assert inference_placement("cuda:1", None) == ("cuda:1", "bfloat16")
    assert inference_placement("auto", "float32") == ("cuda", "float32")
