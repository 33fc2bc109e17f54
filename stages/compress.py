"""compress: apply compress.steps in order to the fine-tuned model, measuring every step."""

import time
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="fine-tuned HF folder")
    p.add_argument("--data", required=True, help="prepared data folder (recovery / distillation data, eval)")
    p.add_argument("--calibration", required=True, help="calibrate stage output folder")
    p.add_argument("--out", required=True, help="compressed HF folder")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    inputs = [args.model, args.data, args.calibration]
    with stage("compress", args.params, inputs, [args.out, args.metrics]) as (params, _):
        import mlflow

        from edgetune.compress import CompressContext, apply_steps, calibration
        from edgetune.evaluate import evaluate_isolated
        from edgetune.models import dir_size_bytes, model_folder
        from edgetune.tracking import numeric

        cfg = params.compress
        model_folder(args.model)  # an HF (or adapter) folder, checked before the calibration loads
        ctx = CompressContext(calibration=calibration.load(Path(args.calibration)),
                              data_dir=Path(args.data), task=params.data.task)
        per_step, clock = [], [time.perf_counter()]

        def measure(i, step, folder, info):
            seconds = time.perf_counter() - clock[0]
            record = {"method": step.method, "seconds": seconds, **info}
            if cfg.evaluate_steps:
                record.update(evaluate_isolated(str(folder), args.data, params.data.task,
                                                params.evaluate, name=f"step {i} {step.method}",
                                                runtime=params.model))
            mlflow.log_metrics(numeric(record, f"step{i}.{step.method}."))
            per_step.append(record)
            clock[0] = time.perf_counter()

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        apply_steps(Path(args.model), cfg.steps, out, ctx, on_step=measure)
        mlflow.set_tag("edgetune.model_path", str(out))
        mlflow.set_tag("edgetune.compress.recipe", " -> ".join(s.method for s in cfg.steps) or "none")
        before, after = dir_size_bytes(args.model), dir_size_bytes(out)
        write_metrics(args.metrics, {"size_mb_before": before / 1e6, "size_mb": after / 1e6,
                                     "size_ratio": after / before, "num_steps": len(cfg.steps),
                                     "steps": {f"{i}_{r['method']}": r for i, r in enumerate(per_step)}})


if __name__ == "__main__":
    run_main(main)
