"""Weight EMA (debiased) and BEMA against values computed by hand; schedules; validation."""

import jax.numpy as jnp
import ml_collections
import numpy as np
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
  s = ema.update(s, {"w": jnp.asarray(10.0)}, 1)   # skipped
  assert int(s.count) == 0
  s = ema.update(s, {"w": jnp.asarray(2.0)}, 2)    # ema = 1, count 1 -> debiased 2
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
  beta1 = 11.0 ** -0.5
  alpha1 = 11.0 ** -0.2
  np.testing.assert_allclose(s.ema["w"], beta1, rtol=1e-6)
  np.testing.assert_allclose(bema.value(s, {"w": jnp.asarray(1.0)})["w"], alpha1 * 1.0 + beta1, rtol=1e-6)


def test_schedule_warmup_and_cosine():
  cfg = optim.default_optim_config()
  cfg.lr, cfg.warmup_steps, cfg.final_lr_fraction = 1.0, 10, 0.1
  sched = optim.make_schedule(cfg, 110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-5)
  np.testing.assert_allclose(sched(60), 0.55, rtol=1e-5)  # halfway through the cosine


@pytest.mark.parametrize("field,value", [("kind", "swa"), ("decay", 1.0), ("decay", 0.0), ("every", 0),
                                         ("rho", -1.0)])
def test_weight_ema_validation(field, value):
  cfg = optim.default_weight_ema_config("bema" if field == "rho" else "ema")
  cfg[field] = value
  with pytest.raises(ValueError, match=f"config.weight_ema.{field}"):
    optim.make_weight_ema(cfg)
