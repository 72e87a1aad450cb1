"""The balance report (ema_jax/tasks/set_complement_theory.py) against displacements worked out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ema_jax.models.set_decoder import SetDecoder, SetDecoderConfig
from ema_jax.tasks import set_complement_theory as theory
from ema_jax.tasks.set_complement import set_logits


def test_exactly_balanced_logits_are_balanced():
  n, c = 7, 2.5

  def logits(_, batch):  # f(t) = -c * multi-hot(t): every held token displaced by c, valid tokens level
    return -c * jnp.zeros((batch["tokens"].shape[0], n)).at[
        jnp.arange(batch["tokens"].shape[0])[:, None], batch["tokens"]
    ].set(1.0)

  class NoWeights(nnx.Module):  # the logits above ignore the model
    pass

  b = theory.displacement_stats(NoWeights(), n, logits)
  assert b["delta1_mean"] == pytest.approx(c) and b["delta2_first_mean"] == pytest.approx(c)
  assert b["delta2_last_mean"] == pytest.approx(c) and b["delta1_cv"] == pytest.approx(0, abs=1e-12)
  assert b["balanced"] == 1.0 and all(b["conditions"].values())


def test_decoder_with_uniform_attention_matches_hand_displacements():
  """E = I, W_Q = W_K = 0 (uniform attention over the prefix), W_V W_O = -(1 + c) I, U = I: the logits are
  f(t) = e_{t_s} - (1 + c)/s sum_i e_{t_i}, so delta_1 = c, and at length 2 the earlier token is displaced
  by (1 + c)/2 and the last one by (c - 1)/2: level valid logits, but first != last (not balanced)."""
  n, c = 6, 3.0
  d = n + 1
  model = SetDecoder(SetDecoderConfig(n, embed_dim=d, value_dim=d), rngs=nnx.Rngs(0))
  model.embed.embedding.value = jnp.eye(d)
  model.query.kernel.value = jnp.zeros((d, d))
  model.key.kernel.value = jnp.zeros((d, d))
  model.value.kernel.value = -(1.0 + c) * jnp.eye(d)
  model.attn_out.kernel.value = jnp.eye(d)
  model.unembed.kernel.value = jnp.eye(d)[:, :n]
  b = theory.displacement_stats(model, n, set_logits)
  np.testing.assert_allclose(
      [b["delta1_mean"], b["delta2_first_mean"], b["delta2_last_mean"]], [c, (1 + c) / 2, (c - 1) / 2], rtol=1e-5
  )
  assert b["valid_spread1_rel"] == pytest.approx(0, abs=1e-6) and b["delta2_cv"] > 0.1
  assert b["conditions"]["level_valid_length1"] and not b["conditions"]["first_equals_last"]
  assert b["balanced"] == 0.0
  line = theory.format_balance({"raw": {"balance": b}})
  assert line.startswith("raw: balanced logit displacement") and "no (" in line and "first_equals_last" in line
