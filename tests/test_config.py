"""Configurations are validated on load; every mistake is a ConfigError naming the key and the file."""

import pytest

from pbp_hpc import config
from pbp_hpc.errors import ConfigError


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_net1h_on_mnist_set_up_to_train_fast():
    cfg = config.load()
    assert cfg.model.layers == [784, 1024, 10] and (cfg.model.dtype, cfg.backend) == ("float32", "numpy")
    assert (cfg.model.activation, cfg.model.loss, cfg.model.init) == ("relu", "cross_entropy", "he_uniform")
    assert (cfg.optimizer.name, cfg.schedule.name, cfg.train.batch_size) == ("nesterov", "cosine", 1024)


def test_the_report_configs_state_the_reports_setup_whatever_the_defaults():
    from pathlib import Path

    for net, layers in (("net1h", [784, 1024, 10]), ("net2h", [784, 1024, 1024, 10])):
        cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / f"report_{net}.yaml")
        assert cfg.model.layers == layers
        assert (cfg.model.activation, cfg.model.loss, cfg.model.init) == ("sigmoid", "mse", "glorot_uniform")
        assert (cfg.optimizer.name, cfg.schedule.name, cfg.schedule.warmup_epochs) == ("sgd", "constant", 0)


@pytest.mark.parametrize("name", ["mnist_net1h.yaml", "mnist_net2h.yaml", "report_net1h.yaml", "report_net2h.yaml",
                                  "sigmoid_mse_net1h.yaml", "sigmoid_mse_net2h.yaml",
                                  "quickstart.yaml", "synthetic.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    config.load(Path(__file__).resolve().parents[1] / "configs" / name)


def test_set_overrides_any_field_with_yaml_typed_values(tmp_path):
    cfg = config.load(write(tmp_path, "train: {epochs: 2}\n"), ["train.learning_rate=0.01", "model.layers=[784, 64, 64, 10]", "model.dtype=float64"])
    assert cfg.train.learning_rate == 0.01 and cfg.model.layers == [784, 64, 64, 10] and cfg.model.dtype == "float64"
    assert cfg.train.epochs == 2


def test_misspelt_key_is_named_with_a_suggestion_and_the_file(tmp_path):
    p = write(tmp_path, "train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "train.learning_rat" in str(e.value) and "train.learning_rate" in str(e.value) and str(p) in str(e.value)


def test_misspelt_override_key_is_named():
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        config.load(None, ["train.batchsize=4"])


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=-0.1", "train.learning_rate"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.layers=[784]", "model.layers"),
    ("model.layers=[784, 0, 10]", "model.layers"),
    ("train.epochs=two", "train.epochs"),
    ("model.dtype=float16", "model.dtype"),
    ("backend=tensorflow", "backend"),
    ("model.layers=[100, 10]", "model.layers[0]"),
])
def test_impossible_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert key in str(e.value)


def test_python_tags_are_refused_not_executed(tmp_path):
    p = write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)


def test_a_file_that_is_not_yaml_or_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        config.load(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        config.load(None, ["train.epochs"])


def test_digest_changes_with_any_setting():
    assert config.load().digest() != config.load(None, ["train.seed=1"]).digest()
