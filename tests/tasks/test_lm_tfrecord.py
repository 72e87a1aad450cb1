"""The C4 path users take: a tensorflow-datasets dataset stored as tfrecord (as the public C4 copies are),
read through tf.data, trains a tiny LM end to end, resumes exactly and is evaluated on every token.

Needs TensorFlow (the [tf] extra); CI installs it in a separate step and runs `pytest -m tf`.
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from ema_jax import evaluation, trainer
from ema_jax.data import text as text_lib
from ema_jax.data.text import builtin
from ema_jax.tasks import lm
from helpers import load_config, short

HAS_TF = importlib.util.find_spec("tensorflow") is not None
pytestmark = [
    pytest.mark.tf,
    pytest.mark.skipif(not HAS_TF, reason="the tf.data path needs TensorFlow (the [tf] extra)"),
]


def c4_like_documents():
  """Real text of the shape C4 holds (one document per record): the built-in text's documents."""
  train = list(builtin.load("train").iter_range(0, 120))
  validation = list(builtin.load("validation").iter_range(0, 12))
  return train, validation


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory):
  import tensorflow_datasets as tfds

  train, validation = c4_like_documents()

  class EmaJaxC4Like(tfds.core.GeneratorBasedBuilder):
    """C4's feature layout (text, url, timestamp), written as tfrecord by tfds' own builder."""

    VERSION = tfds.core.Version("3.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {"text": tfds.features.Text(), "url": tfds.features.Text(), "timestamp": tfds.features.Text()}
          ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

    def _generate_examples(self, docs):
      for i, d in enumerate(docs):
        yield i, {"text": d, "url": f"https://example.invalid/{i}", "timestamp": "2019-04-25T00:00:00Z"}

  data_dir = tmp_path_factory.mktemp("tfds_c4_like")
  EmaJaxC4Like(data_dir=str(data_dir), file_format="tfrecord").download_and_prepare()
  return str(data_dir)


def tfrecord_config(data_dir, model="ema_lm", steps=6):
  cfg = short(load_config(model, "tiny"), steps=steps)
  cfg.data.source = "tfds"
  cfg.data.tfds_name = "ema_jax_c4_like:3.1.0"
  cfg.data.data_dir = data_dir
  cfg.data.train_split = "train"
  cfg.data.eval_split = "validation"
  cfg.data.eval_max_tokens = cfg.data.eval_max_tokens_final = 0  # every token
  cfg.weight_ema.kind = "none"
  cfg.optim.schedule = "constant"  # the same learning rate at each step whatever cfg.steps is
  return cfg


def test_reads_every_record_through_tf_data(tfrecord_dir):
  train, validation = c4_like_documents()
  cfg = tfrecord_config(tfrecord_dir)
  docs = text_lib.load_documents(cfg.data, "train")
  assert "tfrecord" in docs.description and not docs.random_access
  assert sorted(docs) == sorted(train)
  assert sorted(text_lib.load_documents(cfg.data, "validation")) == sorted(validation)


@pytest.mark.parametrize("model", ["ema_lm", "gpt2"])
def test_tiny_lm_trains_from_tfrecord_and_resumes_exactly(tfrecord_dir, tmp_path, model):
  """Train 6 steps, then raise steps to 10 and resume (the tf.data iterator restored from the checkpoint):
  the losses and the final evaluation equal one uninterrupted 10-step run; the evaluation covers every
  token of the validation split, and eval.py reproduces it."""
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  final = trainer.train(tfrecord_config(tfrecord_dir, model, steps=10), whole)
  assert math.isfinite(final["loss"])
  trainer.train(tfrecord_config(tfrecord_dir, model, steps=6), split)
  resumed = trainer.train(tfrecord_config(tfrecord_dir, model, steps=10), split)

  def train_losses(wd):
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  a, b = train_losses(whole), train_losses(split)
  assert sorted(a) == sorted(b) == [2, 4, 6, 8, 10]
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-6)
  assert resumed["loss"] == pytest.approx(final["loss"], rel=1e-6)

  cfg = tfrecord_config(tfrecord_dir, model)
  task = lm.LMTask(cfg)
  expected = text_lib.make_eval_batches(cfg.data, task.tokenizer, cfg.task.seq_len, cfg.task.eval_batch_size)
  _, validation = c4_like_documents()
  assert expected.num_bytes == sum(len(t.encode("utf-8")) for t in validation)
  with open(os.path.join(whole, "eval_10.json")) as f:
    row = json.load(f)["results"]["raw"]["table"][0]
  assert row["tokens"] == expected.num_tokens and row["bytes"] == expected.num_bytes
  again = evaluation.run(whole, step=10)["raw"]["table"][0]
  assert again["perplexity"] == pytest.approx(row["perplexity"], rel=1e-5)
  assert again["perplexity_per_gpt2_token"] == pytest.approx(row["perplexity_per_gpt2_token"], rel=1e-5)
