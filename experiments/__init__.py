"""Experiment drivers: each runs trainings through ema_jax and writes results (python -m experiments.<name>).

They import ema_jax; nothing in ema_jax imports them.
"""
