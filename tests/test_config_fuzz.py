"""Fuzzing the config loader: whatever a user writes, the answer is a Config or a ConfigError.

Inputs are built from the real keys (so many reach the field validators, not only the
unknown-key check), misspellings of them, and garbage keys, with values of every YAML type
and some no YAML file could hold (NaN, huge ints, bytes, deep nesting). Three routes in: a dict
(`from_dict`), a YAML file (`load(path)`), and `--set` strings (`load(None, overrides)`).
"""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbp_hpc import config
from pbp_hpc.errors import ConfigError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SECTIONS = [k for k in config.KNOWN_KEYS if "." not in k]
LEAVES = sorted({k.rsplit(".", 1)[-1] for k in config.KNOWN_KEYS})


def _misspell(word: str) -> st.SearchStrategy[str]:
    """The word with one character dropped, doubled or changed: the typos users make."""
    return st.integers(0, max(len(word) - 1, 0)).flatmap(
        lambda i: st.sampled_from([word[:i] + word[i + 1:], word[:i] + word[i] * 2 + word[i + 1:], word[:i] + "_" + word[i + 1:]]))


keys = st.one_of(
    st.sampled_from(SECTIONS + LEAVES),
    st.sampled_from(SECTIONS + LEAVES).flatmap(_misspell),
    st.text(max_size=12),
    st.integers(-3, 3),  # YAML allows non-string keys
)

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-2, 2), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["float32", "float64", "numpy", "cupy", "synthetic", "mnist", "sigmoid", "nan", "inf", "1e-3",
                     "yes", "no", "true", "12", "12.5", "[784, 10]", "", " ", "\x00", "é"]),
    st.text(max_size=20),
    st.binary(max_size=8),
)

values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
layer_lists = st.lists(st.one_of(st.integers(-2, 2000), st.booleans(), st.floats(), st.none(), st.text(max_size=3)), max_size=5)

sections = st.dictionaries(st.one_of(st.sampled_from(LEAVES), keys), st.one_of(values, layer_lists), max_size=6)
documents = st.dictionaries(st.one_of(st.sampled_from(SECTIONS), keys), st.one_of(sections, values), max_size=6)


def accepted_or_config_error(load) -> None:
    """Call load(); it may return a Config or raise ConfigError, and nothing else."""
    try:
        cfg = load()
    except ConfigError as exc:
        assert str(exc).strip()
        return
    assert isinstance(cfg, config.Config)
    # What was accepted is a real configuration: it survives its own JSON form unchanged.
    again = config.from_dict(cfg.to_dict())
    assert again == cfg and again.digest() == cfg.digest()
    assert math.isfinite(cfg.train.learning_rate) and cfg.train.batch_size >= 1
    assert all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in cfg.model.layers)


@FUZZ
@given(documents)
def test_any_mapping_gives_a_config_or_a_config_error(doc):
    accepted_or_config_error(lambda: config.from_dict(doc, "<fuzz>"))


@FUZZ
@given(st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=200),
                 st.sampled_from(["!!python/object/apply:os.system ['true']", "train: !!python/name:os.system",
                                  "a: &x [*x]", "[" * 1000, "{" * 1000, "\t:", "---\n---\n", "%YAML 9.9\n---\n{}", "\ufeff{}"])))
def test_any_yaml_file_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    accepted_or_config_error(lambda: config.load(path))


set_keys = st.one_of(
    st.sampled_from(config.KNOWN_KEYS),
    st.sampled_from(config.KNOWN_KEYS).flatmap(_misspell),
    st.lists(st.sampled_from(SECTIONS + LEAVES + ["", "x"]), min_size=1, max_size=4).map(".".join),
    st.text(max_size=15),
)
set_values = st.one_of(
    st.text(max_size=20),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
    st.sampled_from(["", "null", "~", "[1, 2", "{a: 1", "!!python/name:os.system", "&a [*a]", "[" * 1000, "1e400", ".nan",
                     "0x10", "0o7", "1_000", "2020-01-01", "? a", "|\n  x", "'unterminated"]),
)
set_strings = st.one_of(st.tuples(set_keys, set_values).map("=".join), st.text(max_size=30))


@FUZZ
@given(st.lists(set_strings, min_size=1, max_size=4))
def test_any_set_strings_give_a_config_or_a_config_error(overrides):
    accepted_or_config_error(lambda: config.load(None, overrides))
