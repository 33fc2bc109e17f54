"""Federated methods: one module each, with a FederatedMethod subclass.

edgetune/federated/registry.py names them (one MethodSpec per method) and imports a method's
class only when it is built. Weight-exchanging methods (PEFT and full) share weights.py;
seed-scalar (MEFT) methods share seed_scalar.py.
"""

from edgetune.federated.methods.base import FederatedMethod, get_method


def build_method(cfg, tok, task, model=None) -> FederatedMethod:
    """The `cfg.method` method, training `task`'s objective (label words or answers)."""
    from edgetune.objectives import objective_for

    return get_method(cfg.method)(cfg, tok, objective_for(task, tok, cfg.max_length, model))


__all__ = ["FederatedMethod", "build_method", "get_method"]
