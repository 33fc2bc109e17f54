"""The federated methods: one MethodSpec each, the single source of what a method is.

config.py validates finetune.* against it, report.py labels runs by it, and methods.get_method
imports a method's class from it. Torch-free: a spec names its class by module path, imported
only when the method is built. Adding a method = its module (a FederatedMethod subclass) and
one `register(MethodSpec(...))`, here or anywhere before params are parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Literal

Family = Literal["weights", "seed-scalar", "centralized"]
RULES = ("mean", "median", "trimmed_mean", "krum", "clipped_mean")  # finetune.aggregation.rule
SEEDLESS_RULES = ("mean", "clipped_mean")  # the rules for clients that share no coordinates
TRAINABLE_SETS = ("full", "lora", "prefix", "prompt", "bitfit")  # what a ZO method may train


@dataclass(frozen=True)
class MethodSpec:
    """One method. `lr`: client AdamW learning rate when finetune.lr is auto (None: zeroth
    order, zo.lr). `trainables`: the sets finetune.trainable may name (default: its own only).
    `shares_seeds` False: clients' updates have no common coordinates (no robust rule but
    clipping, no DP noise on a sum). `partial_replies`: a client trains and sends only some of
    the blocks (FedSelFT's layers, FedPepTAO's prefixes)."""

    name: str
    family: Family
    trainable: str  # trained when finetune.trainable is auto
    impl: str  # "module:Class"
    lr: float | None = None
    trainables: tuple[str, ...] = ()
    shares_seeds: bool = True
    flower: bool = True  # runs on finetune.backend flower
    server_optimizer: str = "fedavg"  # finetune.server.optimizer auto
    partial_replies: bool = False

    def __post_init__(self):
        if (self.lr is None) == (self.family == "weights"):
            raise ValueError(f"method {self.name}: a client lr is for weights methods and only them")

    @property
    def zo(self) -> bool:
        """Zeroth order: seeds and scalars travel, forward passes only."""
        return self.family != "weights"

    @property
    def centralized(self) -> bool:
        """One client holds all the data (e.g. mezo)."""
        return self.family == "centralized"

    @property
    def rules(self) -> tuple[str, ...]:
        return RULES if self.shares_seeds else SEEDLESS_RULES

    @property
    def allowed_trainables(self) -> tuple[str, ...]:
        return self.trainables or (self.trainable,)

    def load(self) -> type:
        """The implementation class, named and flagged from this spec."""
        module, _, cls_name = self.impl.partition(":")
        cls = getattr(import_module(module), cls_name)
        cls.name, cls.centralized = self.name, self.centralized
        if self.family == "weights":
            cls.partial_replies = self.partial_replies
        return cls


@dataclass(frozen=True)
class ZODefaults:
    """finetune.zo.lr / eps / lr_decay_rounds when `auto`, per trainable set: the fewer weights
    z spans, the larger the step its estimate allows (MeZO's lr scales as 1 / effective
    dimension); decay_rounds None = a constant step."""

    lr: float
    eps: float
    decay_rounds: int | None = None


# From recorded runs (docs/results.md#zeroth-order-methods-time-to-accuracy). Full weights: 3e-5,
# from the long curves in benchmarks/results/tta_sst2_long.json (FedKSeed, SST-2, 8 Dirichlet
# clients): 1e-4 led the 160-step sweep (zo_sweep_full.json) but drifts below zero-shot after
# 400 client steps, 3e-4 falls apart within 80, while 3e-5 gains ~3 points and holds. lora,
# benchmarks/results/methods_sst2.json: in tta_sst2_long it keeps up with full weights to 1,000
# client steps and then, at a constant step, diverges to chance (1e-3 is stable but gains 2
# points at most in 28 minutes); decaying over 50 rounds it stays level with full weights to
# 1,920 steps (fedkseed-lora-decay), hence its decay_rounds. Full weights keep a constant step
# (a decay held the mean but lowered the peak: fedkseed-decay). prefix, prompt and bitfit:
# LoRA's eps and a third of its lr, constant, not swept yet.
ZO_DEFAULTS: dict[str, ZODefaults] = {
    "full": ZODefaults(lr=3e-5, eps=1e-3),
    "lora": ZODefaults(lr=3e-3, eps=1e-2, decay_rounds=50),
    "prefix": ZODefaults(lr=1e-3, eps=1e-2),
    "prompt": ZODefaults(lr=1e-3, eps=1e-2),
    "bitfit": ZODefaults(lr=1e-3, eps=1e-2),
}


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def names() -> list[str]:
    return list(METHODS)


def lookup(name: str) -> MethodSpec:
    """The spec of `name`; ValueError naming the registered methods if there is none."""
    if name not in METHODS:
        raise ValueError(f"finetune.method: {name!r} is not a registered method; expected one of {names()}")
    return METHODS[name]


def zo_methods() -> list[str]:
    return [n for n, s in METHODS.items() if s.zo]


_M = "edgetune.federated.methods."
PEFT_SETS = tuple(s for s in TRAINABLE_SETS if s != "full")
# Client lr: the smaller the trainable set's leverage per weight, the larger the step
# (prompt > prefix > BitFit > LoRA > layers / all weights).
for _spec in (
    # PEFT / full: weights travel
    MethodSpec("fedit", "weights", "lora", _M + "fedit:FedIT", lr=1e-3),
    MethodSpec("fedpeptao", "weights", "prefix", _M + "fedpeptao:FedPepTAO", lr=2e-3,
               server_optimizer="fedavgm", partial_replies=True),
    MethodSpec("fedprompt", "weights", "prompt", _M + "fedprompt:FedPrompt", lr=1e-2),
    MethodSpec("fedbitfit", "weights", "bitfit", _M + "fedbitfit:FedBitFit", lr=1e-3),
    MethodSpec("fedselft", "weights", "layers", _M + "fedselft:FedSelFT", lr=3e-5, partial_replies=True),
    MethodSpec("fedfull", "weights", "full", _M + "fedfull:FedFull", lr=3e-5),
    # MEFT: seeds and scalars travel
    MethodSpec("mezo", "centralized", "full", _M + "mezo:MeZO", trainables=TRAINABLE_SETS,
               shares_seeds=False, flower=False),
    MethodSpec("job", "seed-scalar", "full", _M + "job:JOB", trainables=TRAINABLE_SETS, shares_seeds=False),
    MethodSpec("fedkseed", "seed-scalar", "full", _M + "fedkseed:FedKSeed", trainables=TRAINABLE_SETS),
    MethodSpec("fedkseed-pro", "seed-scalar", "full", _M + "fedkseed:FedKSeedPro", trainables=TRAINABLE_SETS),
    MethodSpec("fwdllm", "seed-scalar", "lora", _M + "fwdllm:FwdLLM", trainables=PEFT_SETS, shares_seeds=False),
):
    register(_spec)
