"""model: resolve model.source into a local HF folder (safetensors + tokenizer)."""

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    args = p.parse_args(argv)
    with stage("model", args.params, inputs=[], outputs=[args.out, args.metrics]) as (params, _):
        from edgetune.models import (count_parameters, dir_size_bytes, load_source,
                                     parse_source, save_hf)

        src = parse_source(params.model.source)  # cheap checks before the slow load
        model, tok = load_source(src, params.model.dtype)
        save_hf(model, tok, args.out)
        write_metrics(args.metrics, {
            "params": count_parameters(model),
            "size_mb": dir_size_bytes(args.out) / 1e6,
            "source_kind": src.kind,
        })


if __name__ == "__main__":
    run_main(main)
