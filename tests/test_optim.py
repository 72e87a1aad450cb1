"""Weight EMA (debiased) and BEMA against values computed by hand; schedules; validation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ema_jax import optim


def test_debiased_ema_hand_values():
  ema = optim.WeightEMA(decay=0.5)
  params = {"w": jnp.asarray([0.0])}
  s = ema.init(params)
  np.testing.assert_allclose(ema.value(s, {"w": jnp.asarray([7.0])})["w"], [7.0])  # before any update
  # theta_1 = 2: ema_1 = 0.5*0 + 0.5*2 = 1; debiased 1 / (1 - 0.5) = 2
  s = ema.update(s, {"w": jnp.asarray([2.0])}, 1)
  np.testing.assert_allclose(s.average["w"], [1.0])
  np.testing.assert_allclose(ema.value(s, {"w": jnp.asarray([2.0])})["w"], [2.0])
  # theta_2 = 4: ema_2 = 0.5*1 + 0.5*4 = 2.5; debiased 2.5 / (1 - 0.25) = 10/3
  s = ema.update(s, {"w": jnp.asarray([4.0])}, 2)
  np.testing.assert_allclose(ema.value(s, {"w": jnp.asarray([4.0])})["w"], [10.0 / 3.0], rtol=1e-6)
  # theta_3 = -2: ema_3 = 0.5*2.5 - 1 = 0.25; debiased 0.25 / 0.875 = 2/7
  s = ema.update(s, {"w": jnp.asarray([-2.0])}, 3)
  np.testing.assert_allclose(ema.value(s, {"w": jnp.asarray([-2.0])})["w"], [2.0 / 7.0], rtol=1e-6)


def test_debiased_ema_every_k():
  ema = optim.WeightEMA(decay=0.5, every=2)
  s = ema.init({"w": jnp.zeros(())})
  s = ema.update(s, {"w": jnp.asarray(10.0)}, 1)  # skipped
  assert int(s.count) == 0
  s = ema.update(s, {"w": jnp.asarray(2.0)}, 2)  # ema = 1, count 1 -> debiased 2
  np.testing.assert_allclose(ema.value(s, {"w": jnp.asarray(2.0)})["w"], 2.0)


def test_bema_hand_values():
  # kappa = 1, eta = 1, gamma = 1, rho = 1: beta_t = alpha_t = 1 / (1 + t)
  bema = optim.BEMA(kappa=1.0, eta=1.0, gamma=1.0, rho=1.0)
  theta0 = {"w": jnp.asarray([1.0])}
  s = bema.init(theta0)
  # t = 1: beta = 1/2: ema = 0.5*1 + 0.5*3 = 2; alpha = 1/2: bema = 0.5*(3 - 1) + 2 = 3
  s = bema.update(s, {"w": jnp.asarray([3.0])}, 1)
  np.testing.assert_allclose(s.ema["w"], [2.0])
  np.testing.assert_allclose(bema.value(s, {"w": jnp.asarray([3.0])})["w"], [3.0])
  # t = 2: beta = 1/3: ema = (2/3)*2 + (1/3)*6 = 10/3; alpha = 1/3: bema = (6 - 1)/3 + 10/3 = 5
  s = bema.update(s, {"w": jnp.asarray([6.0])}, 2)
  np.testing.assert_allclose(bema.value(s, {"w": jnp.asarray([6.0])})["w"], [5.0], rtol=1e-6)


def test_bema_default_rates():
  bema = optim.BEMA()  # kappa 0.5, eta 0.2, gamma 1, rho 10
  s = bema.init({"w": jnp.asarray(0.0)})
  s = bema.update(s, {"w": jnp.asarray(1.0)}, 1)
  beta1 = 11.0**-0.5
  alpha1 = 11.0**-0.2
  np.testing.assert_allclose(s.ema["w"], beta1, rtol=1e-6)
  np.testing.assert_allclose(bema.value(s, {"w": jnp.asarray(1.0)})["w"], alpha1 * 1.0 + beta1, rtol=1e-6)


def test_schedule_warmup_and_cosine():
  cfg = optim.default_optim_config()
  cfg.lr, cfg.warmup_steps, cfg.final_lr_fraction = 1.0, 10, 0.1
  sched = optim.make_schedule(cfg, 110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-5)
  np.testing.assert_allclose(sched(60), 0.55, rtol=1e-5)  # halfway through the cosine


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
@pytest.mark.parametrize("grad_clip,weight_decay", [(1.0, 0.0), (None, 0.1)])
def test_optimizer_equals_optax_adamw_and_lr_scale_scales(schedule, grad_clip, weight_decay):
  """lr_scale = 1 is bit for bit optax.adamw(schedule); lr_scale = 0.5 halves every update exactly."""
  cfg = optim.default_optim_config()
  cfg.update(schedule=schedule, grad_clip=grad_clip, weight_decay=weight_decay, warmup_steps=3, lr=3e-3)
  tx, sched = optim.make_optimizer(cfg, 20)
  plain = optax.adamw(
      sched,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
  )
  if grad_clip is not None:
    plain = optax.chain(optax.clip_by_global_norm(grad_clip), plain)
  params = {"w": jax.random.normal(jax.random.key(0), (6, 4)), "b": jnp.linspace(-1.0, 1.0, 4)}

  @jax.jit
  def run(params):
    def body(carry, i):
      p, s, s_ref, p_ref = carry
      g = jax.tree.map(lambda x: jnp.sin(3.0 * x * (i + 1.0)) + 0.1, p)
      g_ref = jax.tree.map(lambda x: jnp.sin(3.0 * x * (i + 1.0)) + 0.1, p_ref)
      u, s = tx.update(g, s, p)
      u_ref, s_ref = plain.update(g_ref, s_ref, p_ref)
      return (optax.apply_updates(p, u), s, s_ref, optax.apply_updates(p_ref, u_ref)), None

    return jax.lax.scan(body, (params, tx.init(params), plain.init(params), params), jnp.arange(20.0))[0]

  p1, s1, _, p_ref = run(params)
  assert float(optim.lr_scale(s1)) == 1.0
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(a, b)
  # One step from the same state: the update at lr_scale 0.5 is half the update at 1, exactly.
  s = tx.init(params)
  g = jax.tree.map(jnp.cos, params)
  for _ in range(2):
    u_full, s_full = tx.update(g, s, params)
    u_half, _ = tx.update(g, optim.set_lr_scale(s, 0.5), params)
    s = s_full
    for a, b in zip(jax.tree.leaves(u_half), jax.tree.leaves(u_full)):
      np.testing.assert_array_equal(a, 0.5 * b)


@pytest.mark.parametrize("field,value", [("kind", "swa"), ("decay", 1.0), ("decay", 0.0), ("every", 0), ("rho", -1.0)])
def test_weight_ema_validation(field, value):
  cfg = optim.default_weight_ema_config("bema" if field == "rho" else "ema")
  cfg[field] = value
  with pytest.raises(ValueError, match=f"config.weight_ema.{field}"):
    optim.make_weight_ema(cfg)
