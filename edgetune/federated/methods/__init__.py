"""Federated methods, looked up by `finetune.method` through one dict.

Adding a method = one module here with a FederatedMethod subclass + one register_method line.
"""

from edgetune.federated.methods.base import METHODS, FederatedMethod, get_method, register_method
from edgetune.federated.methods.fedit import FedIT
from edgetune.federated.methods.fedkseed import FedKSeed, FedKSeedPro
from edgetune.federated.methods.fwdllm import FwdLLM
from edgetune.federated.methods.job import JOB
from edgetune.federated.methods.mezo import MeZO

register_method("fedit", FedIT)
register_method("mezo", MeZO)
register_method("job", JOB)
register_method("fedkseed", FedKSeed)
register_method("fedkseed-pro", FedKSeedPro)
register_method("fwdllm", FwdLLM)

__all__ = ["METHODS", "FederatedMethod", "get_method", "register_method"]
