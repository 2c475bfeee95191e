import numpy as np
import pytest
import torch

from harness.config import DataConfig
from harness.data import (
    ByteTokenizer,
    HFTokenizer,
    WindowLoader,
    check_windows,
    prepare,
    sample_windows,
    train_bpe_tokenizer,
    val_batches,
)

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


def test_embedded_corpus_splits_deterministically(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    a = prepare(cfg)
    b = prepare(cfg)  # second call reads the cache
    assert a.vocab_size == 256
    assert a.n_train > 4_000_000 and 0.04 < a.n_val / (a.n_train + a.n_val) < 0.06
    assert np.array_equal(a.val[0], b.val[0]) and np.array_equal(a.train[0][:1000], b.train[0][:1000])
    assert isinstance(a.train[0], np.memmap)


def test_text_file_round_trips_bytes(tmp_path, text_file):
    data = prepare(DataConfig(source="text_file", path=str(text_file), cache_dir=str(tmp_path / "c")))
    joined = np.concatenate([*data.train, *data.val])
    assert len(joined) == len(TEXT.encode())
    assert sorted(joined.tolist()) == sorted(ByteTokenizer().encode(TEXT).tolist())


def test_loader_batches_depend_only_on_seed_and_step(tmp_path, text_file):
    data = prepare(DataConfig(source="text_file", path=str(text_file), cache_dir=str(tmp_path / "c")))
    a = WindowLoader(data.train, 32, 4, seed=7)
    b = WindowLoader(data.train, 32, 4, seed=7)
    x5, y5 = a.batch(5)
    b.batch(0), b.batch(1)
    assert (b.batch(5)[0] == x5).all()
    assert (x5[:, 1:] == y5[:, :-1]).all()  # targets are inputs shifted by one
    assert not (WindowLoader(data.train, 32, 4, seed=8).batch(5)[0] == x5).all()
    v1 = [x for x, _ in val_batches(data, 32, 4, 3)]
    v2 = [x for x, _ in val_batches(data, 32, 4, 3)]
    assert all((p == q).all() for p, q in zip(v1, v2, strict=True))


def test_local_tokenizer_json(tmp_path, text_file):
    tok_path = train_bpe_tokenizer(text_file, 300, tmp_path / "tok" / "tokenizer.json")
    tok = HFTokenizer(tok_path)
    assert tok.vocab_size <= 300
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
    data = prepare(DataConfig(source="text_file", path=str(text_file), tokenizer=str(tok_path),
                              cache_dir=str(tmp_path / "c")))  # fmt: skip
    assert data.vocab_size == tok.vocab_size
    assert data.n_train + data.n_val < len(TEXT) / 2  # BPE compresses this text well
    assert data.train[0].dtype == np.uint16


def test_changed_file_is_retokenized(tmp_path, text_file):
    cfg = DataConfig(source="text_file", path=str(text_file), cache_dir=str(tmp_path / "c"))
    n1 = prepare(cfg).n_train
    text_file.write_text(TEXT + TEXT)
    assert prepare(cfg).n_train > n1


def test_bad_data_config_is_reported(tmp_path):
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(source="text_file")
    with pytest.raises(ValueError, match="tokenizer file not found"):
        DataConfig(tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="data.source"):
        DataConfig(source="wikipedia")


def test_hugging_face_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    rows = [f"Row {i}: to be or not to be." for i in range(2000)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": rows})}).save_to_disk(str(saved))
    cfg = DataConfig(source="hf_disk", path=str(saved), text_field="content", cache_dir=str(tmp_path / "c"))
    data = prepare(cfg)
    assert data.n_train + data.n_val == len("\n\n".join(rows).encode())
    with pytest.raises(ValueError, match="column 'text' not in"):
        prepare(DataConfig(source="hf_disk", path=str(saved), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="no dataset saved"):
        DataConfig(source="hf_disk", path=str(tmp_path))


def test_window_sampling_reaches_every_start_and_a_minimal_shard():
    shard = np.arange(9, dtype=np.uint8)  # exactly one window of 8 + 1 tokens
    w = sample_windows([shard], 8, 3, np.random.default_rng(0))
    assert (w == torch.arange(9)).all()
    starts = {int(sample_windows([np.arange(12)], 8, 1, np.random.default_rng(i))[0, 0]) for i in range(200)}
    assert starts == {0, 1, 2, 3}


def test_too_short_split_is_reported_before_training(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text("abcdefgh" * 200)
    data = prepare(DataConfig(source="text_file", path=str(p), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="validation split has .* fewer than one window"):
        check_windows(data, 512)


def test_invalid_utf8_is_refused_naming_the_file_and_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(TEXT.encode()[:3000] + "café".encode("latin-1") + TEXT.encode()[:3000])
    cache = tmp_path / "c"
    with pytest.raises(ValueError) as e:
        prepare(DataConfig(source="text_file", path=str(p), cache_dir=str(cache)))
    assert f"corpus {p} is not valid UTF-8: byte 0xe9 at offset 3003;" in str(e.value)
    assert "data.decode=replace" in str(e.value)
    assert not cache.exists()  # refused before anything is written


def test_decode_replace_counts_the_bytes_it_replaced(tmp_path):
    # an invalid byte, a truncated three-byte sequence (two bytes, one U+FFFD) and a genuine U+FFFD
    raw = TEXT.encode() + b"\xff" + b"\xe2\x82" + "\ufffd".encode() + TEXT.encode()
    p = tmp_path / "mixed.txt"
    p.write_bytes(raw)
    cfg = DataConfig(source="text_file", path=str(p), decode="replace", cache_dir=str(tmp_path / "c"))
    data = prepare(cfg)
    assert data.replaced_bytes == 3
    assert data.n_train + data.n_val == len(raw) - 3 + 2 * len("\ufffd".encode())
    assert prepare(cfg).replaced_bytes == 3  # a cache hit knows the count too


def test_decode_policy_keys_the_cache_and_leaves_valid_text_alone(tmp_path, text_file):
    cache = tmp_path / "c"
    strict = prepare(DataConfig(source="text_file", path=str(text_file), cache_dir=str(cache)))
    lenient = prepare(
        DataConfig(source="text_file", path=str(text_file), decode="replace", cache_dir=str(cache))
    )
    assert strict.replaced_bytes == lenient.replaced_bytes == 0
    assert np.array_equal(np.concatenate(strict.train), np.concatenate(lenient.train))
    assert len(list(cache.iterdir())) == 2
