"""Cached frozen-encoder tables (hit / miss / fingerprint, token roles) and the TextConditioner interface."""

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import tiny_checkpoints  # noqa: E402

from relcirc_jax.data import prompts, tokenizer  # noqa: E402
from relcirc_jax.text import bert, cache, conditioner, rte  # noqa: E402

CAPTIONS = (
    "blue triangle is to the upper left of red square",
    "circle is above square",
    "the red circle is below the blue square",
)


def _batch(indices):
    ids, mask = tokenizer.encode([CAPTIONS[i] for i in indices])
    return {"ids": ids, "mask": mask, "caption_index": np.asarray(indices, np.int32)}


def _cache_files(workdir):
    folder = os.path.join(workdir, "text_cache")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_minilm_table_roles_and_cache_hit_miss(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    table = cache.cached_text_table("minilm", "bert", bert.minilm_dir(), CAPTIONS, workdir, batch_size=2)
    assert table.embeddings.shape == (3, tokenizer.MAX_LEN, 384) and table.mask.shape == (3, tokenizer.MAX_LEN)
    files = _cache_files(workdir)
    assert len(files) == 1 and files[0].startswith("minilm-")

    # Rows equal a direct encode of each caption.
    config, params = bert.load_minilm()
    direct = bert.bert_encode(config, params, table.ids, table.mask)
    # float32 rows of a batch of 3 vs a direct batch: ~1e-5 apart by batching alone, a wrong row is off by O(0.1)
    np.testing.assert_allclose(table.embeddings, np.asarray(direct), rtol=0, atol=1e-4)

    # Roles follow the words: [CLS] blue triangle is to the upper left of red square [SEP] <pad>...
    role = {name: i for i, name in enumerate(prompts.ROLES)}
    expected = (
        [cache.SPECIAL_ROLE, role["color1"], role["shape1"], role["filler"]]
        + [role["relation"]] * 5
        + [role["color2"], role["shape2"], cache.SPECIAL_ROLE]
    )
    np.testing.assert_array_equal(table.roles[0, : len(expected)], expected)
    assert (table.roles[0, len(expected) :] == role["pad"]).all() and table.mask[0].sum() == len(expected)

    # Hit: nothing is recomputed.
    monkeypatch.setattr(cache, "compute_text_table", lambda *a, **k: pytest.fail("recomputed on a cache hit"))
    again = cache.cached_text_table("minilm", "bert", bert.minilm_dir(), CAPTIONS, workdir)
    np.testing.assert_array_equal(again.embeddings, table.embeddings)
    monkeypatch.undo()

    # Miss: another caption list has another fingerprint -> a second file, the first one kept.
    cache.cached_text_table("minilm", "bert", bert.minilm_dir(), CAPTIONS[:2], workdir)
    assert len(_cache_files(workdir)) == 2


def test_t5_style_sentencepiece_roles(tmp_path):
    """Metaspace tokens, a lone '▁' piece and '</s>' get the roles of their words (word_ids of the fast tokenizer)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>", "▁", "▁blue", "tri", "angle", "▁is", "▁above", "▁square"]
    backend = Tokenizer(models.Unigram([(p, -float(len(p))) for p in pieces], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    ).save_pretrained(tmp_path)
    tokens = cache.hf_tokenize(str(tmp_path), ["blue triangle is above square"], max_len=10)
    np.testing.assert_array_equal(tokens.ids[0, :8], [4, 3, 5, 6, 7, 8, 9, 1])  # blue _ tri angle is above square </s>
    role = {name: i for i, name in enumerate(prompts.ROLES)}
    np.testing.assert_array_equal(
        tokens.roles[0],
        [role["color1"]]
        + [role["shape1"]] * 3
        + [role["filler"], role["relation"], role["shape2"], cache.SPECIAL_ROLE, role["pad"], role["pad"]],
    )


def test_fingerprint_follows_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "minilm"
    shutil.copytree(bert.minilm_dir(), checkpoint)
    before = cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.float32)
    assert before == cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.float32)
    assert before != cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 16, jnp.float32)
    assert before != cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.bfloat16)
    with open(checkpoint / "config.json", "a") as f:
        f.write("\n ")  # same JSON content: same fingerprint
    assert before == cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.float32)
    # new weights of the same shapes saved over the old ones (the file's size and even its mtime kept): another table
    weights, stat = checkpoint / "model.safetensors", os.stat(checkpoint / "model.safetensors")
    tensors = safetensors.numpy.load_file(weights)
    largest = max(tensors, key=lambda name: tensors[name].size)  # a fine-tune moves (nearly) every weight
    tensors = {name: value + (name == largest) for name, value in tensors.items()}
    safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(weights) == stat.st_size
    retrained = cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.float32)
    assert retrained != before
    vocab = (checkpoint / "vocab.txt").read_text().splitlines(keepends=True)
    red, blue = vocab.index("red\n"), vocab.index("blue\n")
    vocab[red], vocab[blue] = vocab[blue], vocab[red]  # another tokenizer: other ids for the same captions
    (checkpoint / "vocab.txt").write_text("".join(vocab))
    assert cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.float32) != retrained
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="No weights"):
        cache._fingerprint("minilm", "bert", str(checkpoint), CAPTIONS, 20, jnp.float32)


def test_rte_conditioners_are_jittable_and_differ_only_by_positions():
    with_pos = conditioner.make_text_conditioner("rte", dim=32, position_scale=0.5)
    no_pos = conditioner.make_text_conditioner("rte_nopos", dim=32, position_scale=0.5)
    assert with_pos.dim == 32 and with_pos.tables["words"].shape == (len(prompts.VOCAB), 32)
    batch = _batch([0, 2])
    text, mask = jax.jit(with_pos.embed)(with_pos.tables, batch)
    plain, _ = jax.jit(no_pos.embed)(no_pos.tables, batch)
    assert text.shape == (2, tokenizer.MAX_LEN, 32) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask, batch["mask"])
    positions = 0.5 * rte.sinusoidal_positions(tokenizer.MAX_LEN, 32)
    np.testing.assert_allclose(text - plain, np.broadcast_to(positions, text.shape), atol=1e-6)


def test_cached_conditioner_gathers_rows_by_caption_index(tmp_path):
    minilm = conditioner.make_text_conditioner("minilm", workdir=str(tmp_path), captions=CAPTIONS)
    assert minilm.dim == 384 and minilm.token_roles.shape == (3, tokenizer.MAX_LEN)
    text, mask = jax.jit(minilm.embed)(minilm.tables, _batch([2, 0]))
    np.testing.assert_array_equal(text[0], minilm.tables["text"][2])
    np.testing.assert_array_equal(mask[1], minilm.tables["mask"][0])


def test_t5_conditioner_from_a_local_checkpoint(tmp_path):
    checkpoint = tmp_path / "tiny_t5"
    tiny_checkpoints.tiny_t5(checkpoint, with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="No tokenizer"):
        conditioner.make_text_conditioner("t5", t5_path=str(checkpoint), captions=CAPTIONS)
    tiny_checkpoints.tiny_t5(checkpoint)
    t5 = conditioner.make_text_conditioner("t5", t5_path=str(checkpoint), workdir=str(tmp_path), captions=CAPTIONS)
    assert t5.dim == 16 and _cache_files(str(tmp_path))[0].startswith("t5-")
    text, _ = t5.embed(t5.tables, _batch([1]))
    assert text.shape == (1, tokenizer.MAX_LEN, 16) and bool(jnp.all(jnp.isfinite(text)))


def test_bad_kinds_explained():
    with pytest.raises(ValueError, match="rte_nopos"):
        conditioner.make_text_conditioner("clip")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        conditioner.make_text_conditioner("t5")


def test_empty_caption_row_for_the_cfg_negative():
    # sample.negative="empty_prompt" reads the table row of "" (prompts.EMPTY_CAPTION_INDEX in the default table).
    table = cache.cached_text_table("minilm", "bert", bert.minilm_dir(), ("", CAPTIONS[1]), None)
    assert table.mask[0].sum() == 2  # [CLS] [SEP]
    np.testing.assert_array_equal(table.roles[0, :2], [cache.SPECIAL_ROLE] * 2)
    assert (table.roles[0, 2:] == 0).all() and np.isfinite(table.embeddings[0]).all()
