"""Synthetic role grammars: labels checked by an independent parser, splits, determinism."""

import numpy as np
import pytest

from ema_jax.data import grammar as g

ROLE = {name: i for i, name in enumerate(g.ROLE_NAMES)}


class _Parser:
  """Recursive descent over the words alone (word classes from the lexicon), returning per word the
  role name and clause depth the grammar's documentation prescribes."""

  def __init__(self, words):
    self.words, self.i, self.out = list(words), 0, []

  def peek(self):
    return self.words[self.i] if self.i < len(self.words) else None

  def cls(self):
    return {"the": "det", "that": "that", "was": "was", "by": "by", "to": "to", None: "end"}.get(
        self.peek(), g.WORD_CLASS.get(self.peek())
    )

  def eat(self, want_cls, role, depth):
    assert self.cls() == want_cls, (self.words, self.i, want_cls)
    self.out.append([role, depth])
    self.i += 1
    return len(self.out) - 1

  def parse(self):
    self.clause(0)
    assert self.i == len(self.words), ("trailing words", self.words, self.i)
    return self.out

  def clause(self, d):
    subj = self.np(d)
    if self.cls() == "was":
      self.out[subj][0] = "PATIENT"
      self.passive_tail(d)
    else:
      self.out[subj][0] = "AGENT"
      self.vp(d)

  def passive_tail(self, d):
    self.eat("was", "OTHER", d)
    self.eat("v_tr", "VERB", d)
    self.eat("by", "OTHER", d)
    self.out[self.np(d)][0] = "AGENT"

  def vp(self, d):
    cls = self.cls()
    self.eat(cls, "VERB", d)
    if cls == "v_intr":
      return
    if cls == "v_tr":
      self.out[self.np(d)][0] = "PATIENT"
    elif cls == "v_ditr":
      first = self.np(d)
      if self.cls() == "to":
        self.out[first][0] = "PATIENT"
        self.eat("to", "OTHER", d)
        self.out[self.np(d)][0] = "RECIPIENT"
      else:
        self.out[first][0] = "RECIPIENT"
        self.out[self.np(d)][0] = "PATIENT"
    elif cls == "v_comp":
      self.eat("that", "OTHER", d + 1)
      self.clause(d + 1)
    else:
      raise AssertionError(f"no verb at {self.i} in {self.words}")

  def np(self, d):
    """Parses 'the ADJ* N RC?' and returns the index of the noun (its role is set by the caller)."""
    self.eat("det", "OTHER", d)
    while self.cls() == "adj":
      self.eat("adj", "OTHER", d)
    noun = self.eat("noun", None, d)
    if self.cls() == "that":  # after a noun, "that" can only open a relative clause
      self.relative(d + 1)
    return noun

  def relative(self, d):
    self.eat("that", "OTHER", d)
    if self.cls() == "was":  # passive relative: head noun is the patient
      self.passive_tail(d)
    elif self.cls() == "det":  # object relative: head noun is the object gap
      self.out[self.np(d)][0] = "AGENT"
      self.eat("v_tr", "VERB", d)
    else:  # subject relative: head noun is the subject gap
      self.vp(d)


def _parse(sentence_text):
  return [(role, depth) for role, depth in _Parser(sentence_text.split()).parse()]


def test_parser_on_hand_labelled_sentences():
  assert _parse("the dog that the cat chased ran") == [
      ("OTHER", 0),
      ("AGENT", 0),
      ("OTHER", 1),
      ("OTHER", 1),
      ("AGENT", 1),
      ("VERB", 1),
      ("VERB", 0),
  ]
  assert _parse("the dog that chased the cat ran") == [
      ("OTHER", 0),
      ("AGENT", 0),
      ("OTHER", 1),
      ("VERB", 1),
      ("OTHER", 1),
      ("PATIENT", 1),
      ("VERB", 0),
  ]
  assert _parse("the cat was chased by the old dog") == [
      ("OTHER", 0),
      ("PATIENT", 0),
      ("OTHER", 0),
      ("VERB", 0),
      ("OTHER", 0),
      ("OTHER", 0),
      ("OTHER", 0),
      ("AGENT", 0),
  ]
  assert [r for r, _ in _parse("the man gave the girl the dog")] == [
      "OTHER",
      "AGENT",
      "VERB",
      "OTHER",
      "RECIPIENT",
      "OTHER",
      "PATIENT",
  ]
  assert [r for r, _ in _parse("the man gave the dog to the girl")] == [
      "OTHER",
      "AGENT",
      "VERB",
      "OTHER",
      "PATIENT",
      "OTHER",
      "OTHER",
      "RECIPIENT",
  ]


def test_parser_depths_on_hand_labelled_sentence():
  assert _parse("the man said that the dog that was helped by the cat slept") == [
      ("OTHER", 0),
      ("AGENT", 0),
      ("VERB", 0),
      ("OTHER", 1),
      ("OTHER", 1),
      ("AGENT", 1),
      ("OTHER", 2),
      ("OTHER", 2),
      ("VERB", 2),
      ("OTHER", 2),
      ("OTHER", 2),
      ("AGENT", 2),
      ("VERB", 1),
  ]


@pytest.mark.parametrize("name,seed", [("A", 0), ("A", 7), ("B", 3)])
def test_generator_labels_match_independent_parse(name, seed):
  sentences = g.sample_sentences(name, 400, seed)
  max_depth = 0
  for sent in sentences:
    words = [w for w, _, _ in sent]
    expected = _Parser(words).parse()
    got = [(g.ROLE_NAMES[r], d) for _, r, d in sent]
    assert got == [tuple(e) for e in expected], " ".join(words)
    max_depth = max(max_depth, max(d for _, _, d in sent))
  assert max_depth >= 2  # deep embeddings are present


def test_arrays_agree_with_parse_and_padding_conventions():
  data = g.make_splits(200, 50, 50, seed=1, max_len=24)["heldout"]
  assert data.tokens.shape == data.roles.shape == data.depth.shape == data.mask.shape == (50, 24)
  assert data.tokens.dtype == np.int32 and data.mask.dtype == bool
  assert data.vocab == g.VOCAB and data.role_names == g.ROLE_NAMES
  assert np.all(data.roles[~data.mask] == -1) and np.all(data.depth[~data.mask] == -1)
  assert np.all(data.tokens[~data.mask] == g.PAD_ID)
  for i in range(len(data)):
    n = int(data.mask[i].sum())
    assert data.mask[i, :n].all()  # padding only at the end
    parsed = _Parser(g.decode(data.tokens[i]).split()).parse()
    assert [ROLE[r] for r, _ in parsed] == data.roles[i, :n].tolist()
    assert [d for _, d in parsed] == data.depth[i, :n].tolist()


def test_all_constructions_and_roles_occur():
  texts = [" ".join(w for w, _, _ in s) for s in g.sample_sentences("A", 2000, 0)]
  joined = "\n".join(texts)
  for pattern in (" was ", " by ", " to ", " that the ", " that was "):
    assert pattern in joined, pattern
  assert any(f" {v} that " in t for t in texts for v in g.GRAMMAR_A.words("v_comp"))
  roles = {r for s in g.sample_sentences("A", 500, 0) for _, r, _ in s}
  assert roles == set(range(len(g.ROLE_NAMES)))


def test_splits_are_disjoint():
  splits = g.make_splits(1500, 500, 500, seed=3)
  seqs = {k: {tuple(row[row != g.PAD_ID]) for row in v.tokens} for k, v in splits.items()}
  assert len(seqs["train"]) == 1500 and len(seqs["heldout"]) == 500 and len(seqs["transfer"]) == 500
  assert not seqs["train"] & seqs["heldout"]
  assert not seqs["train"] & seqs["transfer"]


def test_deterministic_by_seed():
  a, b, c = (
      g.make_splits(300, 100, 100, seed=5),
      g.make_splits(300, 100, 100, seed=5),
      g.make_splits(300, 100, 100, seed=6),
  )
  for k in a:
    for field in ("tokens", "roles", "depth", "mask"):
      np.testing.assert_array_equal(getattr(a[k], field), getattr(b[k], field))
  assert not np.array_equal(a["train"].tokens, c["train"].tokens)


def test_grammars_differ_in_lexicon_and_frequencies():
  a = g.sample_sentences("A", 1000, 0)
  b = g.sample_sentences("B", 1000, 0)
  words_a = {w for s in a for w, _, _ in s}
  words_b = {w for s in b for w, _, _ in s}
  assert not words_a & g.B_ONLY_WORDS
  assert words_b & g.B_ONLY_WORDS and words_b & (words_a - set(g.FUNCTION_WORDS))
  passive = lambda ss: np.mean([any(w == "was" for w, _, _ in s) for s in ss])
  assert passive(b) > passive(a) + 0.1
  assert max(d for s in b for _, _, d in s) > max(d for s in a for _, _, d in s) - 1


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="max_len"):
    g.sample_sentences("A", 10, 0, max_len=2)
  with pytest.raises(ValueError, match="distinct sentences"):
    g.sample_sentences("A", 100_000, 0, max_len=3, max_tries_factor=2)
