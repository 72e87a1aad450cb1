"""Text data pipeline: sources, bad input, packing, process sharding, resume, exact evaluation.

References are written here independently: documents are reassembled from windows by splitting
the token stream on the end-of-document id, and reset / segment / mask arrays are recomputed with
plain loops.
"""

import gzip
import importlib.util
import json
import os
import random
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ema_jax.data import text
from ema_jax.data import tokenizer as tokenizer_lib
from ema_jax.data.text import files as text_files
from ema_jax.data.text import readers as text_readers
from ema_jax.errors import DataStateError
from helpers import REPO

WIKIPEDIA = os.path.join(REPO, "..", "shared", "data", "wikipedia")
HAS_TF = importlib.util.find_spec("tensorflow") is not None
BYTE = tokenizer_lib.get_tokenizer("byte")
EOD = BYTE.eod_id


def make_documents(n, seed=0, max_len=90):
  """Distinct documents with lengths from 0 to max_len (so some span several windows)."""
  rng = random.Random(seed)
  docs = []
  for i in range(n):
    body = "".join(rng.choice("abcdefgh ijk\nlmé🙂") for _ in range(rng.randint(0, max_len)))
    docs.append(f"#{i}:{body}")
  docs.append("")  # an empty document is still a document
  return docs


def write_jsonl(path, docs, field="text"):
  with open(path, "w", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({field: d, "id": i}) + "\n")
  return str(path)


@pytest.fixture
def jsonl_dir(tmp_path):
  docs = make_documents(40)
  for k in range(4):
    write_jsonl(tmp_path / f"train-{k}.jsonl", docs[k::4])
  write_jsonl(tmp_path / "validation.jsonl", make_documents(7, seed=1))
  return tmp_path, docs


def files_cfg(directory, **kw):
  return dict(source="files", path=str(directory / "{split}*.jsonl"), tokenizer="byte", **kw)


def split_stream(tokens):
  """Documents (as token lists) of a stream `eod d1 eod d2 ...` whose first token is eod."""
  assert tokens[0] == EOD
  docs, current = [], []
  for t in tokens[1:]:
    if t == EOD:
      docs.append(current)
      current = []
    else:
      current.append(int(t))
  return docs, current


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("source", "hf", "source='hf'"),
        ("tokenizer", "t5", "tokenizer='t5'"),
        ("read_threads", -2, "read_threads=-2"),
        ("format", "csv", "format='csv'"),
        ("train_split", "", "train_split=''"),
    ],
)
def test_config_values_are_validated(field, value, fragment):
  with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
    text.parse_data_config({field: value})


def test_config_unknown_field_and_missing_path():
  with pytest.raises(ValueError, match="tokeniser"):
    text.parse_data_config({"tokeniser": "gpt2"})
  with pytest.raises(ValueError, match="config.data.path"):
    text.parse_data_config({"source": "files"})
  cfg = text.default_data_config()
  assert text.parse_data_config(cfg).tfds_name == "c4/en:3.1.0"
  with pytest.raises(ValueError, match="shuffle_buffer is no longer accepted.*own document stream"):
    text.parse_data_config({"shuffle_buffer": 16})


def test_batch_must_divide_among_processes():
  with pytest.raises(ValueError, match="global_batch=6 is not divisible by process_count=4"):
    text.make_train_iterator({}, "byte", 8, 6, 0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=4"):
    text.make_train_iterator({}, "byte", 8, 8, 0, process_index=4, process_count=4)


# --------------------------------------------------------------------------------------- bad input


def _raises_at(cfg, exc, *fragments):
  with pytest.raises(exc) as info:
    text.load_documents(cfg, "train")
  for fragment in fragments:
    assert fragment in str(info.value), str(info.value)


def test_no_matching_files(tmp_path):
  _raises_at(files_cfg(tmp_path / "nowhere"), FileNotFoundError, "matches no file", "nowhere")


def test_empty_file(tmp_path):
  (tmp_path / "train.jsonl").write_text("\n\n")
  _raises_at(files_cfg(tmp_path), ValueError, "train.jsonl", "empty")


def test_line_that_is_not_json(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
  _raises_at(files_cfg(tmp_path), ValueError, "train.jsonl:3:", "not valid JSON")


def test_missing_field(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  _raises_at(files_cfg(tmp_path), ValueError, "train.jsonl:2:", "'text'", "config.data.field")
  _raises_at(files_cfg(tmp_path, field="body"), ValueError, "train.jsonl:1:", "'body'")


def test_field_that_is_not_a_string(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
  _raises_at(files_cfg(tmp_path), ValueError, "train.jsonl:2:", "int")


def test_bytes_that_are_not_utf8(tmp_path):
  (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  _raises_at(files_cfg(tmp_path), ValueError, "train.jsonl:2:", "UTF-8")
  (tmp_path / "train.jsonl").unlink()
  (tmp_path / "train.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
  cfg = dict(source="files", path=str(tmp_path / "*.txt"))
  _raises_at(cfg, ValueError, "train.txt:3:", "UTF-8")


def test_unknown_suffix(tmp_path):
  (tmp_path / "train.csv").write_text("a,b\n")
  _raises_at(dict(source="files", path=str(tmp_path / "*")), ValueError, "train.csv", "config.data.format")


def test_plain_text_and_gzip(tmp_path):
  (tmp_path / "a.txt").write_text("first document\n\nstill the first\n", encoding="utf-8")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write(json.dumps({"text": "second"}) + "\n")
  docs = text.load_documents(dict(source="files", path=str(tmp_path / "*")), "train")
  assert list(docs) == ["first document\n\nstill the first\n", "second"]


# ----------------------------------------------------------------------------------------- sources


def test_jsonl_files_in_order(jsonl_dir):
  directory, docs = jsonl_dir
  loaded = text.load_documents(files_cfg(directory), "train")
  expected = [d for k in range(4) for d in docs[k::4]]
  assert list(loaded) == expected
  assert list(text.load_documents(files_cfg(directory), "validation")) == make_documents(7, 1)
  cfg = files_cfg(directory, eval_path=str(directory / "train-0.jsonl"))
  assert list(text.load_documents(cfg, "validation")) == docs[0::4]


def test_builtin_source_is_real_text_with_disjoint_splits():
  names = [m for m, _ in text.stdlib_docstring_documents()]
  assert len(set(names)) == len(names) and "json" in names and "email.mime.text" in names
  train = list(text.load_documents({}, "train"))
  validation = list(text.load_documents({}, "validation"))
  assert len(train) > 300 and len(validation) > 20
  assert not set(train) & set(validation)
  joined = " ".join(train)
  assert len(joined) > 500_000 and joined.count(" the ") > 1000
  with pytest.raises(ValueError, match="splits"):
    text.load_documents({}, "test")


# ------------------------------------------------------------------------------------------- tfds


class EmaJaxTinyText(tfds.core.GeneratorBasedBuilder):
  """A dataset written by this test with tensorflow-datasets' own machinery."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "n": np.int64}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 60), "validation": self._generate_examples(60, 8)}

  def _generate_examples(self, start, count):
    for i, d in enumerate(tiny_text_documents()[start : start + count]):
      yield start + i, {"text": d, "n": start + i}


def tiny_text_documents():
  return make_documents(67, seed=3)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  EmaJaxTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def tfds_cfg(data_dir, **kw):
  return dict(source="tfds", tfds_name="ema_jax_tiny_text:1.0.0", data_dir=str(data_dir), tokenizer="byte", **kw)


def test_tfds_array_record_source(tfds_dir):
  docs = text.load_documents(tfds_cfg(tfds_dir), "train")
  assert "array_record" in docs.description
  assert sorted(docs) == sorted(tiny_text_documents()[:60])
  val = text.load_documents(tfds_cfg(tfds_dir), "validation")
  assert sorted(val) == sorted(tiny_text_documents()[60:])
  part = text.load_documents(tfds_cfg(tfds_dir), "train[:10]")
  assert list(part) == list(docs)[:10]
  batch = next(text.make_train_iterator(tfds_cfg(tfds_dir), None, 16, 4, 0, 0, 1))
  assert batch["inputs"].shape == (4, 16)


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build c4"):
    text.load_documents(dict(source="tfds", data_dir=str(tmp_path)), "train")
  with pytest.raises(ValueError, match="no split 'test'"):
    text.load_documents(tfds_cfg(tfds_dir), "test")
  with pytest.raises(ValueError, match="no feature 'body'"):
    text.load_documents(tfds_cfg(tfds_dir, field="body"), "train")


@pytest.mark.skipif(HAS_TF, reason="checks the message shown when TensorFlow is missing")
def test_tfds_tfrecord_without_tensorflow_says_what_to_install(tfds_dir, tmp_path):
  copy = tmp_path / "ema_jax_tiny_text"
  shutil.copytree(tfds_dir / "ema_jax_tiny_text", copy)
  info_file = copy / "1.0.0" / "dataset_info.json"
  info = json.loads(info_file.read_text())
  info["fileFormat"] = "tfrecord"
  info_file.write_text(json.dumps(info))
  with pytest.raises(ImportError, match=r"TensorFlow.*array_record"):
    text.load_documents(tfds_cfg(tmp_path), "train")


@pytest.mark.tf
@pytest.mark.skipif(not HAS_TF, reason="the tf.data path needs TensorFlow (the [tf] extra)")
def test_tfds_tfrecord_through_tf_data(tmp_path):
  EmaJaxTinyText(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  docs = text.load_documents(tfds_cfg(tmp_path), "train")
  assert not docs.random_access and "tfrecord" in docs.description
  assert sorted(docs) == sorted(tiny_text_documents()[:60])
  cfg = tfds_cfg(tmp_path)
  it = text.make_train_iterator(cfg, None, 16, 2, 0, 0, 1)
  # One shard, so each stream holds one unit: records come in their stored order.
  _check_one_epoch(it, cfg, 2, 16, shuffled=False)
  parts = [list(text.load_documents(cfg, "train", p, 3)) for p in range(3)]
  assert [d for part in parts for d in part] == list(docs)
  make = lambda p, n: text.make_train_iterator(cfg, None, 16, 2, 0, p, n)  # noqa: E731
  _check_process_invariance(make, steps=20, counts=(1, 2))
  _check_resume_on_other_layouts(make, 2, k=30, n=10, counts=(1, 2))


# -------------------------------------------------------------------------------------- wikipedia


@pytest.mark.skipif(not os.path.isdir(WIKIPEDIA), reason=f"offline data not found at {WIKIPEDIA}")
def test_wikipedia_jsonl():
  cfg = dict(source="files", path=os.path.join(WIKIPEDIA, "{split}*.jsonl"), tokenizer="gpt2")
  train = text.load_documents(cfg, "train", part=1, num_parts=5)
  assert len(train.units) == 1 and 500 < len(train) < 700  # one of the five files
  validation = text.load_documents(cfg, "validation")
  assert len(validation) == 133
  batch = next(text.make_train_iterator(cfg, None, 128, 4, 0, process_index=0, process_count=2))
  assert batch["inputs"].shape == (2, 128) and batch["inputs"].max() < 50257
  ev = text.make_eval_batches(cfg, None, 256, 4, max_documents=3, process_index=0, process_count=1)
  texts = list(validation)[:3]
  assert ev.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
  assert ev.num_documents == 3 and ev.num_tokens == sum(b["mask"].sum() for b in ev)


# ----------------------------------------------------------------------------- packing and batches


def _check_batch_arrays(batch, eod=EOD):
  inputs, targets = batch["inputs"], batch["targets"]
  assert inputs.dtype == targets.dtype == batch["segment_ids"].dtype == np.int32
  assert batch["resets"].dtype == bool and batch["mask"].dtype == np.float32
  for b in range(inputs.shape[0]):
    segment = 0
    for t in range(inputs.shape[1]):
      assert batch["resets"][b, t] == (inputs[b, t] == eod)
      if t > 0 and inputs[b, t] == eod:
        segment += 1
      assert batch["segment_ids"][b, t] == segment
      if t + 1 < inputs.shape[1]:
        assert targets[b, t] == inputs[b, t + 1]


def _row_streams(batches):
  """Each row's token stream, rebuilt from its consecutive windows (which share one token)."""
  streams = [list(row) + [t] for row, t in zip(batches[0]["inputs"], batches[0]["targets"][:, -1])]
  for batch in batches[1:]:
    for r, row in enumerate(batch["inputs"]):
      assert row[0] == streams[r][-1]  # consecutive windows share one token
      streams[r].extend(batch["targets"][r])
  return streams


def _check_one_epoch(it, cfg, global_batch, seq_len, shuffled=True):
  """Row r's first epoch gives back exactly stream r's documents (part r of global_batch), each
  once; together the rows cover the split. shuffled: some row's order differs from the stored
  order (True), none does (False), or either (None)."""
  parts = [[BYTE.encode(d) for d in text.load_documents(cfg, "train", r, global_batch)] for r in range(global_batch)]
  totals = [sum(len(d) + 1 for d in part) for part in parts]
  batches = []
  while len(batches) * seq_len + 1 < max(totals) + 1:
    batches.append(next(it))
    _check_batch_arrays(batches[-1])
  orders = []
  for r, stream in enumerate(_row_streams(batches)):
    got, _ = split_stream(stream[: totals[r] + 1])
    assert sorted(got) == sorted(parts[r])
    orders.append(got == parts[r])
  everything = [BYTE.encode(d) for d in text.load_documents(cfg, "train")]
  assert sorted(d for part in parts for d in part) == sorted(everything)
  if shuffled is not None:
    assert all(orders) != shuffled


@pytest.mark.parametrize("seq_len, global_batch", [(1, 2), (7, 4), (64, 3), (5, 8)])
def test_packing_conserves_tokens_and_boundaries(jsonl_dir, seq_len, global_batch):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)  # 4 files: whole files per stream for G <= 4, else record ranges
  it = text.make_train_iterator(cfg, None, seq_len, global_batch, 0, 0, 1)
  _check_one_epoch(it, cfg, global_batch, seq_len)


class _SequentialOnly(text.ListDocuments):
  """In-memory documents that pretend to be readable only in order (like tf.data)."""

  random_access = False

  def __getitem__(self, index):
    raise AssertionError("a sequential-only source was indexed")

  def iter_range(self, start, stop):
    return iter(self._texts[start:stop])


@pytest.fixture
def sequential_only(monkeypatch):
  read_files = text_files._read_files

  def read_sequential(spec, split, files):
    docs = read_files(spec, split, files)
    return _SequentialOnly(list(docs._texts), docs.description, docs.units)

  monkeypatch.setattr(text_files, "_read_files", read_sequential)


@pytest.mark.parametrize("global_batch", [2, 8])
def test_sequential_sources_conserve_tokens_and_resume(jsonl_dir, sequential_only, global_batch):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  it = text.make_train_iterator(cfg, None, 9, global_batch, 0, 0, 1)
  # Records of a unit come in stored order; with G = 8 a stream holds one or two units.
  _check_one_epoch(it, cfg, global_batch, 9, shuffled=None)
  units = [(0, 5), (5, 7), (7, 20)]
  reader = text_readers._SequentialReader(None, units, 0, 0, None)
  first = {reader.document_index(epoch, 0) for epoch in range(10)}
  assert first == {0, 5, 7}  # each epoch visits the units in its own order
  make = lambda p, n: text.make_train_iterator(cfg, None, 9, global_batch, 0, p, n)  # noqa: E731
  _check_process_invariance(make, steps=40)
  _check_resume_on_other_layouts(make, global_batch, k=23, n=25)


def test_eod_inside_a_window(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", ["ab", "cde"])
  it = text.make_train_iterator(files_cfg(tmp_path), None, 6, 1, 0, 0, 1)
  batch = next(it)
  # stream eod a b eod c d e | eod ... (order of the two documents depends on the seed)
  inputs = batch["inputs"][0]
  assert inputs[0] == EOD and batch["resets"][0, 0]
  assert batch["resets"][0].sum() == 2 and batch["segment_ids"][0, -1] == 1
  assert batch["mask"].min() == 1.0


def test_rows_come_from_different_documents(jsonl_dir):
  directory, _ = jsonl_dir
  batch = next(text.make_train_iterator(files_cfg(directory), None, 5, 8, 0, 0, 1))
  first_documents = {tuple(row) for row in batch["inputs"]}
  assert len(first_documents) == 8 and all(row[0] == EOD for row in batch["inputs"])


def test_epochs_are_shuffled_differently(tmp_path):
  docs = [f"document number {i}" for i in range(30)]
  write_jsonl(tmp_path / "train.jsonl", docs)
  cfg = files_cfg(tmp_path)
  total = sum(len(BYTE.encode(d)) + 1 for d in docs)
  seq_len = 10
  it = text.make_train_iterator(cfg, None, seq_len, 1, 0, 0, 1)
  stream = [EOD]
  while len(stream) < 3 * total + 1:
    stream.extend(next(it)["targets"][0])
  got, _ = split_stream(stream[: 3 * total + 1])
  epochs = [[BYTE.decode(d) for d in got[e * 30 : (e + 1) * 30]] for e in range(3)]
  assert all(sorted(e) == sorted(docs) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]


def test_too_few_documents_for_the_batch(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"3 documents, fewer than global_batch=4.*at most 3"):
    text.make_train_iterator(files_cfg(tmp_path), None, 8, 4, 0, 0, 1)


# ------------------------------------------------------------------------- processes and resume


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("layout", ["four_files", "one_file", "builtin", "tfds"])
def test_parts_are_disjoint_and_cover_everything(jsonl_dir, tfds_dir, tmp_path, layout, process_count):
  directory, docs = jsonl_dir
  if layout == "four_files":
    cfg = files_cfg(directory)
  elif layout == "one_file":
    write_jsonl(tmp_path / "train.jsonl", docs)
    cfg = files_cfg(tmp_path)
  elif layout == "builtin":
    cfg = {}
  else:
    cfg = tfds_cfg(tfds_dir)
  whole = list(text.load_documents(cfg, "train"))
  parts = [list(text.load_documents(cfg, "train", p, process_count)) for p in range(process_count)]
  assert all(parts)
  assert sorted(d for part in parts for d in part) == sorted(whole)  # disjoint and complete
  if layout == "four_files":
    assert parts[0][: len(docs[0::4])] == docs[0::4]  # whole files


def _global_batches(iterators, steps):
  """The global batches: each process's rows, concatenated in process order."""
  return [
      {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
      for bs in ([next(it) for it in iterators] for _ in range(steps))
  ]


def _assert_same(expected, got):
  assert len(expected) == len(got)
  for a, b in zip(expected, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _check_process_invariance(make, steps, counts=(1, 2, 4)):
  """make(process_index, process_count): the global batches do not depend on the count."""
  reference = _global_batches([make(0, 1)], steps)
  global_batch = len(reference[0]["inputs"])
  for n in (n for n in counts if global_batch % n == 0):
    iterators = [make(p, n) for p in range(n)]
    assert set(iterators[-1].get_state()["streams"]) == {
        str(r) for r in range(global_batch - global_batch // n, global_batch)
    }
    _assert_same(reference, _global_batches(iterators, steps))
  return reference


def _merged_state(iterators):
  parts = [json.loads(json.dumps(it.get_state())) for it in iterators]  # must survive JSON
  return text.TrainIterator.merge_states(parts[::-1])  # any order


def _check_resume_on_other_layouts(make, global_batch, k, n, saved_by=2, counts=(1, 2, 4)):
  """Run `saved_by` processes for k steps, merge their states, resume on other counts."""
  reference = _global_batches([make(0, 1)], k + n)
  saving = [make(p, saved_by) for p in range(saved_by)]
  _assert_same(reference[:k], _global_batches(saving, k))
  state = _merged_state(saving)
  assert sorted(state["streams"], key=int) == [str(r) for r in range(global_batch)]
  for count in (n for n in counts if global_batch % n == 0):
    resumed = [make(p, count) for p in range(count)]
    for it in resumed:
      next(it)  # a used iterator must be restorable too
      it.set_state(state)
    _assert_same(reference[k:], _global_batches(resumed, n))
  return state


def test_process_count_invariance_files(jsonl_dir, tmp_path):
  directory, docs = jsonl_dir
  for cfg in (files_cfg(directory), files_cfg(directory, read_threads=2)):
    make = lambda p, n: text.make_train_iterator(cfg, None, 7, 8, 5, p, n)  # noqa: E731
    reference = _check_process_invariance(make, steps=30)
  # Eight files, so whole files per stream at G = 4 and 8 (the process reads only its files).
  for k in range(8):
    write_jsonl(tmp_path / f"train-{k}.jsonl", docs[k::8])
  for global_batch in (4, 8):
    cfg = files_cfg(tmp_path)
    make = lambda p, n: text.make_train_iterator(cfg, None, 7, global_batch, 5, p, n)  # noqa: E731
    _check_process_invariance(make, steps=20)
    assert len(text.load_documents(cfg, "train", 1, global_batch).units) == 8 // global_batch
  assert len(reference) == 30


def test_large_streams_use_index_shuffle(jsonl_dir, monkeypatch):
  # Streams of more than 2**14 documents are shuffled by grain's index_shuffle (O(1) memory).
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  monkeypatch.setattr(text_readers._RandomAccessReader, "_MAX_ARRAY_PERMUTATION", 0)
  it = text.make_train_iterator(cfg, None, 7, 4, 0, 0, 1)
  _check_one_epoch(it, cfg, 4, 7)
  make = lambda p, n: text.make_train_iterator(cfg, None, 7, 4, 0, p, n)  # noqa: E731
  _check_resume_on_other_layouts(make, 4, k=40, n=5)


def test_read_threads_do_not_change_the_batches(jsonl_dir):
  directory, _ = jsonl_dir
  batches = [
      _global_batches([text.make_train_iterator(files_cfg(directory, read_threads=threads), None, 9, 4, 1, 0, 1)], 40)
      for threads in (0, 3)
  ]
  _assert_same(*batches)


def test_process_count_invariance_builtin():
  make = lambda p, n: text.make_train_iterator({}, "byte", 32, 8, 0, p, n)  # noqa: E731
  _check_process_invariance(make, steps=4)


def test_process_count_invariance_tfds(tfds_dir):
  make = lambda p, n: text.make_train_iterator(tfds_cfg(tfds_dir, read_threads=2), None, 16, 4, 0, p, n)  # noqa: E731
  _check_process_invariance(make, steps=12)


@pytest.mark.parametrize("saved_by", [1, 2, 4])
def test_resume_on_another_process_count(jsonl_dir, saved_by):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  make = lambda p, n: text.make_train_iterator(cfg, None, 11, 8, 7, p, n)  # noqa: E731
  # 41 small documents over 8 rows: 45 steps take every stream past its first epoch.
  state = _check_resume_on_other_layouts(make, 8, k=45, n=10, saved_by=saved_by)
  assert min(s["epoch"] for s in state["streams"].values()) >= 1
  _check_resume_on_other_layouts(make, 8, k=0, n=3, saved_by=saved_by)


@pytest.mark.parametrize("documents", [make_documents(11, max_len=30), ["", "a", "bc", "d"]])
def test_resume_at_every_step_across_epoch_boundaries(tmp_path, documents):
  # 3 short documents a stream: a few windows an epoch; or 2 tiny ones: epochs inside a window.
  write_jsonl(tmp_path / "train.jsonl", documents)
  cfg = files_cfg(tmp_path)
  global_batch = 4 if len(documents) > 4 else 2
  make = lambda p, n: text.make_train_iterator(cfg, None, 13, global_batch, 3, p, n)  # noqa: E731
  reference_it = make(0, 1)
  states, reference = [], []
  for _ in range(40):
    states.append(json.loads(json.dumps(reference_it.get_state())))
    reference.append(next(reference_it))
  last = states[-1]["streams"].values()
  assert min(s["epoch"] for s in last) >= 3
  # A window crossed an epoch boundary where the next one starts in an older epoch's document.
  assert any(states[k]["streams"]["0"]["epoch"] > states[k - 1]["streams"]["0"]["epoch"] for k in range(1, 40))
  for k in range(40):
    count = (1, 2, 4)[k % 3] if global_batch == 4 else 1 + k % 2
    resumed = [make(p, count) for p in range(count)]
    for it in resumed:
      it.set_state(states[k])
    _assert_same(reference[k : k + 3], _global_batches(resumed, len(reference[k : k + 3])))


def test_resume_builtin_gpt2_and_new_epochs_are_reshuffled():
  make = lambda p, n: text.make_train_iterator({}, "gpt2", 64, 4, 1, p, n)  # noqa: E731
  _check_resume_on_other_layouts(make, 4, k=13, n=4, counts=(1, 4))
  a = next(text.make_train_iterator({}, "gpt2", 64, 4, 1, 0, 1))["inputs"]
  b = next(text.make_train_iterator({}, "gpt2", 64, 4, 2, 0, 1))["inputs"]
  assert not np.array_equal(a, b)


def test_state_lists_the_process_rows_and_settings(jsonl_dir):
  directory, _ = jsonl_dir
  it = text.make_train_iterator(files_cfg(directory), None, 11, 8, 7, 1, 4)
  state = it.get_state()
  assert state["format"] == "ema_jax.data.text/2"
  assert set(state["streams"]) == {"2", "3"}
  assert state["streams"]["2"] == {"epoch": 0, "doc": 0, "offset": 0, "num_documents": 5}
  settings = state["settings"]
  assert settings["global_batch"] == 8 and settings["seq_len"] == 11 and settings["seed"] == 7
  assert "process_index" not in settings and "process_count" not in settings


# ---------------------------------------------------------------------------- refused states


def _refused(it, state, *fragments):
  with pytest.raises(DataStateError) as info:
    it.set_state(state)
  for fragment in fragments:
    assert fragment in str(info.value), str(info.value)
  return str(info.value)


def test_refuses_empty_and_foreign_states(jsonl_dir):
  directory, _ = jsonl_dir
  it = text.make_train_iterator(files_cfg(directory), None, 11, 4, 0, 0, 1)
  _refused(it, {}, "empty", "merge_states", "new workdir")
  old = {"format": "ema_jax.data.text/1", "settings": {}, "pipeline": {}}
  _refused(it, old, "'ema_jax.data.text/1'", "one process", "new workdir")
  state = it.get_state()
  state["streams"]["1"]["epoch"] = -1
  _refused(it, state, "stream '1'", "integer >= 0")
  assert issubclass(DataStateError, ValueError)


def test_refuses_other_settings(jsonl_dir):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  state = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1).get_state()
  other = text.make_train_iterator(cfg, None, 12, 4, 0, 0, 1)
  _refused(other, state, "seq_len: 11 -> 12", "same data config, seq_len, batch_size and seed", "new workdir")
  edited = json.loads(json.dumps(state))
  edited["settings"]["seed"] = 9
  it = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1)
  _refused(it, edited, "seed: 9 -> 0")
  with pytest.raises(DataStateError, match="different settings"):
    text.TrainIterator.merge_states([state, edited])


def test_refuses_a_missing_stream(jsonl_dir):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  part = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 2).get_state()  # rows 0-1 only
  it = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 2)
  _refused(it, part, "holds streams 0-1", "exactly streams 0-3", "missing: 2-3", "merge_states")
  with pytest.raises(DataStateError, match="empty"):
    text.TrainIterator.merge_states([part, {}])


def test_refuses_a_document_index_out_of_range(jsonl_dir):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  it = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1)
  next(it)
  before = it.get_state()
  state = json.loads(json.dumps(before))
  state["streams"]["3"]["doc"] = 999
  _refused(it, state, "stream 3", "document 999", "10 documents (0..9)")
  assert it.get_state() == before  # a refused state leaves the iterator where it was


def test_refuses_an_offset_past_the_document_after_the_data_changed(tmp_path):
  docs = make_documents(40)
  write_jsonl(tmp_path / "train.jsonl", docs)
  cfg = files_cfg(tmp_path)
  it = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert max(s["offset"] for s in state["streams"].values()) >= 2
  write_jsonl(tmp_path / "train.jsonl", ["x"] * len(docs))  # same count, shorter documents
  again = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1)
  _refused(again, state, "now has 2 tokens", "the data or the tokenizer changed", "new workdir")
  write_jsonl(tmp_path / "train.jsonl", docs + ["one more"])
  again = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1)
  _refused(again, state, "had 10 documents", "now it has", "the data changed")


# -------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("seq_len, global_batch, process_count", [(7, 4, 1), (16, 4, 2), (5, 8, 4)])
def test_eval_covers_every_token_once(jsonl_dir, seq_len, global_batch, process_count):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  docs = list(text.load_documents(cfg, "train"))
  expected = [t for d in docs for t in BYTE.encode(d) + [EOD]]
  per_process = [
      list(
          text.make_eval_batches(
              cfg, None, seq_len, global_batch, split="train", process_index=p, process_count=process_count
          )
      )
      for p in range(process_count)
  ]
  assert len({len(batches) for batches in per_process}) == 1
  ev = text.make_eval_batches(
      cfg, None, seq_len, global_batch, split="train", process_index=0, process_count=process_count
  )
  targets = []
  for step in range(len(ev)):
    for p in range(process_count):  # the global batch is the processes' rows in order
      batch = per_process[p][step]
      _check_batch_arrays(batch)
      assert batch["inputs"].shape == (global_batch // process_count, seq_len)
      for row in range(batch["inputs"].shape[0]):
        mask = batch["mask"][row]
        n = int(mask.sum())
        assert np.all(mask[:n] == 1) and np.all(mask[n:] == 0)
        targets.extend(batch["targets"][row, :n])
  assert targets == expected
  assert ev.num_tokens == len(expected)
  assert ev.num_bytes == sum(len(d.encode("utf-8")) for d in docs)
  assert ev.num_documents == len(docs)


def test_eval_limits_and_determinism(jsonl_dir):
  directory, _ = jsonl_dir
  cfg = files_cfg(directory)
  docs = list(text.load_documents(cfg, "train"))
  ev = text.make_eval_batches(cfg, None, 8, 2, split="train", max_documents=5, process_index=0, process_count=1)
  assert ev.num_documents == 5
  assert ev.num_tokens == sum(len(BYTE.encode(d)) + 1 for d in docs[:5])
  first = [b["inputs"] for b in ev]
  assert all(np.array_equal(a, b["inputs"]) for a, b in zip(first, ev))  # re-iterable
  ev = text.make_eval_batches(cfg, None, 8, 2, split="train", max_tokens=50, process_index=0, process_count=1)
  assert ev.num_tokens == 50 == sum(b["mask"].sum() for b in ev)
  stream = [t for d in docs for t in [EOD] + BYTE.encode(d)][1:51]
  assert ev.num_bytes == sum(1 for t in stream if t != EOD)


def test_eval_gpt2_bytes_match_text(tmp_path):
  docs = ["Hello world", "naïve café 🙂", "", "日本語"]
  write_jsonl(tmp_path / "validation.jsonl", docs)
  cfg = dict(source="files", path=str(tmp_path / "{split}.jsonl"), tokenizer="gpt2")
  ev = text.make_eval_batches(cfg, None, 4, 2, process_index=0, process_count=1)
  assert ev.num_bytes == sum(len(d.encode("utf-8")) for d in docs)
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  assert ev.num_tokens == sum(len(gpt2.encode(d)) + 1 for d in docs)
  batches = list(ev)
  assert batches[0]["inputs"][0, :3].tolist() == [50256, 15496, 995]


def test_eval_gpt2_token_count_of_a_byte_stream(tmp_path):
  """A byte-level evaluation counts the GPT-2 tokens of the same text: each document's GPT-2 encoding plus
  its end of document, as a GPT-2-tokenized evaluation of the same file counts its targets."""
  docs = ["Hello world", "naïve café 🙂", "", "日本語 and more text", "x" * 40]
  write_jsonl(tmp_path / "validation.jsonl", docs)
  cfg = dict(source="files", path=str(tmp_path / "{split}.jsonl"))
  gpt2 = tokenizer_lib.get_tokenizer("gpt2")
  expected = sum(len(gpt2.encode(d)) + 1 for d in docs)
  on_bytes = text.make_eval_batches(dict(cfg, tokenizer="byte"), None, 8, 2, process_index=0, process_count=1)
  on_gpt2 = text.make_eval_batches(dict(cfg, tokenizer="gpt2"), None, 8, 2, process_index=0, process_count=1)
  assert on_bytes.num_gpt2_tokens == on_gpt2.num_gpt2_tokens == on_gpt2.num_tokens == expected
  # Cut inside a document: the kept part of it is what is counted.
  cut = text.make_eval_batches(dict(cfg, tokenizer="byte"), None, 8, 2, max_tokens=20, process_index=0, process_count=1)
  stream = ([EOD] + BYTE.encode(docs[0]) + [EOD] + BYTE.encode(docs[1]))[1:21]
  first, second = stream[: stream.index(EOD)], stream[stream.index(EOD) + 1 :]
  assert cut.num_gpt2_tokens == 1 + len(gpt2.encode(bytes(first).decode())) + len(
      gpt2.encode(bytes(second).decode("utf-8", errors="replace"))
  )


def test_process_defaults_come_from_jax():
  ev = text.make_eval_batches({}, "byte", 32, 2, max_tokens=100)
  assert (ev.process_index, ev.process_count) == (0, 1)
  assert next(iter(ev))["inputs"].shape == (2, 32)
