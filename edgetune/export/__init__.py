"""Export to edge runtimes: the formats `export.formats` may name, and what each becomes.

    gguf.py       the compressed model -> one GGUF per format: llama.cpp's own converter
                  (convert_hf_to_gguf.py) writes float32, llama.cpp's own quantizer
                  (llama_model_quantize) writes the format
    llamacpp.py   a GGUF scored inside llama.cpp (llama-cpp-python): task metric, perplexity,
                  prompt / generation tokens per second, peak memory, in a process of its own

Every exported file opens with the runtime's own tools, e.g. `llama-cli -m model.gguf` or
`ollama create -f Modelfile` (docs/export.md). What cannot be exported: prefix- and
prompt-tuned adapters (virtual tokens in front of every layer have no place in a GGUF).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    name: str        # export.formats entry
    runtime: str     # what runs the file
    ftype: str       # llama.cpp's file type (llama_cpp.LLAMA_FTYPE_MOSTLY_<ftype>)
    bits: float      # nominal bits per weight of the quantized matrices
    summary: str


FORMATS: dict[str, ExportFormat] = {f.name: f for f in [
    ExportFormat("gguf-f16", "llama.cpp", "F16", 16, "half precision, no quantization"),
    ExportFormat("gguf-q8_0", "llama.cpp", "Q8_0", 8.5, "8-bit blocks of 32 (one fp16 scale each)"),
    ExportFormat("gguf-q4_0", "llama.cpp", "Q4_0", 4.5, "4-bit blocks of 32 (one fp16 scale each)"),
    ExportFormat("gguf-q4_k_m", "llama.cpp", "Q4_K_M",
                 4.5, "4-bit k-quants, 6-bit for sensitive tensors; rows not a multiple of 256 "
                      "(SmolLM2's 576) fall back to 32-blocks (Q5_0 / Q8_0)"),
]}

# What the export stage refuses before any work, by trainable set: why the result has no GGUF form.
NOT_EXPORTABLE = {
    "prefix": "prefix tuning keeps trained key/value vectors in front of every layer's attention, "
              "which a GGUF model cannot hold",
    "prompt": "prompt tuning keeps trained virtual token embeddings in front of the input, which a "
              "GGUF model cannot hold",
}


def unknown_format_error(name: str) -> str:
    return f"export.formats: unknown format {name!r}; expected one of {', '.join(FORMATS)}"
