"""Adapters to installed third-party MoE kernels. Each module registers a backend whose `available()`
names the missing package when it is not installed, so the case is recorded as `skipped`, never a crash."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
