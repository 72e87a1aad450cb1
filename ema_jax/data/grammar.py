"""Two small synthetic grammars (A and B) labelled with thematic roles and embedding depth.

Each sentence is a list of lower-case words; every word carries a role (ROLE_NAMES) and the depth of
the clause it belongs to (0 = main clause, 1 = a clause embedded in it, ...). A noun's role is its role
in its *own* clause, so the head noun of a relative clause keeps its outer role ("the dog that the cat
chased ran": dog AGENT depth 0, cat AGENT depth 1) and the same surface position can carry different
roles ("the cat was chased by the dog": cat PATIENT, dog AGENT).

The grammar, written as the recursive functions below (S = clause, NP = noun phrase):

    S     -> NP[AGENT] VP                                  active clause
           | NP[PATIENT] was V_tr[VERB] by NP[AGENT]       passive clause (p_passive)
    VP    -> V_intr                                        "the dog ran"
           | V_tr NP[PATIENT]                              "the dog chased the cat"
           | V_ditr NP[RECIPIENT] NP[PATIENT]              "the man gave the girl the book"  (double object)
           | V_ditr NP[PATIENT] to NP[RECIPIENT]           "the man gave the book to the girl" (to-dative)
           | V_comp that S'                                "the man said that S'"  (S' one level deeper)
    NP    -> the ADJ? N RC?                                determiner and adjectives are OTHER
    RC    -> that VP'                                      subject relative: the head noun is the gap subject
           | that NP'[AGENT] V_tr'                         object relative: the head noun is the gap object
           | that was V_tr' by NP'[AGENT]                  passive relative
    (primes: one level deeper; "that", "was", "by", "to", "the" and adjectives are OTHER)

Every verb token is VERB; the subject of every active clause (transitive or not) is AGENT. Transitive
verbs are regular (past tense == past participle), so the same token appears in active and passive
clauses and only the structure tells the roles apart. Noun phrases get one relative clause at most,
so a greedy parse of the words is unambiguous (tests/data/test_grammar.py checks the labels that way).
Clauses at `max_depth` embed nothing further.

A vs B (the transfer test). Both share the function words and the grammar above; they differ in
  * lexicon: B keeps half of A's nouns and verbs of every class and replaces the other half with words
    A never uses (B_ONLY_WORDS), so the vocabulary (the union, fixed order) is shared but B has unseen words;
  * construction frequencies: B has more passives, object relatives, relative clauses, complement
    clauses and to-datives, and allows one level deeper embedding (see GRAMMAR_A / GRAMMAR_B).

Arrays: `to_arrays` pads to `max_len`: tokens int32 [N, T] (0 = PAD), roles and depth int32 [N, T]
(-1 at padding), mask bool [N, T].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ROLE_NAMES = ("OTHER", "VERB", "AGENT", "PATIENT", "RECIPIENT")
OTHER, VERB, AGENT, PATIENT, RECIPIENT = range(len(ROLE_NAMES))
PAD = "<pad>"
PAD_ID = 0
FUNCTION_WORDS = ("the", "that", "was", "by", "to")

# Content lexicon. Each class: words used by both grammars, by A only, by B only.
_LEXICON = {
    "noun": (
        ("dog", "cat", "man", "woman", "girl", "boy"),
        ("bird", "teacher", "doctor", "farmer", "child", "king"),
        ("horse", "nurse", "pilot", "baker", "student", "queen"),
    ),
    "v_tr": (  # regular verbs: past tense == past participle
        ("chased", "liked", "helped", "pushed"),
        ("followed", "kicked", "watched", "called"),
        ("visited", "pulled", "loved", "greeted"),
    ),
    "v_intr": (("ran", "slept"), ("laughed", "smiled"), ("cried", "jumped")),
    "v_ditr": (("gave", "sent"), ("showed",), ("handed",)),
    "v_comp": (("said", "thought"), ("knew",), ("believed",)),
    "adj": (("old", "big"), ("small",), ("happy",)),
}
WORD_CLASSES = tuple(_LEXICON)
B_ONLY_WORDS = frozenset(w for shared_a_b in _LEXICON.values() for w in shared_a_b[2])
# One vocabulary for both grammars, so ids mean the same word in A and B.
VOCAB = (PAD,) + FUNCTION_WORDS + tuple(w for cls in WORD_CLASSES for part in _LEXICON[cls] for w in part)
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
WORD_CLASS = {w: cls for cls in WORD_CLASSES for part in _LEXICON[cls] for w in part}


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
  """Lexicon and construction probabilities of one grammar."""

  name: str
  lexicon: str  # "A" or "B": which half of the content words (see _LEXICON)
  p_passive: float  # a clause is passive
  vp_weights: tuple  # active VP: (intransitive, transitive, ditransitive, complement clause)
  p_to_dative: float  # a ditransitive uses "V NP to NP" instead of "V NP NP"
  p_rel: float  # a noun phrase gets a relative clause (times rel_decay ** depth)
  rel_decay: float
  rel_weights: tuple  # relative clause type: (subject, object, passive)
  p_adj: float  # a noun phrase gets an adjective
  max_depth: int  # clauses at this depth embed nothing

  def words(self, cls: str) -> tuple:
    shared, a_only, b_only = _LEXICON[cls]
    return shared + (a_only if self.lexicon == "A" else b_only)


GRAMMAR_A = GrammarSpec(
    name="A",
    lexicon="A",
    p_passive=0.15,
    vp_weights=(0.2, 0.5, 0.15, 0.15),
    p_to_dative=0.4,
    p_rel=0.25,
    rel_decay=0.6,
    rel_weights=(0.6, 0.3, 0.1),
    p_adj=0.2,
    max_depth=3,
)
GRAMMAR_B = GrammarSpec(
    name="B",
    lexicon="B",
    p_passive=0.35,
    vp_weights=(0.15, 0.4, 0.2, 0.25),
    p_to_dative=0.7,
    p_rel=0.35,
    rel_decay=0.7,
    rel_weights=(0.3, 0.5, 0.2),
    p_adj=0.2,
    max_depth=4,
)
GRAMMARS = {"A": GRAMMAR_A, "B": GRAMMAR_B}

Sentence = tuple  # ((word, role, depth), ...)


class _Generator:

  def __init__(self, spec: GrammarSpec, rng: np.random.Generator):
    self.spec, self.rng = spec, rng

  def _word(self, cls):
    words = self.spec.words(cls)
    return words[self.rng.integers(len(words))]

  def _choice(self, weights):
    w = np.asarray(weights, np.float64)
    return int(self.rng.choice(len(w), p=w / w.sum()))

  def clause(self, depth):
    if self.rng.random() < self.spec.p_passive:
      return (
          self.np(PATIENT, depth)
          + [("was", OTHER, depth), (self._word("v_tr"), VERB, depth), ("by", OTHER, depth)]
          + self.np(AGENT, depth)
      )
    return self.np(AGENT, depth) + self.vp(depth)

  def vp(self, depth):
    weights = list(self.spec.vp_weights)
    if depth >= self.spec.max_depth:
      weights[3] = 0.0
    kind = self._choice(weights)
    if kind == 0:
      return [(self._word("v_intr"), VERB, depth)]
    if kind == 1:
      return [(self._word("v_tr"), VERB, depth)] + self.np(PATIENT, depth)
    if kind == 2:
      verb = [(self._word("v_ditr"), VERB, depth)]
      if self.rng.random() < self.spec.p_to_dative:
        return verb + self.np(PATIENT, depth) + [("to", OTHER, depth)] + self.np(RECIPIENT, depth)
      return verb + self.np(RECIPIENT, depth) + self.np(PATIENT, depth)
    return [(self._word("v_comp"), VERB, depth), ("that", OTHER, depth + 1)] + self.clause(depth + 1)

  def np(self, role, depth):
    words = [("the", OTHER, depth)]
    if self.rng.random() < self.spec.p_adj:
      words.append((self._word("adj"), OTHER, depth))
    words.append((self._word("noun"), role, depth))
    p_rel = self.spec.p_rel * self.spec.rel_decay**depth if depth < self.spec.max_depth else 0.0
    if self.rng.random() < p_rel:
      words += self.relative_clause(depth + 1)
    return words

  def relative_clause(self, depth):
    kind = self._choice(self.spec.rel_weights)
    that = [("that", OTHER, depth)]
    if kind == 0:
      return that + self.vp(depth)
    if kind == 1:
      return that + self.np(AGENT, depth) + [(self._word("v_tr"), VERB, depth)]
    return (
        that + [("was", OTHER, depth), (self._word("v_tr"), VERB, depth), ("by", OTHER, depth)] + self.np(AGENT, depth)
    )


def sample_sentences(
    spec: GrammarSpec | str,
    n: int,
    seed: int,
    *,
    max_len: int = 32,
    exclude: frozenset | set = frozenset(),
    max_tries_factor: int = 50,
) -> list:
  """`n` distinct sentences (by word sequence) of at most `max_len` words, none in `exclude`.

  Deterministic in (spec, n, seed, max_len, exclude). Longer sentences are redrawn, so the length cap
  slightly lowers the share of deep sentences; `exclude` holds word tuples.
  """
  spec = GRAMMARS[spec] if isinstance(spec, str) else spec
  if max_len < 3:
    raise ValueError(f"max_len={max_len}: the shortest sentence ('the N V') has 3 words; use >= 3")
  gen = _Generator(spec, np.random.default_rng(seed))
  seen, out = set(exclude), []
  for _ in range(max(n, 1) * max_tries_factor):
    if len(out) == n:
      return out
    sent = tuple(gen.clause(0))
    words = tuple(w for w, _, _ in sent)
    if len(words) <= max_len and words not in seen:
      seen.add(words)
      out.append(sent)
  if len(out) < n:
    raise ValueError(
        f"grammar {spec.name}: found only {len(out)} distinct sentences of <= {max_len} "
        f"words out of n={n} asked for; ask for fewer or raise max_len"
    )
  return out


@dataclasses.dataclass(frozen=True)
class RoleData:
  """Padded role-labelled sentences. tokens [N, T] int32 (PAD_ID at padding); roles, depth [N, T]
  int32 (-1 at padding); mask [N, T] bool; vocab: id -> word; role_names: role id -> name."""

  tokens: np.ndarray
  roles: np.ndarray
  depth: np.ndarray
  mask: np.ndarray
  vocab: tuple
  role_names: tuple

  def __len__(self):
    return self.tokens.shape[0]


def to_arrays(sentences: Sequence[Sentence], max_len: int) -> RoleData:
  n = len(sentences)
  tokens = np.full((n, max_len), PAD_ID, np.int32)
  roles = np.full((n, max_len), -1, np.int32)
  depth = np.full((n, max_len), -1, np.int32)
  for i, sent in enumerate(sentences):
    if len(sent) > max_len:
      raise ValueError(f"sentence {i} has {len(sent)} words > max_len={max_len}")
    for t, (word, role, d) in enumerate(sent):
      tokens[i, t], roles[i, t], depth[i, t] = WORD_TO_ID[word], role, d
  return RoleData(tokens, roles, depth, tokens != PAD_ID, VOCAB, ROLE_NAMES)


def make_splits(
    n_train: int = 4000,
    n_heldout: int = 1000,
    n_transfer: int = 1000,
    *,
    seed: int = 0,
    max_len: int = 32,
    train_grammar: GrammarSpec | str = "A",
    transfer_grammar: GrammarSpec | str = "B",
) -> dict:
  """{'train', 'heldout'} from train_grammar and {'transfer'} from transfer_grammar, as RoleData.

  train and heldout are one pool of distinct sentences split in order; transfer sentences are drawn
  with another seed and exclude every train sentence, so no evaluated sentence was trained on.
  """
  pool = sample_sentences(train_grammar, n_train + n_heldout, seed, max_len=max_len)
  train, heldout = pool[:n_train], pool[n_train:]
  train_words = frozenset(tuple(w for w, _, _ in s) for s in train)
  transfer = sample_sentences(transfer_grammar, n_transfer, seed + 1_000_003, max_len=max_len, exclude=train_words)
  return {
      "train": to_arrays(train, max_len),
      "heldout": to_arrays(heldout, max_len),
      "transfer": to_arrays(transfer, max_len),
  }


def decode(tokens_row: np.ndarray) -> str:
  return " ".join(VOCAB[int(i)] for i in tokens_row if i != PAD_ID)
