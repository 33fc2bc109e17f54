"""Federated methods, looked up by `finetune.method` through one dict.

Adding a method = one module here with a FederatedMethod subclass + one register_method line.
Weight-exchanging methods (PEFT and full) share weights.py; seed-scalar (MEFT) methods share
seed_scalar.py.
"""

from edgetune.federated.methods.base import METHODS, FederatedMethod, get_method, register_method
from edgetune.federated.methods.fedbitfit import FedBitFit
from edgetune.federated.methods.fedfull import FedFull
from edgetune.federated.methods.fedit import FedIT
from edgetune.federated.methods.fedkseed import FedKSeed, FedKSeedPro
from edgetune.federated.methods.fedpeptao import FedPepTAO
from edgetune.federated.methods.fedprompt import FedPrompt
from edgetune.federated.methods.fedselft import FedSelFT
from edgetune.federated.methods.fwdllm import FwdLLM
from edgetune.federated.methods.job import JOB
from edgetune.federated.methods.mezo import MeZO

# PEFT / full: weights travel
register_method("fedit", FedIT)
register_method("fedpeptao", FedPepTAO)
register_method("fedprompt", FedPrompt)
register_method("fedbitfit", FedBitFit)
register_method("fedselft", FedSelFT)
register_method("fedfull", FedFull)
# MEFT: seeds and scalars travel
register_method("mezo", MeZO)
register_method("job", JOB)
register_method("fedkseed", FedKSeed)
register_method("fedkseed-pro", FedKSeedPro)
register_method("fwdllm", FwdLLM)



def build_method(cfg, tok, task, model=None) -> FederatedMethod:
    """The `cfg.method` method, training `task`'s objective (label words or answers)."""
    from edgetune.objectives import objective_for

    return get_method(cfg.method)(cfg, tok, objective_for(task, tok, cfg.max_length, model))


__all__ = ["METHODS", "FederatedMethod", "build_method", "get_method", "register_method"]
