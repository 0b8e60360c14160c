"""Typed configuration: layering, --set parsing, ${paths.*} references and every error path."""

from __future__ import annotations

import pytest

from fmb.config import ConfigLayers, RawValue, build, parse_set_option, to_yaml
from fmb.errors import ConfigError
from fmb.paths import find_paths_file
from fmb.recipes import RunRequest, load_run_config
from tests.toy import ToyConfig


def built(*layers, paths=None):
    stack = ConfigLayers()
    for i, layer in enumerate(layers):
        stack.add(layer, f"layer{i}")
    return build(ToyConfig, stack, paths or {}, "paths_local.yaml")


def test_defaults_come_from_the_dataclasses():
    cfg = built()
    assert cfg.train.optim.lr == 3e-4 and cfg.train.schedule.kind == "cosine" and cfg.model.hidden == 16


def test_later_layers_win_and_nested_sections_merge():
    cfg = built({"train": {"optim": {"lr": 0.1, "weight_decay": 0.0}}}, {"train": {"optim": {"lr": 0.2}}})
    assert cfg.train.optim.lr == 0.2 and cfg.train.optim.weight_decay == 0.0


def test_yaml_exponent_without_dot_is_a_float():
    # PyYAML reads 1e-4 as the string '1e-4'; the schema knows the field is a float.
    import yaml

    raw = yaml.safe_load("train: {optim: {lr: 1e-4}}")
    assert raw["train"]["optim"]["lr"] == "1e-4"
    assert built(raw).train.optim.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("option, key, expected", [
    ("train.optim.lr=1e-4", ("train", "optim", "lr"), 1e-4),
    ("train.max_steps=1_000", ("train", "max_steps"), 1000),
    ("train.max_steps=null", ("train", "max_steps"), None),
    ("train.compile=true", ("train", "compile"), True),
    ("train.progress=no", ("train", "progress"), False),
    ("train.optim.betas=[0.8, 0.9]", ("train", "optim", "betas"), (0.8, 0.9)),
    ("train.log_to=[tensorboard]", ("train", "log_to"), ["tensorboard"]),
    ("train.out=001M", ("train", "out"), "001M"),
    ("train.precision=bf16", ("train", "precision"), "bf16"),
])
def test_set_values_are_parsed_by_field_type(option, key, expected):
    stack = ConfigLayers()
    stack.set(*parse_set_option(option), source=f"--set {option}")
    value = build(ToyConfig, stack)
    for part in key:
        value = getattr(value, part)
    assert value == expected


def test_unknown_key_names_it_the_source_and_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.optim\.lrr' \(from layer0\); did you mean 'train\.optim\.lr'"):
        built({"train": {"optim": {"lrr": 1}}})


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        built({"trian": {}})


@pytest.mark.parametrize("layer, message", [
    ({"train": {"optim": {"lr": "fast"}}}, r"'train\.optim\.lr' = 'fast' \(from layer0\): expected float"),
    ({"train": {"max_steps": 1.5}}, r"'train\.max_steps' = 1\.5.*expected int"),
    ({"train": {"compile": "maybe"}}, r"'train\.compile' = 'maybe'.*expected bool"),
    ({"train": {"precision": "fp8"}}, r"'train\.precision' = 'fp8'.*expected one of 'auto', 'bf16', 'fp16', 'fp32'"),
    ({"train": {"optim": {"betas": [0.9]}}}, r"'train\.optim\.betas'.*expected 2 values"),
    ({"train": {"optim": 3}}, r"train\.optim must be a mapping"),
    ({"train": {"batch_size": True}}, r"'train\.batch_size' = True.*expected int"),
])
def test_wrong_types_name_key_value_and_expected_type(layer, message):
    with pytest.raises(ConfigError, match=message):
        built(layer)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_set_option("train.lr")
    with pytest.raises(ConfigError, match="not a dotted key"):
        ConfigLayers().set("train..lr", RawValue("1"), "--set")


def test_path_references_resolve_or_name_the_key_to_set():
    cfg = built({"train": {"out": "${paths.runs}/x"}}, paths={"runs": "/scratch/runs"})
    assert cfg.train.out == "/scratch/runs/x"
    with pytest.raises(ConfigError, match=r"refers to \$\{paths\.euclid_desi\}, which is empty in paths_local\.yaml.*'euclid_desi: "):
        built({"train": {"out": "${paths.euclid_desi}"}}, paths={"euclid_desi": None})
    with pytest.raises(ConfigError, match=r"which is not defined"):
        built({"train": {"out": "${paths.nope}"}})


def test_paths_file_lookup_order(tmp_path, monkeypatch):
    explicit = tmp_path / "a.yaml"
    env = tmp_path / "b.yaml"
    explicit.write_text("data: a_dir\n")
    env.write_text("data: /abs/b\n")
    monkeypatch.setenv("FMB_PATHS", str(env))
    found = find_paths_file(explicit)
    assert found.file == explicit and found.resolved()["data"] == str(tmp_path / "a_dir")  # relative to the file
    assert find_paths_file().resolved()["data"] == "/abs/b"
    monkeypatch.setenv("FMB_PATHS", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"\$FMB_PATHS does not exist"):
        find_paths_file()
    monkeypatch.delenv("FMB_PATHS")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paths_local.yaml").write_text("data: here\n")
    assert find_paths_file().file == tmp_path / "paths_local.yaml"


def test_run_request_layers_flags_and_sets(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  batch_size: 3\n  optim: {lr: 5e-3}\n")
    paths = tmp_path / "paths.yaml"
    paths.write_text("runs: /tmp/runs\n")
    request = RunRequest(model="toy", config_files=[str(user)], sets=["train.optim.lr=7e-3"],
                         flags={"lr": 6e-3, "max_steps": 11, "seed": None}, paths=str(paths))
    cfg, _ = load_run_config(request, ToyConfig)
    assert cfg.train.batch_size == 3 and cfg.train.max_steps == 11
    assert cfg.train.optim.lr == pytest.approx(7e-3)  # --set beats --lr beats --config
    assert cfg.train.out == "/tmp/runs/toy"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = built({"train": {"optim": {"betas": [0.8, 0.9]}}})
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    stack = ConfigLayers()
    stack.add_file(path)
    assert build(ToyConfig, stack) == cfg


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        ConfigLayers().add_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ConfigLayers().add_file(bad)


def test_slurm_settings_are_read_as_written_not_as_paths(tmp_path):
    paths = tmp_path / "paths_local.yaml"
    paths.write_text("runs: r\nslurm_account: abc\nslurm_modules: [pytorch-gpu/py3/2.5.0]\nslurm_qos:\n")
    found = find_paths_file(paths)
    assert found.resolved() == {"runs": str(tmp_path / "r")}
    assert found.setting("slurm_account") == "abc"
    assert found.setting("slurm_modules") == ["pytorch-gpu/py3/2.5.0"]
    assert found.setting("slurm_qos") is None and found.setting("slurm_partition") is None


def test_an_empty_section_in_a_later_layer_changes_nothing():
    cfg = built({"train": {"batch_size": 7, "optim": {"lr": 1e-3}}}, {"train": None})
    assert cfg.train.batch_size == 7 and cfg.train.optim.lr == 1e-3


@pytest.mark.parametrize("key", ["eval_every", "log_every", "batch_size", "max_steps"])
def test_intervals_and_sizes_must_be_positive(key):
    with pytest.raises(ConfigError, match=rf"'train\.{key}' = 0: must be at least 1"):
        built({"train": {key: 0}})
    with pytest.raises(ConfigError, match=r"'train\.checkpoint\.every' = -1"):
        built({"train": {"checkpoint": {"every": -1}}})
