"""calibrate: token windows for one-shot compression, cached apart from the compress steps so
changing a quantizer option does not rebuild them."""

from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--model", required=True, help="HF folder whose tokenizer is used")
    p.add_argument("--out", required=True, help="folder for calibration.parquet")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    with stage("calibrate", args.params, [args.data, args.model], [args.out, args.metrics],
               section="compress.calibration") as (params, _):
        from transformers import AutoTokenizer

        from edgetune.compress import calibration
        from edgetune.models import model_folder

        cfg = params.compress.calibration
        calibration.source_file(cfg, Path(args.data))  # both checked before the tokenizer loads
        tok = AutoTokenizer.from_pretrained(model_folder(args.model))
        windows = calibration.build(cfg, Path(args.data), tok)
        calibration.save(windows, Path(args.out))
        write_metrics(args.metrics, {"samples": len(windows), "seq_len": cfg.seq_len,
                                     "tokens": sum(map(len, windows)), "source": cfg.source})


if __name__ == "__main__":
    run_main(main)
