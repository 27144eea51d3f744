"""charmlp_fast: a fast trainer for Bengio-style character MLP language models.

The Python API, for scripts and for tuners (Ray Tune, Optuna, submitit) that call a function per trial:

    import charmlp_fast
    metrics = charmlp_fast.train({"n_hidden": 300, "steps": 50_000, "out": "runs/h300"})  # metrics.json's dict
    records = charmlp_fast.sweep([{"lr": lr, "seed": s} for lr in (0.05, 0.1) for s in (1, 2)], out="runs/lr")

A config is a TrainConfig (charmlp_fast.TrainConfig) or a dict of its fields; absent fields take the defaults of
`python -m charmlp_fast.train`, and every value is checked as its flag is.
"""
import importlib
import sys
import types

__version__ = "0.1.0"


class _CallableModule(types.ModuleType):
    """A module that is also its API function: charmlp_fast.train is the trainer's module (what
    `python -m charmlp_fast.train` runs) and, called, trains a config; likewise charmlp_fast.sweep. A plain function
    of the same name would be replaced by the submodule as soon as anything imports it."""

    def __call__(self, *args, **kwargs):
        return self.__api__(*args, **kwargs)


def callable_module(name: str, api) -> None:
    """Make module `name` callable as api (the last line of train.py and sweep.py)."""
    module = sys.modules[name]
    module.__api__ = api
    module.__class__ = _CallableModule


def __getattr__(name: str):
    """charmlp_fast.train, .sweep and .TrainConfig without importing their modules first."""
    if name in ("train", "sweep"):
        return importlib.import_module(f"charmlp_fast.{name}")
    if name == "TrainConfig":
        from charmlp_fast.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'charmlp_fast' has no attribute {name!r}")
