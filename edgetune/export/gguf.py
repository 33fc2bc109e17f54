"""An HF folder -> GGUF files, with llama.cpp's own tools.

    1. a float32 copy of the model (quantized torch formats, e.g. torchao int8 or GPTQ's
       compressed-tensors, are dequantized: llama.cpp quantizes with its own grids)
    2. llama.cpp's convert_hf_to_gguf.py writes it as one float32 GGUF
    3. llama_model_quantize (llama-cpp-python's binding of llama.cpp) writes each format

The converter is not part of llama-cpp-python's wheel; its source distribution vendors the
converter of the very llama.cpp commit the wheel was built from. `converter_dir` takes it from
$EDGETUNE_LLAMA_CPP_SRC (a llama.cpp checkout), else from edgetune's cache, else extracts it from
that source distribution (downloaded from the package index once, like the install itself).
Nothing here quantizes by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgetune.config import BadInput, RunFailed
from edgetune.export import FORMATS

CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
INSTALL_HINT = "pip install 'edgetune[deploy]' (builds llama.cpp: about 10 minutes on 2 cores)"


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise BadInput(f"export.formats: GGUF export and scoring need llama-cpp-python; {INSTALL_HINT}") from None
    return llama_cpp


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetune"


def converter_dir() -> Path:
    """A folder holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ of the
    installed llama-cpp-python's commit (see the module docstring)."""
    if os.environ.get("EDGETUNE_LLAMA_CPP_SRC"):
        src = Path(os.environ["EDGETUNE_LLAMA_CPP_SRC"])
        if not (src / "convert_hf_to_gguf.py").is_file():
            raise BadInput(f"EDGETUNE_LLAMA_CPP_SRC={src}: no convert_hf_to_gguf.py there (a llama.cpp checkout expected)")
        return src
    version = llama_cpp().__version__
    cached = cache_root() / f"llama.cpp-{version}"
    if not (cached / "convert_hf_to_gguf.py").is_file():
        fetch_converter(version, cached)
    return cached


def fetch_converter(version: str, dest: Path) -> None:
    """Extract the converter from llama-cpp-python==version's sdist into dest (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not sdists:
            tail = " | ".join((got.stdout + got.stderr).strip().splitlines()[-2:])
            raise BadInput(f"export.formats: llama.cpp's converter (in the llama-cpp-python {version} source "
                           f"distribution) is not in {dest} and could not be downloaded ({tail}); set "
                           f"EDGETUNE_LLAMA_CPP_SRC to a llama.cpp checkout of that version")
        out = Path(tmp) / "converter"
        with tarfile.open(sdists[0]) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(out, members=members, filter="data")
        out.rename(dest)


def float_copy(src: Path, dst: Path) -> dict:
    """`src` (a pipeline's HF folder) as a float32 HF folder the converter reads: quantized
    weights dequantized; a byte-level BPE tokenizer declared without byte fallback. Returns
    what was changed, for the stage's metrics."""
    import torch

    from edgetune.models import load_hf

    model, _ = load_hf(src, dtype=torch.float32)
    quant = getattr(model.config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum, or a string
    if method:
        model = dequantized(model, str(method), src)
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return {"source_quantization": str(method or "none"), **converter_tokenizer(dst, model.generation_config)}


def dequantized(model, method: str, src: Path):
    """A plain float32 copy of a quantized model: tensor-subclass weights (torchao) through
    their own dequantize(), other formats through transformers' model.dequantize()."""
    import torch
    from transformers import AutoModelForCausalLM

    if method != "torchao":
        try:
            return model.dequantize()
        except Exception as e:  # noqa: BLE001 - transformers raises several kinds here
            raise BadInput(f"{src}: weights quantized by {method} cannot be dequantized for export "
                           f"({e.__class__.__name__}: {e}); drop that compress step when exporting: "
                           f"llama.cpp quantizes by itself (export.formats)") from None
    state = {k: (v.dequantize() if type(v) is not torch.Tensor and hasattr(v, "dequantize") else v).float()
             for k, v in model.state_dict().items()}
    config = model.config
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(state)  # strict: a key the float model lacks would leave random weights
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh


def converter_tokenizer(folder: Path, generation_config) -> dict:
    """Two fixes to the tokenizer transformers rebuilt from the packaged GGUF, so llama.cpp's
    converter writes what llama.cpp expects: (1) a byte-level BPE (GPT-2 style, SmolLM2) is
    saved with byte_fallback and a SentencePiece-style decoder, which sends the converter down
    its SentencePiece path (the file loads, then mis-tokenizes every prompt); (2) its EOS reads
    <|im_start|>, while the model ends answers with its generation config's EOS (<|im_end|>)."""
    changes = {}
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if tok["model"].get("type") == "BPE" and '"ByteLevel"' in pre and tok["model"].get("byte_fallback"):
        tok["model"]["byte_fallback"] = False
        tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        path.write_text(json.dumps(tok, ensure_ascii=False))
        changes["tokenizer_fix"] = "byte-level BPE"
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    config_path = folder / "tokenizer_config.json"
    if isinstance(eos, int) and config_path.is_file():
        vocab = {i: t for t, i in tok["model"]["vocab"].items()}
        vocab.update({t["id"]: t["content"] for t in tok.get("added_tokens", [])})
        config = json.loads(config_path.read_text())
        if eos in vocab and config.get("eos_token") != vocab[eos]:
            config.update(eos_token=vocab[eos], eos_token_id=eos)
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
            changes["eos_token"] = vocab[eos]
    return changes


def convert(folder: Path, out_file: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py: `folder` -> a float32 GGUF (its own progress bar)."""
    src = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src / "gguf-py"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out_file),
                           "--outtype", "f32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode or not out_file.is_file():
        tail = " | ".join(done.stdout.strip().splitlines()[-3:])
        raise RunFailed(f"convert_hf_to_gguf.py {folder} failed (exit {done.returncode}): {tail}")


def quantize(f32_file: Path, out_file: Path, fmt: str, threads: int) -> None:
    """llama.cpp's quantizer (llama_model_quantize) writes `fmt` from the float32 GGUF."""
    import ctypes

    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{FORMATS[fmt].ftype}")
    params.nthread = threads
    code = lib.llama_model_quantize(str(f32_file).encode(), str(out_file).encode(), ctypes.byref(params))
    if code != 0 or not out_file.is_file():
        raise RunFailed(f"llama_model_quantize to {fmt} failed (code {code})")


def export_gguf(model_dir: Path, formats: list[str], out: Path, threads: int) -> dict[str, dict]:
    """Every format as out/<format>/model.gguf. Written into a temporary folder beside `out`
    and renamed at the end, so a failure leaves no `out` for DVC to take."""
    from tqdm.auto import tqdm

    llama_cpp()
    converter_dir()  # fetched (or a clear error) before any model is loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    records = {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        tmp = Path(tmp)
        changes = float_copy(model_dir, tmp / "hf")
        convert(tmp / "hf", tmp / "model-f32.gguf")
        staged = tmp / "out"
        for fmt in tqdm(formats, desc="quantize (llama.cpp)"):
            (staged / fmt).mkdir(parents=True)
            target = staged / fmt / "model.gguf"
            quantize(tmp / "model-f32.gguf", target, fmt, threads)
            records[fmt] = {"runtime": FORMATS[fmt].runtime, "file": f"{fmt}/model.gguf",
                            "size_mb": target.stat().st_size / 1e6, **changes}
        staged.mkdir(exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return records
