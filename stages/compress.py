"""compress: apply compress.steps in order to the fine-tuned model."""

from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="fine-tuned HF folder")
    p.add_argument("--out", required=True, help="compressed HF folder")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    with stage("compress", args.params, [args.model], [args.out, args.metrics]) as (params, _):
        import mlflow

        from edgetune.compress import apply_steps
        from edgetune.models import dir_size_bytes

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        steps = apply_steps(Path(args.model), params.compress.steps, out)
        mlflow.set_tag("edgetune.model_path", str(out))
        mlflow.set_tag("edgetune.compress.recipe", " -> ".join(s["method"] for s in steps) or "none")
        before, after = dir_size_bytes(args.model), dir_size_bytes(out)
        write_metrics(args.metrics, {"size_mb_before": before / 1e6, "size_mb": after / 1e6,
                                     "size_ratio": after / before, "num_steps": len(steps)})


if __name__ == "__main__":
    run_main(main)
