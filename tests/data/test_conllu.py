"""CoNLL-U reader: hand-written documents, every malformed case, and the real UD EWT dev file."""

import os

import numpy as np
import pytest

from ema_jax.data import conllu
from helpers import REPO

UD_DIR = os.path.join(REPO, "..", "shared", "data", "ud_english_ewt")
R = {name: i for i, name in enumerate(conllu.ROLE_NAMES)}


def _line(*cols):
  return "\t".join(str(c) for c in cols)


def _word(i, form, upos, head, deprel):
  return _line(i, form, form.lower(), upos, "_", "_", head, deprel, "_", "_")


# "The dog that the cat chased didn't run ." with a multiword token (did + n't), an empty node and
# comments; then a passive sentence with a by-agent, an indirect object and an oblique.
DOC = "\n".join(
    [
        "# newdoc id = test",
        "# sent_id = 1",
        "# text = The dog that the cat chased didn't run.",
        _word(1, "The", "DET", 2, "det"),
        _word(2, "dog", "NOUN", 9, "nsubj"),
        _word(3, "that", "PRON", 6, "obj"),
        _word(4, "the", "DET", 5, "det"),
        _word(5, "cat", "NOUN", 6, "nsubj"),
        _word(6, "chased", "VERB", 2, "acl:relcl"),
        _line("7-8", "didn't", "_", "_", "_", "_", "_", "_", "_", "_"),
        _word(7, "did", "AUX", 9, "aux"),
        _word(8, "n't", "PART", 9, "advmod"),
        _line("8.1", "ran", "run", "VERB", "_", "_", "_", "_", "9:conj", "_"),
        _word(9, "run", "VERB", 0, "root"),
        _word(10, ".", "PUNCT", 9, "punct"),
        "",
        "# sent_id = 2",
        _word(1, "Mary", "PROPN", 3, "nsubj:pass"),
        _word(2, "was", "AUX", 3, "aux:pass"),
        _word(3, "given", "VERB", 0, "root"),
        _word(4, "books", "NOUN", 3, "obj"),
        _word(5, "by", "ADP", 6, "case"),
        _word(6, "John", "PROPN", 3, "obl:agent"),
        _word(7, "to", "PART", 8, "mark"),
        _word(8, "read", "VERB", 3, "advcl"),
        _word(9, "them", "PRON", 8, "obj"),
        _word(10, "today", "NOUN", 3, "obl:tmod"),
        "",
        "",
        "# sent_id = 3 (no blank line at the end of the file)",
        _word(1, "He", "PRON", 2, "nsubj"),
        _word(2, "sent", "VERB", 0, "root"),
        _word(3, "her", "PRON", 2, "iobj"),
        _word(4, "mail", "NOUN", 2, "obj"),
    ]
)


def test_parse_hand_written_document():
  sents = conllu.parse_conllu(DOC)
  assert [len(s) for s in sents] == [10, 10, 4]
  first = sents[0]
  assert [t.form for t in first] == ["The", "dog", "that", "the", "cat", "chased", "did", "n't", "run", "."]
  assert [t.id for t in first] == list(range(1, 11))
  assert [t.head for t in first] == [2, 9, 6, 5, 6, 2, 9, 9, 0, 9]
  assert first[5] == conllu.Token(6, "chased", "VERB", 2, "acl:relcl")
  assert conllu.token_roles(first) == [
      R["OTHER"],
      R["AGENT"],
      R["PATIENT"],
      R["OTHER"],
      R["AGENT"],
      R["VERB"],
      R["OTHER"],
      R["OTHER"],
      R["VERB"],
      R["OTHER"],
  ]
  # The relative clause (chased and what it dominates, "The"'s head dog is outside it) is depth 1.
  assert conllu.token_depths(first) == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]


def test_roles_and_depths_of_passive_and_ditransitive():
  _, passive, ditransitive = conllu.parse_conllu(DOC)
  assert conllu.token_roles(passive) == [
      R["PATIENT"],
      R["OTHER"],
      R["VERB"],
      R["PATIENT"],
      R["OTHER"],
      R["AGENT"],
      R["OTHER"],
      R["VERB"],
      R["PATIENT"],
      R["OBL"],
  ]
  assert conllu.token_depths(passive) == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
  assert conllu.token_roles(ditransitive) == [R["AGENT"], R["VERB"], R["RECIPIENT"], R["PATIENT"]]


def test_nested_clauses_count_each_clausal_relation():
  # "I think you said he left": think <-ccomp- said <-ccomp- left.
  text = "\n".join(
      [
          _word(1, "I", "PRON", 2, "nsubj"),
          _word(2, "think", "VERB", 0, "root"),
          _word(3, "you", "PRON", 4, "nsubj"),
          _word(4, "said", "VERB", 2, "ccomp"),
          _word(5, "he", "PRON", 6, "nsubj"),
          _word(6, "left", "VERB", 4, "ccomp"),
      ]
  )
  (sent,) = conllu.parse_conllu(text)
  assert conllu.token_depths(sent) == [0, 0, 1, 1, 2, 2]


def test_to_arrays_and_vocab():
  sents = conllu.parse_conllu(DOC)
  vocab = conllu.Vocab.build(sents, min_count=2)
  assert vocab.words[:2] == ("<pad>", "<unk>")
  # Lower-cased forms seen twice: "the" (The, the); "by"/"to" once, so UNK.
  assert "the" in vocab.words and "dog" not in vocab.words
  assert vocab.id("THE") == vocab.words.index("the") and vocab.id("dog") == conllu.UNK_ID
  assert conllu.Vocab.build(sents, min_count=1, lowercase=False).id("The") != conllu.UNK_ID
  data = conllu.to_arrays(sents, vocab, max_len=8)
  assert data.tokens.shape == (3, 8) and data.n_truncated == 2
  assert data.mask.sum(1).tolist() == [8, 8, 4]
  assert data.roles[2, :4].tolist() == [R["AGENT"], R["VERB"], R["RECIPIENT"], R["PATIENT"]]
  assert np.all(data.roles[~data.mask] == -1) and np.all(data.tokens[~data.mask] == conllu.PAD_ID)
  assert data.role_names == conllu.ROLE_NAMES
  with pytest.raises(ValueError, match="min_count"):
    conllu.Vocab.build(sents, min_count=0)


GOOD = _word(1, "Dogs", "NOUN", 2, "nsubj")


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ("1\tDogs\tdog\tNOUN\t_\t_\t2\tnsubj\t_", "expected 10 tab-separated columns, found 9"),
        ("1 Dogs dog NOUN _ _ 2 nsubj _ _", "expected 10 tab-separated columns, found 1"),
        (_word("x", "bark", "VERB", 0, "root"), "expected an integer ID, found 'x'"),
        (_word("2-x", "bark", "VERB", 0, "root"), "expected an ID like 3, 3-4 or 3.1"),
        (_word("2.1.1", "bark", "VERB", 0, "root"), "expected an ID like 3, 3-4 or 3.1"),
        (_word(3, "bark", "VERB", 0, "root"), "expected word ID 2"),
        (_word(2, "bark", "VERB", "root", "root"), "expected an integer HEAD"),
        (_word(2, "bark", "VERB", -1, "root"), "expected an integer HEAD"),
        (_word(2, "bark", "VERB", 2, "root"), "points to itself"),
        (_word(2, "bark", "VERB", 7, "root"), "expected HEAD between 0 and 2"),
        (_word(2, "bark", "VERB", 0, "_"), "expected a DEPREL"),
    ],
)
def test_malformed_line_names_file_and_line(bad_line, message):
  text = "# sent_id = 1\n" + GOOD + "\n" + bad_line + "\n\n"
  with pytest.raises(ValueError) as info:
    conllu.parse_conllu(text, source="bad.conllu")
  assert "bad.conllu:3:" in str(info.value) and message in str(info.value), str(info.value)


def test_head_cycle_raises_with_sentence_line():
  text = "\n\n# c\n" + _word(1, "a", "X", 2, "dep") + "\n" + _word(2, "b", "X", 1, "dep") + "\n"
  with pytest.raises(ValueError, match=r"cyc\.conllu:4: expected a tree.*cycle"):
    conllu.parse_conllu(text, source="cyc.conllu")


def test_read_conllu_reports_path(tmp_path):
  path = tmp_path / "x.conllu"
  path.write_text(GOOD + "\n" + "2\tbark\n", encoding="utf-8")
  with pytest.raises(ValueError, match=f"{path}:2: expected 10"):
    conllu.read_conllu(str(path))


@pytest.mark.skipif(
    not os.path.isdir(UD_DIR),
    reason=f"UD English EWT not found at {UD_DIR} " "(team-only offline data, see ../shared/data/README.md)",
)
def test_real_ud_english_ewt_dev():
  path = os.path.join(UD_DIR, "en_ewt-ud-dev.conllu")
  sents = conllu.read_conllu(path)
  assert len(sents) == 2001
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  n_words = sum(1 for l in lines if l and not l.startswith("#") and l.split("\t")[0].isdigit())
  assert sum(len(s) for s in sents) == n_words
  deprels = [t.deprel for s in sents for t in s]
  roles = [r for s in sents for r in conllu.token_roles(s)]
  assert roles.count(R["RECIPIENT"]) == sum(d.split(":")[0] == "iobj" for d in deprels)
  assert roles.count(R["AGENT"]) == sum(d in ("nsubj", "nsubj:outer", "obl:agent") for d in deprels)
  depths = [d for s in sents for d in conllu.token_depths(s)]
  assert min(depths) == 0 and max(depths) >= 3
  vocab = conllu.Vocab.build(sents, min_count=2)
  data = conllu.to_arrays(sents, vocab, max_len=200)
  assert data.n_truncated == 0 and int(data.mask.sum()) == n_words
