"""Which trackers a run logs to (``train.log_with``): TensorBoard and W&B whenever they can run."""

from __future__ import annotations

import importlib.util

import pytest

from train.config import ConfigError
from train.tracking import tracker_names, wandb_unready

FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A home without W&B credentials, whatever the machine running the tests has."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def _installed(monkeypatch, *missing: str) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in missing else FIND_SPEC(name, *a))


def test_auto_adds_wandb_once_it_is_installed_and_logged_in(no_wandb_login, monkeypatch):
    _installed(monkeypatch)  # tensorboard and wandb as installed here
    assert tracker_names("auto") == ["tensorboard"]
    assert "no W&B key for api.wandb.ai" in wandb_unready()
    (no_wandb_login / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracker_names("auto") == ["tensorboard", "wandb"]
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # the key is for another server
    assert tracker_names("auto") == ["tensorboard"]


@pytest.mark.parametrize("variable, value, logs", [
    ("WANDB_API_KEY", "k" * 40, True), ("WANDB_MODE", "offline", True), ("WANDB_MODE", "disabled", False),
])
def test_auto_follows_the_wandb_environment(no_wandb_login, monkeypatch, variable, value, logs):
    _installed(monkeypatch)
    monkeypatch.setenv(variable, value)
    assert ("wandb" in tracker_names("auto")) is logs


def test_auto_without_the_packages_logs_to_metrics_jsonl_only(no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    _installed(monkeypatch, "wandb", "tensorboard", "tensorboardX")
    assert tracker_names("auto") == [] and wandb_unready() == "wandb is not installed"


@pytest.mark.parametrize("name", ["wandb", "tensorboard"])
def test_a_tracker_asked_for_by_name_must_be_installed(monkeypatch, name):
    _installed(monkeypatch, "wandb", "tensorboard", "tensorboardX")
    with pytest.raises(ConfigError, match=f"train.log_with is {name} but {name} is not installed: pip install {name}"):
        tracker_names(name)
    _installed(monkeypatch)
    assert tracker_names(name) == [name] and tracker_names("none") == []


def test_installing_wandb_is_enough_for_training_and_validation_curves_to_reach_it(comfy, data, no_wandb_login, monkeypatch, tmp_path):
    """Default ``log_with: auto`` with W&B offline: the run under output_dir/wandb holds the train and
    validation series, and TensorBoard gets them as well."""
    from tests.fixtures.tiny_training import overrides
    from train.config import load_config
    from train.fit import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    config = load_config(None, [*overrides(comfy, data, out, max_steps=2, validation_every=2, validation_samples=2), "train.log_with=auto"])
    config.data.validation_identities = 2
    run(config)
    (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = record.read_bytes()
    assert b"train/loss" in logged and b"validation/loss" in logged
    assert list((out / "logs").rglob("events.out.tfevents.*"))
