"""params.yaml validation: bad values fail fast, with one line naming the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from edgetune.config import ParamsError, flatten, load_params, parse_params
from tests.conftest import REPO


def default_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.partition.num_clients >= 8 and params.finetune.method == "fedit"


@pytest.mark.parametrize("section, key, value, expected", [
    ("partition", "num_clients", 0, "partition.num_clients"),
    ("partition", "alpha", -1, "partition.alpha"),
    ("finetune", "sample_rate", 1.5, "finetune.sample_rate"),
    ("finetune", "method", "nope", "finetune.method"),
    ("finetune", "lr", "fast", "finetune.lr"),
    ("partition", "scheme", "random", "partition.scheme"),
    ("partition", "alhpa", 0.3, "partition.alhpa: unknown key"),
    ("data", "task", "imdb", "data.task"),
])
def test_bad_value_names_the_key(section, key, value, expected):
    raw = default_raw()
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_unknown_section_and_compress_step():
    raw = default_raw()
    raw["compress"]["steps"] = [{"method": "zip"}]
    with pytest.raises(ParamsError, match=r"compress\.steps\.0"):
        parse_params(raw)
    raw = default_raw()
    raw["trainer"] = {}
    with pytest.raises(ParamsError, match="trainer: unknown key"):
        parse_params(raw)


def test_flatten_uses_dotted_keys():
    flat = flatten(load_params(REPO / "params.yaml"))
    assert flat["finetune.lora.r"] == 8
    assert flat["partition.alpha"] == 0.5
    assert flat["compress.steps.0.method"] == "int8"


@pytest.mark.parametrize("stage, args", [
    ("partition", ["--data", "d", "--out", "o", "--plot", "p.png", "--metrics", "m.json"]),
    ("finetune", ["--model", "m", "--partitions", "p", "--out", "o", "--plots", "pl",
                  "--metrics", "m.json"]),
])
def test_stage_exits_2_before_any_work(tmp_path, stage, args):
    raw = default_raw()
    raw["partition"]["alpha"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO),
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]] and "partition.alpha" in lines[0] and lines[0].startswith("error:")
    # nothing written: no outputs, no tracking store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_edgetune_check_cli(tmp_path):
    raw = default_raw()
    raw["finetune"]["method"] = "nope"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "edgetune", "check"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO),
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "finetune.method" in proc.stderr


def test_schema_defaults_are_params_yaml():
    """One source of truth: a knob left out of params.yaml means what params.yaml says."""
    from edgetune.config import Params

    committed, schema = flatten(load_params(REPO / "params.yaml")), flatten(Params())
    drift = {k: (committed.get(k), schema.get(k)) for k in committed.keys() | schema.keys()
             if committed.get(k) != schema.get(k)}
    assert drift == {}, f"params.yaml vs config.py defaults (yaml, schema): {drift}"


def test_params_yaml_survives_successive_dvc_set_param_rewrites(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml in place (ruamel round trip) and leaves it
    so in the workspace; the next `-S` rewrites that. Comments inside a block list once made the
    second rewrite emit invalid YAML (`evaluate: batch_size: 16`)."""
    import itertools
    import shutil

    from dvc.utils.hydra import apply_overrides

    from edgetune.config import load_params

    overrides = ["export.formats=[gguf-q8_0,gguf-q4_0]", "compress.steps=[]", "finetune.method=fedkseed",
                 "compress.steps=[{method:gptq,bits:4}]", "finetune.lora.targets=[q_proj]"]
    path = tmp_path / "params.yaml"
    for sequence in itertools.permutations(overrides, 3):
        shutil.copy(REPO / "params.yaml", path)
        for override in sequence:
            apply_overrides(str(path), [override])
            load_params(path)  # raises ParamsError on a broken file
        assert load_params(path).finetune.lora.targets == (["q_proj"] if overrides[-1] in sequence else ["q_proj", "v_proj"])
