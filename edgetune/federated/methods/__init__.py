"""Federated methods, looked up by `finetune.method` through one dict.

Adding a method = one module here with a FederatedMethod subclass + one register_method line.
"""

from edgetune.federated.methods.base import METHODS, FederatedMethod, get_method, register_method
from edgetune.federated.methods.fedit import FedIT

register_method("fedit", FedIT)

__all__ = ["METHODS", "FederatedMethod", "get_method", "register_method"]
