"""Time of one MeZO step against one forward pass on the same batch, per z sampler (issues 3, 19).

The floor is 2.0 (a step is two forwards); the rest is regenerating z: a step (zo.step, what
clients run) makes three passes over the trainable weights (+eps, -2 eps, then the restore and
the update fused), each drawing z from the seed. Measured for each sampler
(finetune.zo.generator / distribution), and, in the same process on the same weights and batch,
a step done the way the MeZO authors' trainer does it (Malladi et al. 2023, large_models/
trainer.py: four passes, +eps, -2 eps, +eps, then the update, each reseeding torch.manual_seed
and drawing a fresh torch.normal per tensor, `param.data = param.data + ...` out of place);
edgetune's speed-up over it is mezo_style_s / step_s.
Reports medians of --repeats timings; the ratios (step / forward, MeZO-style / step) are
medians over pairs timed back to back, so a shared machine's drifting load cancels. Also the
share of a step spent regenerating z. Target: step / forward <= 2.3.

    python -m benchmarks.zo_step [--model DIR] [--trainable full|lora] [--repeats 3]
        [--samplers torch-cpu/gaussian philox/rademacher ...]

The timing functions need only torch and edgetune.federated.zo (benchmarks/gpu_check.py
calls them on a GPU, where neither pydantic nor mlflow is installed).
"""

from __future__ import annotations

import argparse
import statistics
import time

SAMPLERS = ("torch-cpu/gaussian", "torch-cpu/rademacher", "philox/rademacher", "philox/gaussian")


def timed(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mezo_authors_step(params, loss_fn, seed: int, eps: float, lr: float) -> float:
    """One step as MeZO's trainer does it (zo_perturb_parameters x3, zo_update): every pass
    reseeds torch's global generator and draws z per tensor with torch.normal."""
    import torch

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    perturb(1)
    loss1 = float(loss_fn())
    perturb(-2)
    loss2 = float(loss_fn())
    perturb(1)
    grad = (loss1 - loss2) / (2 * eps)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (grad * z)  # weight decay 0 (MeZO adds wd * p.data to non-bias weights)
    return grad


def paired(fn, reference, repeats: int, sync=lambda: None) -> tuple[float, float, float]:
    """(median seconds of fn, of reference, median of the per-pair ratios fn / reference), each
    pair timed back to back, so a load that drifts on a shared machine cancels in the ratio."""
    pairs = [(timed(fn, 1, sync), timed(reference, 1, sync)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))


def measure(params, loss, samplers=SAMPLERS, repeats: int = 3, sync=lambda: None) -> dict:
    """Forward, the MeZO authors' step, and per sampler a step and one perturbation pass
    (seconds), with ratios from back-to-back pairs (`paired`). lr 0: the same work, the
    weights kept."""
    import torch

    from edgetune.federated import zo

    with torch.no_grad():
        loss()  # warm-up
        mezo_step = lambda: mezo_authors_step(params, loss, 7, 1e-3, 0.0)
        mezo, forward, mezo_ratio = paired(mezo_step, loss, repeats, sync)
        out = {"forward_s": forward, "mezo_style_step_s": mezo, "mezo_style_over_forward": mezo_ratio,
               "trainable_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}
        for name in samplers:
            sampler = zo.Sampler(*name.split("/"))
            zo.perturb(params, 7, 0.0, sampler)  # warm-up (buffers, tables)
            step = lambda: zo.step(params, loss, seed=7, eps=1e-3, lr=0.0, sampler=sampler)
            step_s, _, ratio = paired(step, loss, repeats, sync)
            _, _, speedup = paired(mezo_step, step, repeats, sync)
            perturb = timed(lambda: zo.perturb(params, 7, 0.0, sampler), repeats, sync)
            out[name] = {"step_s": step_s, "perturb_pass_s": perturb, "step_over_forward": ratio,
                         "regeneration_share": min(1.0, 3 * perturb / step_s), "speedup_over_mezo_style": speedup}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--mirror")
    p.add_argument("--trainable", choices=("full", "lora"), default="full")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--name", help="results/<name>.json (default zo_step_<trainable>)")
    args = p.parse_args(argv)

    from benchmarks.common import model_dir, real_batch, save
    from edgetune.config import FinetuneParams
    from edgetune.federated import zo
    from edgetune.federated.trainable import prepare_trainable
    from edgetune.models import load_hf
    from edgetune.scoring import classification_loss, label_token_ids

    path = str(model_dir(args.model))
    model, tok = load_hf(path)
    model = prepare_trainable(model, args.trainable, FinetuneParams(), tok)
    params = zo.trainable(model)
    batch, labels = real_batch(tok, args.mirror, args.batch_size, args.seq_len)
    label_ids = label_token_ids(tok, (" negative", " positive"))
    results = measure(params, lambda: classification_loss(model, batch, labels, label_ids),
                      args.samplers, args.repeats)
    for k, v in results.items():
        print(f"{k:24s} {v if isinstance(v, dict) else f'{v:.4g}'}")
    print(save(args.name or f"zo_step_{args.trainable}", results,
               {"model": path, "trainable": args.trainable, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "repeats": args.repeats, "samplers": " ".join(args.samplers)}))


if __name__ == "__main__":
    main()
