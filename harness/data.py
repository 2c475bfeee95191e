"""Corpora, tokenizers and the window loader.

A corpus is tokenized once into memory-mapped shards under `data.cache_dir/<key>/`, where the key
hashes the source bytes, the decoding policy, the tokenizer and the split rule, so a changed file is
re-tokenized and an unchanged one never is. Invalid UTF-8 is refused, naming the first bad byte,
unless `data.decode=replace`, which maps it to U+FFFD and records how many bytes it replaced.
The split is deterministic: the token stream is cut into blocks of
`SPLIT_BLOCK` tokens (smaller for small corpora) and every k-th block (k = round(1 / val_fraction)) goes to validation, so both
splits sample every part of the corpus without sharing text.

Batches are random contiguous windows. The windows of step i depend only on (seed, i), so resuming
at step i reproduces exactly the batches of a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.config import DataConfig
from harness.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "shakespeare.txt.xz"
SPLIT_BLOCK = 4096
SHARD_TOKENS = 1 << 26  # 64 Mi tokens per shard file


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, no training."""

    vocab_size = 256
    name = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face `tokenizers` file (tokenizer.json); nothing is fetched from a hub."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self.tok.get_vocab_size()
        self.name = "hf-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def train_bpe_tokenizer(text_path: str | Path, vocab_size: int, out_path: str | Path) -> Path:
    """Trains a byte-level BPE tokenizer on a local text file and saves tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_path)], trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return out_path


def get_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


def read_hf_disk(path: str | Path, text_field: str, split: str) -> str:
    """Texts of a Hugging Face dataset saved with `save_to_disk` (a Dataset or a DatasetDict),
    joined by blank lines. Local files only: no hub access."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "data.source=hf_disk needs the `datasets` package: pip install 'harness[hf]'"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split {split!r} not in the saved dataset (has {sorted(ds)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"column {text_field!r} not in the saved dataset (has {ds.column_names})")
    return "\n\n".join(ds[text_field])


def read_source(cfg: DataConfig) -> bytes:
    if cfg.source == "shakespeare":
        return lzma.decompress(EMBEDDED_CORPUS.read_bytes())
    if cfg.source == "hf_disk":
        return read_hf_disk(cfg.path, cfg.text_field, cfg.split).encode("utf-8")
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    return path.read_bytes()


def _source_name(cfg: DataConfig) -> str:
    return str(EMBEDDED_CORPUS) if cfg.source == "shakespeare" else cfg.path


def decode_text(raw: bytes, policy: str, source: str) -> tuple[str, int]:
    """The corpus text and the number of invalid bytes replaced (always 0 under "strict")."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if policy != "replace":
            raise ValueError(
                f"corpus {source} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}; "
                "fix the file or pass data.decode=replace"
            ) from None
    text = raw.decode("utf-8", errors="replace")
    # One U+FFFD stands for a whole invalid run, so count bytes, not marks: the valid bytes are the
    # text re-encoded less the inserted marks (3 bytes each). EF BF BD in the source is always a
    # genuine U+FFFD: an invalid run ends at any byte that is not a continuation byte, such as EF.
    inserted = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    return text, len(raw) - (len(text.encode("utf-8")) - 3 * inserted)


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def check_windows(data: TokenData, seq_len: int) -> None:
    """Both splits must hold a window of seq_len + 1 tokens; checked before any training step."""
    for split, n in (("train", data.n_train), ("validation", data.n_val)):
        if n < seq_len + 1:
            raise ValueError(
                f"the {split} split has {n} tokens, fewer than one window of model.seq_len + 1 = {seq_len + 1}; "
                "use a larger corpus, a shorter seq_len or a larger data.val_fraction"
            )


@dataclass
class TokenData:
    train: list[np.ndarray]  # memory-mapped shards
    val: list[np.ndarray]
    vocab_size: int
    replaced_bytes: int = 0  # invalid UTF-8 bytes mapped to U+FFFD (data.decode=replace)

    @property
    def n_train(self) -> int:
        return sum(len(s) for s in self.train)

    @property
    def n_val(self) -> int:
        return sum(len(s) for s in self.val)


def prepare(cfg: DataConfig) -> TokenData:
    """Tokenizes the corpus into the cache once (atomically) and memory-maps the shards."""
    raw = read_source(cfg)
    tok = get_tokenizer(cfg.tokenizer)
    key_parts = (
        hashlib.sha256(raw).hexdigest(),
        cfg.decode,
        tok.name,
        cfg.val_fraction,
        SPLIT_BLOCK,
        SHARD_TOKENS,
    )
    key_src = "|".join(map(str, key_parts))
    out = Path(cfg.cache_dir) / hashlib.sha256(key_src.encode()).hexdigest()[:20]
    meta_path = out / "meta.json"
    if not meta_path.exists():
        # Decoded before anything is written: a strict cache entry exists only for valid UTF-8.
        text, replaced = decode_text(raw, cfg.decode, _source_name(cfg))
        if replaced:
            log.warning("corpus %s: %d invalid UTF-8 bytes replaced by U+FFFD", _source_name(cfg), replaced)
        log.info("tokenizing %s (%d bytes) with %s into %s", cfg.source, len(raw), tok.name, out)
        ids = tok.encode(text).astype(_dtype_for(tok.vocab_size))
        every = max(2, round(1 / cfg.val_fraction))
        # Small corpora get smaller blocks, so validation still gets a dozen of them.
        block = max(64, min(SPLIT_BLOCK, len(ids) // (12 * every)))
        n_blocks = -(-len(ids) // block)
        if n_blocks < every:
            raise ValueError(f"corpus too small: {len(ids)} tokens cannot give a validation split")
        is_val = (np.arange(n_blocks) % every) == every - 1
        blocks = [ids[i * block : (i + 1) * block] for i in range(n_blocks)]
        splits = {
            "train": np.concatenate([b for b, v in zip(blocks, is_val, strict=True) if not v]),
            "val": np.concatenate([b for b, v in zip(blocks, is_val, strict=True) if v] or [ids[:0]]),
        }
        meta = {
            "vocab_size": tok.vocab_size,
            "dtype": str(ids.dtype),
            "tokenizer": tok.name,
            "decode": cfg.decode,
            "replaced_bytes": replaced,
            "shards": {},
        }
        for split, arr in splits.items():
            names = []
            for j in range(0, max(len(arr), 1), SHARD_TOKENS):
                name = f"{split}_{j // SHARD_TOKENS:04d}.bin"
                atomic_write_bytes(out / name, arr[j : j + SHARD_TOKENS].tobytes())
                names.append(name)
            meta["shards"][split] = names
        atomic_write_json(meta_path, meta)  # written last: its presence marks a complete cache
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    maps = {
        s: [np.memmap(out / n, dtype=dtype, mode="r") for n in names] for s, names in meta["shards"].items()
    }
    return TokenData(
        train=maps["train"],
        val=maps["val"],
        vocab_size=meta["vocab_size"],
        replaced_bytes=meta.get("replaced_bytes", 0),
    )


def sample_windows(shards: list[np.ndarray], seq_len: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n random contiguous windows of seq_len + 1 tokens (inputs and shifted targets)."""
    starts = np.clip(np.array([len(s) - seq_len for s in shards]), 0, None)  # window starts per shard
    if starts.sum() == 0:
        raise ValueError(f"corpus split is shorter than one window of {seq_len + 1} tokens")
    which = rng.choice(len(shards), size=n, p=starts / starts.sum())
    out = np.empty((n, seq_len + 1), dtype=np.int64)
    for r, s in enumerate(which):
        start = rng.integers(0, starts[s])
        out[r] = shards[s][start : start + seq_len + 1]
    return torch.from_numpy(out)


class WindowLoader:
    """Seeded, resumable batches: batch(step) depends only on (seed, step)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, batch_size: int, seed: int):
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = sample_windows(
            self.shards, self.seq_len, self.batch_size, np.random.default_rng([self.seed, step])
        )
        return w[:, :-1], w[:, 1:]


class Prefetcher:
    """Batches `start`, `start + 1`, ... of `loader`, rows `rows` of each (this rank's share),
    prepared `depth` ahead in a background thread so the next batch is ready when a step ends.
    For a CUDA device they are pinned, so the copy to the device does not block the host."""

    def __init__(self, loader: WindowLoader, start: int, rows: slice, device: torch.device, depth: int = 2):
        self.loader, self.step, self.rows = loader, start, rows
        self.pin = device.type == "cuda"
        self.queue: queue.Queue | None = None
        if depth > 0:
            self.queue = queue.Queue(maxsize=depth)
            self.stopped = threading.Event()
            self.thread = threading.Thread(target=self._fill, args=(start,), daemon=True, name="prefetch")
            self.thread.start()

    def _make(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.batch(step)
        x, y = x[self.rows], y[self.rows]
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _fill(self, step: int) -> None:
        while not self.stopped.is_set():
            try:
                item = (step, self._make(step))
            except BaseException as e:  # raised in the training thread, at the batch it concerns
                item = (step, e)
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, in order."""
        if self.queue is None:
            batch = self._make(self.step)
        else:
            step, batch = self.queue.get()
            assert step == self.step, (step, self.step)
            if isinstance(batch, BaseException):
                raise batch
        self.step += 1
        return batch

    def close(self) -> None:
        if self.queue is not None:
            self.stopped.set()
            self.thread.join(timeout=5)


def val_batches(data: TokenData, seq_len: int, batch_size: int, n_batches: int, seed: int = 1234):
    """The same validation windows at every evaluation (and in every run with the same seed)."""
    rng = np.random.default_rng([seed, 0xBA1])
    for _ in range(n_batches):
        w = sample_windows(data.val, seq_len, batch_size, rng)
        yield w[:, :-1], w[:, 1:]
