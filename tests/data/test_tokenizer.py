"""Tokenizers: GPT-2 ids against known values and against a plain-Python BPE written here from
vocab.bpe (nothing shared with ema_jax.data.tokenizer but the package's data files), and round trips
of both tokenizers on Unicode, emoji, empty and long strings."""

import json
import pickle
import random

import numpy as np
import pytest
import regex

from ema_jax.data import tokenizer as tokenizer_lib

ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello world",
    "héllo wörld, naïve café, Ünïcödé",
    "日本語のテキストと한국어 그리고 русский текст",
    "emoji: 🙂🚀👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👍🏽",
    "\x00\x01\t\n\r\n  trailing spaces   \n\n\n",
    "<|endoftext|> inside a document is ordinary text",
    "math ∑∫√∞ ≤ ≥ and combining e\u0301 a\u0308",
    "'s 't 're 've 'm 'll 'd   1234567890 !!!???",
]


def _long_text():
  rng = random.Random(0)
  alphabet = "abcdefghij klmnop\nqrstuv.,;'éüß日本🙂🚀\t0123456789"
  return "".join(rng.choice(alphabet) for _ in range(60_000))


@pytest.fixture(scope="module")
def gpt2():
  return tokenizer_lib.get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def byte_tok():
  return tokenizer_lib.get_tokenizer("byte")


# ------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_known_ids(gpt2):
  assert gpt2.vocab_size == 50257
  assert gpt2.eod_id == 50256
  assert gpt2.encode("Hello world") == [15496, 995]
  assert gpt2.decode([15496, 995]) == "Hello world"
  assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_literal_endoftext_is_not_the_special_id(gpt2):
  ids = gpt2.encode("a <|endoftext|> b")
  assert 50256 not in ids
  assert gpt2.decode(ids) == "a <|endoftext|> b"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["LONG"])
def test_gpt2_round_trip(gpt2, text):
  if text == "LONG":
    text = _long_text()
  ids = gpt2.encode(text)
  assert all(0 <= i < 50256 for i in ids)
  assert gpt2.decode(ids) == text
  np.testing.assert_array_equal(gpt2.encode_array(text), np.array(ids, np.int32))
  assert gpt2.num_bytes(ids) == len(text.encode("utf-8"))
  assert gpt2.num_bytes(ids + [gpt2.eod_id]) == len(text.encode("utf-8"))


def test_gpt2_byte_to_unicode_is_a_printable_bijection():
  mapping = tokenizer_lib.gpt2_byte_to_unicode()
  assert sorted(mapping) == list(range(256))
  assert len(set(mapping.values())) == 256
  assert all(c.isprintable() and not c.isspace() for c in mapping.values())
  assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"


@pytest.fixture(scope="module")
def reference_bpe():
  """GPT-2 BPE the slow, obvious way: merge the best-ranked adjacent pair until none is left."""
  encoder_path, merges_path = tokenizer_lib.gpt2_data_files()
  with open(encoder_path, encoding="utf-8") as f:
    encoder = json.load(f)
  with open(merges_path, encoding="utf-8") as f:
    lines = [line for line in f.read().split("\n")[1:] if line]
  merge_rank = {tuple(line.split(" ")): i for i, line in enumerate(lines)}
  byte_chars = tokenizer_lib.gpt2_byte_to_unicode()
  pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

  def encode(text):
    ids = []
    for piece in pattern.findall(text):
      symbols = [byte_chars[b] for b in piece.encode("utf-8")]
      while len(symbols) > 1:
        pairs = [(merge_rank.get(pair, 1 << 30), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
          break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
      ids.extend(encoder[s] for s in symbols)
    return ids

  return encoder, lines, encode


def test_gpt2_ranks_follow_vocab_bpe(reference_bpe):
  encoder, merges, _ = reference_bpe
  assert len(merges) == 50000 and len(encoder) == 50257
  for i in list(range(0, 50000, 997)) + [49999]:
    left, right = merges[i].split(" ")
    assert encoder[left + right] == 256 + i


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS[2:] + ["PROSE"])
def test_gpt2_matches_reference_bpe(gpt2, reference_bpe, text):
  if text == "PROSE":
    text = (
        "The Treaty of Westphalia (1648) ended the Thirty Years' War; it's often cited as "
        "the origin of the modern state system. Don't they'll we've I'm—quotes “curly”."
    )
  assert gpt2.encode(text) == reference_bpe[2](text)


# -------------------------------------------------------------------------------------------- byte


def test_byte_ids(byte_tok):
  assert byte_tok.vocab_size == 257
  assert byte_tok.eod_id == 256
  assert byte_tok.encode("Hi é") == [72, 105, 32, 195, 169]
  assert byte_tok.decode([72, 105, 256, 32, 195, 169]) == "Hi é"  # the eod id is dropped


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["LONG"])
def test_byte_round_trip(byte_tok, text):
  if text == "LONG":
    text = _long_text()
  ids = byte_tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert byte_tok.decode(ids) == text
  np.testing.assert_array_equal(byte_tok.encode_array(text), np.array(ids, np.int32))
  assert byte_tok.num_bytes(ids + [256]) == len(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ factory


def test_get_tokenizer_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match="gpt2.*byte"):
    tokenizer_lib.get_tokenizer("sentencepiece")


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_tokenizers_pickle(name):
  tok = tokenizer_lib.get_tokenizer(name)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("pickled 🙂") == tok.encode("pickled 🙂")
  assert (clone.vocab_size, clone.eod_id, clone.name) == (tok.vocab_size, tok.eod_id, name)
