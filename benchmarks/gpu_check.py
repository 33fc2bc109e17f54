"""The GPU check of issue 19, in one go, on a machine with torch, transformers and peft only.

Sections, each written to <out>/<section>.json (a failing section records its error and the
others still run):
  env           torch / CUDA / transformers versions, the device
  replay        a FedKSeed-style dictionary (K candidate seeds, one scalar each) replayed with
                philox on --device and on the CPU, per distribution and dtype: max |diff| of the
                weights (rademacher: 0 expected; gaussian: float rounding)
  table1        peak memory of one client step per method and of inference, on OPT-1.3B / 2.7B /
                6.7B (OPTConfig presets written out below, random weights built on the device, in
                float16), batch --batch-size x --seq-len random tokens: CUDA max_memory_allocated
                and max_memory_reserved (CPU: VmHWM)
  zo_step       ZO step / forward time per sampler and the MeZO authors' step (benchmarks/zo_step.py)
The ZO cases run edgetune's own zo.py (no pydantic needed); the backprop cases stand in for
FedIT (LoRA r=8 on q,v), FedPepTAO (prefix tuning, 10 virtual tokens) and FedSelFT (top 4
layers): one AdamW step on float32 trainable weights under float16 autocast, as
methods/weights.py does with model.dtype float16. Nothing is downloaded.

    python -m benchmarks.gpu_check OUT [--device cuda] [--tiny] [--sizes 1.3b 2.7b 6.7b]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback
from pathlib import Path

# transformers' OPTConfig presets of facebook/opt-* (their config.json), written out: no hub there.
OPT = {
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
    "125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4),
}
OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=None,
                  do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2, enable_bias=True)
CASES = ("inference", "fedit", "fedpeptao", "fedselft", "job", "fedkseed", "fwdllm")
MB = 1 << 20


def build_opt(size: str, device, dtype):
    """OPT-<size> with random weights, allocated directly on `device` in `dtype`."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    preset = {**OPT_COMMON, **OPT[size]}
    preset["word_embed_proj_dim"] = preset["hidden_size"]
    if size == "tiny":
        preset["vocab_size"] = 1000
    config = OPTConfig(**preset)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def batch_of(model, batch_size: int, seq_len: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"], use_cache=False).loss


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- sections
def env(args, device) -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import edgetune.config  # noqa: F401  (the pytest subset needs the project's dependencies)
        out["project_imports"] = True
    except ImportError as e:
        out["project_imports"] = f"{type(e).__name__}: {e}"
    return out


def candidate_dictionary(k: int, rounds: int):
    """FedKSeed's shape: K candidate seeds (uint32, numpy SeedSequence as fedkseed.py draws
    them) and per round a scalar on a few of them."""
    import numpy as np

    seeds = np.random.SeedSequence([0, k]).generate_state(k, dtype=np.uint32).tolist()
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(rounds):
        for j in rng.choice(k, size=8, replace=False):
            pairs.append((seeds[int(j)], float(rng.normal())))
    return pairs


def replay(args, device) -> dict:
    import torch

    from edgetune.federated import zo

    size = "tiny" if args.tiny else "125m"  # the CPU side draws Gaussian z slowly (philox.py)
    pairs = candidate_dictionary(4096, rounds=4)
    out = {"model": f"opt-{size}", "pairs": len(pairs)}
    for dtype in (torch.float32, torch.float16):
        base = build_opt(size, "cpu", dtype)
        params = [p for p in base.parameters()]
        initial = [p.detach().clone() for p in params]
        for distribution in zo.DISTRIBUTIONS:
            sampler = zo.Sampler("philox", distribution)
            results = []
            for where in ("cpu", device):
                ps = [p.clone().to(where) for p in initial]
                t0 = time.perf_counter()
                zo.replay(ps, [s for s, _ in pairs], [g for _, g in pairs], lr=1e-4, sampler=sampler)
                sync(torch.device(where) if isinstance(where, str) else where)
                results.append(([p.cpu() for p in ps], time.perf_counter() - t0))
            (cpu, t_cpu), (dev, t_dev) = results
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(cpu, dev))
            moved = max((a.float() - b.float()).abs().max().item() for a, b in zip(cpu, initial))
            out[f"{distribution}_{str(dtype).split('.')[-1]}"] = {
                "max_abs_diff": diff, "bit_identical": diff == 0.0, "max_abs_update": moved,
                "seconds_cpu": t_cpu, "seconds_device": t_dev}
        del base, params, initial
        gc.collect()
    return out


def client_step(case: str, model, batch, device):
    """One client step of `case` on `model` (float16 weights)."""
    import torch

    from edgetune.federated import zo

    if case == "inference":
        with torch.no_grad():
            lm_loss(model, batch)
        return model
    if case in ("job", "fedkseed"):  # full weights, seeds + scalars
        sampler = zo.Sampler("philox", "rademacher")
        with torch.no_grad():
            zo.step(zo.trainable(model), lambda: lm_loss(model, batch), 1, 1e-3, 1e-6, sampler)
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if case in ("fedit", "fwdllm"):
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    elif case == "fedpeptao":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
    else:  # fedselft: the top 4 decoder layers, float32 master weights
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.decoder.layers[-4:]:
            layer.float()
            for p in layer.parameters():
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if case == "fwdllm":  # LoRA ZO: 4 candidates scored by cosine, 2 perturbations
        sampler = zo.Sampler("philox", "gaussian")
        with torch.no_grad():
            direction = zo.materialize(params, 0, sampler)
            scores = {s: abs(torch.nn.functional.cosine_similarity(zo.materialize(params, s, sampler),
                                                                    direction, dim=0)) for s in range(1, 5)}
            for seed in sorted(scores, key=scores.get)[-2:]:
                g, _ = zo.projected_gradient(params, lambda: lm_loss(model, batch), seed, 1e-3, sampler)
                zo.apply_update(params, seed, g / 2, 1e-6, sampler=sampler)
        return model
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    model.train()
    with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
        loss = lm_loss(model, batch)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return model


def peak_case(case: str, size: str, args, device) -> dict:
    import torch

    from edgetune.devices import peak_rss_mb, reset_peak_rss

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_opt(size, device, dtype)
    batch = batch_of(model, args.batch_size, args.seq_len, device)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    sync(device)
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = client_step(case, model, batch, device)
    sync(device)
    row = {"seconds": time.perf_counter() - t0, "weights_mb": weights_mb, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / MB
        row["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
    del model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table1(args, device) -> dict:
    sizes = ["tiny"] if args.tiny else args.sizes
    out = {"batch_size": args.batch_size, "seq_len": args.seq_len,
           "dtype": "float16" if device.type == "cuda" else "float32 (CPU dry run)", "models": {}}
    key = "peak_gpu_mb" if device.type == "cuda" else "peak_rss_mb"
    for size in sizes:
        rows = {}
        for case in CASES:
            try:
                rows[case] = peak_case(case, size, args, device)
            except Exception as e:  # e.g. out of memory: recorded, the table goes on
                rows[case] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"table1 opt-{size} {case}: {rows[case]}", flush=True)
        inference = rows["inference"].get(key)
        for row in rows.values():
            if inference and key in row:
                row["ratio_to_inference"] = row[key] / inference
        out["models"][f"opt-{size}"] = rows
    return out


def zo_step(args, device) -> dict:
    import torch

    from benchmarks.zo_step import SAMPLERS, measure

    size = "tiny" if args.tiny else "1.3b"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_opt(size, device, dtype)
    batch = batch_of(model, args.batch_size, args.seq_len, device)
    params = [p for p in model.parameters()]
    samplers = SAMPLERS if device.type == "cuda" else [s for s in SAMPLERS if s != "philox/gaussian"]
    result = measure(params, lambda: lm_loss(model, batch), samplers, args.repeats, lambda: sync(device))
    return {"model": f"opt-{size}", "dtype": str(dtype), "batch_size": args.batch_size,
            "seq_len": args.seq_len, **result}


SECTIONS = {"env": env, "replay": replay, "table1": table1, "zo_step": zo_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder the JSON files go to")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide OPT everywhere (dry run)")
    p.add_argument("--sizes", nargs="+", default=["1.3b", "2.7b", "6.7b"], choices=[s for s in OPT if s != "tiny"])
    p.add_argument("--batch-size", type=int, default=32, help="the survey's SST-2 case study: 32")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = p.parse_args(argv)
    import torch

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            record = {"ok": True, **SECTIONS[name](args, device)}
        except Exception as e:
            failed += 1
            record = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        record["seconds"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        print(f"{name}: {'ok' if record['ok'] else record['error']} ({record['seconds']:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
