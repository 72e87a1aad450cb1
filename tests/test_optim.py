"""Weight EMA (debiased) and BEMA against values computed by hand; schedules; validation."""

import jax
import jax.numpy as jnp
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


def _bema_reference(thetas, tau, every, kappa=0.5, eta=0.2, gamma=1.0, rho=10.0):
  """The BEMA paper's estimator in float64 Python, written from its definition: theta_s for s = 0..S
  (s = 0 the initialisation); the returned list holds the value after each optimizer step s >= 1."""
  out, theta0, ema, bema = [], None, None, None
  for s, th in enumerate(thetas):
    th = float(th)
    if s <= tau:
      theta0, ema, bema = th, th, None
    elif (s - tau) % every == 0:
      t = s - tau
      beta, alpha = (rho + gamma * t) ** -kappa, (rho + gamma * t) ** -eta
      ema = (1 - beta) * ema + beta * th
      bema = alpha * (th - theta0) + ema
    if s >= 1:
      out.append(th if bema is None else bema)
  return out


@pytest.mark.parametrize("tau,every", [(0, 1), (3, 1), (4, 3), (0, 2)])
def test_bema_burn_in_and_every_k_match_reference(tau, every):
  rng = np.random.default_rng(tau * 10 + every)
  thetas = np.cumsum(rng.normal(size=13))  # theta_0 (init) .. theta_12
  ref = _bema_reference(thetas, tau, every)
  bema = optim.BEMA(every=every, burn_in=tau)
  s = bema.init({"w": jnp.asarray(thetas[0], jnp.float32)})
  got = []
  for step in range(1, len(thetas)):
    p = {"w": jnp.asarray(thetas[step], jnp.float32)}
    s = bema.update(s, p, step)
    got.append(float(bema.value(s, p)["w"]))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if tau > 0:  # during the burn-in the value is the raw weights, theta_0 follows them
    np.testing.assert_allclose(got[:tau], thetas[1 : tau + 1], rtol=1e-6)


def test_averages_keep_ema_and_bema_side_by_side():
  cfg = optim.default_weight_ema_config("ema,bema")
  cfg.decay, cfg.burn_in = 0.9, 2
  av = optim.make_weight_ema(cfg)
  assert av.names == ["ema", "bema"]
  ema, bema = optim.WeightEMA(0.9), optim.BEMA(burn_in=2)
  p = {"w": jnp.asarray([1.0, -2.0])}
  s, se, sb = av.init(p), ema.init(p), bema.init(p)
  for step in range(1, 6):
    p = {"w": p["w"] * 1.5 + 0.25}
    s, se, sb = av.update(s, p, step), ema.update(se, p, step), bema.update(sb, p, step)
  np.testing.assert_array_equal(av.value(s, p, "ema")["w"], ema.value(se, p)["w"])
  np.testing.assert_array_equal(av.value(s, p, "bema")["w"], bema.value(sb, p)["w"])
  with pytest.raises(ValueError, match="keeps ema, bema"):
    av.value(s, p, "swa")
  single = optim.make_weight_ema(optim.default_weight_ema_config("bema"))
  assert isinstance(single.init(p), optim.BEMAState)  # one kind keeps its bare state (checkpoint layout)


def test_averages_keep_several_bema_burn_ins():
  # 'bema_<tau>' members: each the plain BEMA with that burn-in, over the same trajectory.
  cfg = optim.default_weight_ema_config("ema,bema_0,bema_3,bema")
  cfg.burn_in = 2  # the plain 'bema' member's
  av = optim.make_weight_ema(cfg)
  assert av.names == ["ema", "bema_0", "bema_3", "bema"]
  refs = {"bema_0": optim.BEMA(burn_in=0), "bema_3": optim.BEMA(burn_in=3), "bema": optim.BEMA(burn_in=2)}
  p = {"w": jnp.asarray([1.0, -2.0])}
  s, rs = av.init(p), {k: b.init(p) for k, b in refs.items()}
  for step in range(1, 8):
    p = {"w": p["w"] * 1.1 - 0.5}
    s = av.update(s, p, step)
    rs = {k: refs[k].update(rs[k], p, step) for k in refs}
  for k, b in refs.items():
    np.testing.assert_array_equal(av.value(s, p, k)["w"], b.value(rs[k], p)["w"])
  assert not np.allclose(av.value(s, p, "bema_0")["w"], av.value(s, p, "bema_3")["w"])


@pytest.mark.parametrize("kind", ["ema,ema", "ema,swa", "none,ema", "", "bema_", "bema_-1", "bema_x", "bema_1,bema_1"])
def test_weight_ema_kind_list_validation(kind):
  cfg = optim.default_weight_ema_config("ema")
  cfg.kind = kind
  with pytest.raises(ValueError, match="weight_ema.kind"):
    optim.validate_weight_ema(cfg)


def test_bema_burn_in_validation():
  cfg = optim.default_weight_ema_config("bema")
  cfg.burn_in = -1
  with pytest.raises(ValueError, match="weight_ema.burn_in"):
    optim.validate_weight_ema(cfg)
