"""Text data pipeline: sources, bad input, packing, process sharding, resume, exact evaluation.

References are written here independently: documents are reassembled from windows by splitting
the token stream on the end-of-document id, and reset / segment / mask arrays are recomputed with
plain loops.
"""

import dataclasses
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        ("shuffle_buffer", -1, "shuffle_buffer=-1"),
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
    _raises_at(dict(source="files", path=str(tmp_path / "*")), ValueError, "train.csv",
               "config.data.format")


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
        return {"train": self._generate_examples(0, 60),
                "validation": self._generate_examples(60, 8)}

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
    return dict(source="tfds", tfds_name="ema_jax_tiny_text:1.0.0", data_dir=str(data_dir),
                tokenizer="byte", **kw)


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


@pytest.mark.skipif(not HAS_TF, reason="the tf.data path needs TensorFlow (the [tf] extra)")
def test_tfds_tfrecord_through_tf_data(tmp_path):
    EmaJaxTinyText(data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    docs = text.load_documents(tfds_cfg(tmp_path), "train")
    assert not docs.random_access and "tfrecord" in docs.description
    assert sorted(docs) == sorted(tiny_text_documents()[:60])
    cfg = tfds_cfg(tmp_path, shuffle_buffer=0)
    it = text.make_train_iterator(cfg, None, 16, 2, 0, 0, 1)
    # One shard, so one unit: records come in their stored order (units are what gets shuffled).
    _check_one_epoch(it, [BYTE.encode(d) for d in docs], seq_len=16, shuffled=False)
    parts = [list(text.load_documents(cfg, "train", p, 3)) for p in range(3)]
    assert [d for part in parts for d in part] == list(docs)
    make = lambda: text.make_train_iterator(  # noqa: E731
        tfds_cfg(tmp_path, shuffle_buffer=4), None, 16, 2, 0, 1, 2)
    _check_resume(make, k=30, n=10)


# -------------------------------------------------------------------------------------- wikipedia


@pytest.mark.skipif(not os.path.isdir(WIKIPEDIA), reason=f"offline data not found at {WIKIPEDIA}")
def test_wikipedia_jsonl():
    cfg = dict(source="files", path=os.path.join(WIKIPEDIA, "{split}*.jsonl"), tokenizer="gpt2")
    train = text.load_documents(cfg, "train", process_index=1, process_count=5)
    assert len(train.units) == 1 and 500 < len(train) < 700  # one of the five files
    validation = text.load_documents(cfg, "validation")
    assert len(validation) == 133
    batch = next(text.make_train_iterator(cfg, None, 128, 4, 0, process_index=0, process_count=2))
    assert batch["inputs"].shape == (2, 128) and batch["inputs"].max() < 50257
    ev = text.make_eval_batches(cfg, None, 256, 4, max_documents=3,
                                process_index=0, process_count=1)
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


def _check_one_epoch(it, token_docs, seq_len, shuffled=True):
    """Reading one epoch's worth of windows gives back every document exactly once."""
    total = sum(len(d) + 1 for d in token_docs)
    windows = []
    while len(windows) * seq_len + 1 < total:
        batch = next(it)
        _check_batch_arrays(batch)
        windows.extend(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1))
    stream = list(windows[0])
    for w in windows[1:]:
        assert w[0] == stream[-1]  # consecutive windows share one token
        stream.extend(w[1:])
    got, _ = split_stream(stream[:total + 1])
    assert sorted(got) == sorted(token_docs)
    if shuffled:
        assert got != token_docs
    else:
        assert got == token_docs


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_conserves_tokens_and_boundaries(jsonl_dir, seq_len):
    directory, _ = jsonl_dir
    cfg = files_cfg(directory, shuffle_buffer=0)
    docs = text.load_documents(cfg, "train")
    it = text.make_train_iterator(cfg, None, seq_len, 4, 0, 0, 1)
    _check_one_epoch(it, [BYTE.encode(d) for d in docs], seq_len)


class _SequentialOnly(text.ListDocuments):
    """In-memory documents that pretend to be readable only in order (like tf.data)."""

    random_access = False


def test_sequential_sources_conserve_tokens_and_resume(jsonl_dir):
    directory, _ = jsonl_dir
    spec = text.parse_data_config(files_cfg(directory, shuffle_buffer=5))
    loaded = text.load_documents(spec, "train")
    docs = _SequentialOnly(list(loaded), "sequential", loaded.units)
    unshuffled = dataclasses.replace(spec, shuffle_buffer=0)
    it = iter(text._train_dataset(docs, BYTE, 9, 3, 0, unshuffled))
    _check_one_epoch(it, [BYTE.encode(d) for d in docs], 9)
    make = lambda: iter(text._train_dataset(docs, BYTE, 9, 3, 0, spec))  # noqa: E731
    _check_resume(make, k=37, n=30)


def test_eod_inside_a_window(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ["ab", "cde"])
    it = text.make_train_iterator(files_cfg(tmp_path, shuffle_buffer=0), None, 6, 1, 0, 0, 1)
    batch = next(it)
    # stream eod a b eod c d e | eod ... (order of the two documents depends on the seed)
    inputs = batch["inputs"][0]
    assert inputs[0] == EOD and batch["resets"][0, 0]
    assert batch["resets"][0].sum() == 2 and batch["segment_ids"][0, -1] == 1
    assert batch["mask"].min() == 1.0


# ------------------------------------------------------------------------------ processes, resume


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("layout", ["four_files", "one_file", "builtin", "tfds"])
def test_processes_read_disjoint_parts_covering_everything(
    jsonl_dir, tfds_dir, tmp_path, layout, process_count
):
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
    parts = [list(text.load_documents(cfg, "train", p, process_count))
             for p in range(process_count)]
    assert all(parts)
    assert sorted(d for part in parts for d in part) == sorted(whole)  # disjoint and complete
    if layout == "four_files":
        assert parts[0][: len(docs[0::4])] == docs[0::4]  # whole files


def test_process_iterators_yield_local_batches(jsonl_dir):
    directory, _ = jsonl_dir
    cfg = files_cfg(directory, shuffle_buffer=0)
    firsts = []
    for p in range(4):
        it = text.make_train_iterator(cfg, None, 5, 8, 0, process_index=p, process_count=4)
        batch = next(it)
        assert batch["inputs"].shape == (2, 5)
        firsts.append(text.load_documents(cfg, "train", p, 4))
    assert len({tuple(d) for d in firsts}) == 4


def _check_resume(make_iterator, k, n):
    reference = make_iterator()
    for _ in range(k):
        next(reference)
    state = json.loads(json.dumps(reference.get_state()))  # must survive JSON
    expected = [next(reference) for _ in range(n)]
    resumed = make_iterator()
    next(resumed)  # a used iterator must be restorable too
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(n))):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_resume_gives_the_same_next_batches(jsonl_dir, shuffle_buffer):
    directory, _ = jsonl_dir
    cfg = files_cfg(directory, shuffle_buffer=shuffle_buffer)
    # 40 small documents, 3 x 11 tokens a batch: k = 45 batches crosses several epochs.
    make = lambda: text.make_train_iterator(cfg, None, 11, 3, 7, 0, 1)  # noqa: E731
    _check_resume(make, k=45, n=25)
    _check_resume(make, k=0, n=5)


def test_resume_builtin_gpt2_and_new_epochs_are_reshuffled():
    make = lambda: text.make_train_iterator({}, "gpt2", 64, 4, 1, 0, 1)  # noqa: E731
    _check_resume(make, k=13, n=4)
    a = next(text.make_train_iterator({}, "gpt2", 64, 4, 1, 0, 1))["inputs"]
    b = next(text.make_train_iterator({}, "gpt2", 64, 4, 2, 0, 1))["inputs"]
    assert not np.array_equal(a, b)


def test_resume_refuses_a_state_from_other_settings(jsonl_dir):
    directory, _ = jsonl_dir
    cfg = files_cfg(directory)
    state = text.make_train_iterator(cfg, None, 11, 4, 0, 0, 1).get_state()
    other = text.make_train_iterator(cfg, None, 12, 4, 0, 0, 1)
    with pytest.raises(ValueError, match="seq_len"):
        other.set_state(state)


def test_epochs_are_shuffled_differently(tmp_path):
    docs = [f"document number {i}" for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", docs)
    cfg = files_cfg(tmp_path, shuffle_buffer=0)
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


# -------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("seq_len, global_batch, process_count", [(7, 4, 1), (16, 4, 2), (5, 8, 4)])
def test_eval_covers_every_token_once(jsonl_dir, seq_len, global_batch, process_count):
    directory, _ = jsonl_dir
    cfg = files_cfg(directory)
    docs = list(text.load_documents(cfg, "train"))
    expected = [t for d in docs for t in BYTE.encode(d) + [EOD]]
    per_process = [
        list(text.make_eval_batches(cfg, None, seq_len, global_batch, split="train",
                                    process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1
    ev = text.make_eval_batches(cfg, None, seq_len, global_batch, split="train",
                                process_index=0, process_count=process_count)
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
    ev = text.make_eval_batches(cfg, None, 8, 2, split="train", max_documents=5,
                                process_index=0, process_count=1)
    assert ev.num_documents == 5
    assert ev.num_tokens == sum(len(BYTE.encode(d)) + 1 for d in docs[:5])
    first = [b["inputs"] for b in ev]
    assert all(np.array_equal(a, b["inputs"]) for a, b in zip(first, ev))  # re-iterable
    ev = text.make_eval_batches(cfg, None, 8, 2, split="train", max_tokens=50,
                                process_index=0, process_count=1)
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


def test_process_defaults_come_from_jax():
    ev = text.make_eval_batches({}, "byte", 32, 2, max_tokens=100)
    assert (ev.process_index, ev.process_count) == (0, 1)
    assert next(iter(ev))["inputs"].shape == (2, 32)
