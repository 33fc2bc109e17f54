"""export: the compressed model as files edge runtimes run (export.formats, e.g. GGUF for
llama.cpp / ollama / LM Studio), written with the runtimes' own converter and quantizer;
the evaluate stage scores each one inside its runtime. With export.formats: [] the stage
writes only a note, so the pipeline needs no runtime installed."""

import os
from pathlib import Path

from edgetune.cli import parser, run_main, stage, write_metrics

NOTE = ("No edge-runtime export: export.formats is [] in params.yaml.\n"
        "Try: dvc exp run -S 'export.formats=[gguf-q8_0,gguf-q4_0]' (needs pip install 'edgetune[deploy]').\n")


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="compressed HF folder")
    p.add_argument("--out", required=True, help="folder of <format>/model.gguf files")
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    with stage("export", args.params, [args.model], [args.out, args.metrics]) as (params, _):
        import mlflow

        from edgetune.models import is_adapter_folder, model_folder

        formats, out = params.export.formats, Path(args.out)
        if not formats:
            out.mkdir(parents=True)
            (out / "README.txt").write_text(NOTE)
            write_metrics(args.metrics, {"formats": []})
            return
        from edgetune.config import BadInput
        from edgetune.export.gguf import export_gguf

        model_folder(args.model)
        if is_adapter_folder(args.model):  # params validation refuses these methods; a hand-made folder
            raise BadInput(f"{args.model}: a peft adapter folder (prefix / prompt tuning) has no GGUF form")
        threads = params.evaluate.threads or os.cpu_count() or 1
        records = export_gguf(Path(args.model), formats, out, threads)
        mlflow.set_tag("edgetune.export.formats", ", ".join(formats))
        write_metrics(args.metrics, {"formats": formats, **records})


if __name__ == "__main__":
    run_main(main)
