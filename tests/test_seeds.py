"""Seeds as a sweep axis (`seeds: N`), named config variants (`variants:` + the `variant` axis),
and accuracy stated with its spread: mean ± std, min–max, the fraction that reached the target;
steps and epochs to target against batch size per optimizer."""

import json
from pathlib import Path

import pytest
import yaml

from pbp_hpc import analyze, sweep
from pbp_hpc.analyze import batch_scaling
from pbp_hpc.errors import ConfigError
from test_analyze import NESTEROV, tta_rec

ROOT = Path(__file__).resolve().parents[1]
BASE = {"data": {"name": "synthetic", "n_train": 240, "n_test": 40}, "model": {"layers": [784, 16, 10]},
        "train": {"epochs": 2, "learning_rate": 0.5, "eval_every": 0, "progress": False, "seed": 7}}
VARIANTS = {"nag": {"optimizer": {"name": "nesterov"}, "schedule": {"scale_with_batch": True}},
            "lamb": {"optimizer": {"name": "lamb"}, "train": {"learning_rate": 0.01}}}


def write(tmp_path, name="s", **spec):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": BASE, **spec}))
    return path


def test_seeds_make_a_point_per_seed_next_to_each_other_and_old_files_stay_as_they_were(tmp_path):
    axes = {"implementation": ["blas-serial"], "batch_size": [16, 32]}
    old = sweep.expand(write(tmp_path, "old", axes=axes))
    assert [p.seed for p in old.points] == [None, None]
    assert all([o for o in p.overrides if o.startswith("train.seed=")] == ["train.seed=7"] for p in old.points)  # the base's
    sw = sweep.expand(write(tmp_path, axes=axes, seeds=3, repetitions=2))
    assert [(p.batch_size, p.seed) for p in sw.points] == [(16, 7), (16, 8), (16, 9), (32, 7), (32, 8), (32, 9)]
    assert [p.config["train"]["seed"] for p in sw.points] == [7, 8, 9, 7, 8, 9]
    # a recorded seed is that point's only: the identity check tells the seeds apart
    recorded = {"implementation": "blas-serial", "batch_size": 16, "ranks": 1, "threads_per_rank": 1,
                "config": sw.points[0].config}
    assert sweep.identity_differences(recorded, sw.points[0]) == []
    assert any("train.seed" in d for d in sweep.identity_differences(recorded, sw.points[1]))
    assert "seed 8" in sweep.describe(sw.points[1])


@pytest.mark.parametrize("seeds", ["3", 0, 1.5, 10**6, True])
def test_a_seed_count_that_is_not_a_positive_count_is_refused_naming_the_key(tmp_path, seeds):
    with pytest.raises(ConfigError, match="seeds"):
        sweep.expand(write(tmp_path, axes={"implementation": ["blas-serial"]}, seeds=seeds))


def test_variants_set_their_config_and_are_checked(tmp_path):
    sw = sweep.expand(write(tmp_path, variants=VARIANTS, axes={"implementation": ["blas-serial"], "batch_size": [16],
                                                               "variant": ["nag", "lamb"]},
                            exclude=[{"variant": "nag", "batch_size": 32}]))
    assert [(p.variant, p.config["optimizer"]["name"], p.config["train"]["learning_rate"]) for p in sw.points] == [
        ("nag", "nesterov", 0.5), ("lamb", "lamb", 0.01)]
    with pytest.raises(ConfigError, match="axes.variant names 'adam'"):
        sweep.expand(write(tmp_path, variants=VARIANTS, axes={"implementation": ["blas-serial"], "variant": ["adam"]}))
    with pytest.raises(ConfigError, match="variants.lamb sets train.seed"):
        sweep.expand(write(tmp_path, seeds=2, variants={"lamb": {"train": {"seed": 3}}},
                           axes={"implementation": ["blas-serial"], "variant": ["lamb"]}))


def test_the_large_batch_study_expands_as_documented():
    sw = sweep.expand(ROOT / "jobs" / "large_batch.yaml")
    batches = sorted({p.batch_size for p in sw.points})
    assert batches[0] == 256 and batches[-1] == 16384 and sw.spec.seeds >= 3
    assert {p.config["optimizer"]["name"] for p in sw.points} == {"nesterov", "lars", "lamb"}
    assert {p.config["model"]["layers"][1] for p in sw.points} == {1024}
    assert all(p.config["train"]["target_accuracy"] == 0.97 for p in sw.points)


def seeded(batch, variant, epochs, seed, reached=True, acc=0.975):
    r = tta_rec(batch, 2, variant, epochs, 1.0, reached=reached, target=0.97, point=seed)
    r["config"]["train"]["seed"] = seed
    r["test_accuracy"] = acc
    return r


LAMB = {"optimizer": {"name": "lamb", "momentum": 0.9, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "schedule": NESTEROV["schedule"]}


def study():
    """Two optimizers at B = 1024..8192, three seeds each: nesterov's epochs grow 4x per doubling past
    1024 and it misses at 8192 in one seed; lamb's grow 1.4x."""
    out = []
    for i, B in enumerate((1024, 2048, 4096, 8192)):
        for s in range(3):
            out.append(seeded(B, NESTEROV, 2.0 * 4 ** i + 0.1 * s, s, reached=not (B == 8192 and s == 2),
                              acc=0.97 + 0.001 * s))
            out.append(seeded(B, LAMB, 2.0 * 1.4 ** i + 0.2 * s, s, acc=0.975 + 0.002 * s))
    return out


def test_rows_state_the_spread_over_seeds_and_the_fraction_that_reached():
    rows = analyze.time_to_target_rows(study())
    nag = [r for r in rows if r["variant"].startswith("nesterov")]
    b1024 = next(r for r in nag if r["batch_size"] == 1024)
    assert b1024["seeds"] == 3 and b1024["reached_fraction"] == 1.0
    assert b1024["epochs_to_target_mean"] == pytest.approx(2.1) and b1024["epochs_to_target_std"] == pytest.approx(0.1)
    assert (b1024["epochs_to_target_min"], b1024["epochs_to_target_max"]) == (2.0, 2.2)
    assert b1024["test_accuracy_mean"] == pytest.approx(0.971) and b1024["test_accuracy_std"] == pytest.approx(0.001)
    b8192 = next(r for r in nag if r["batch_size"] == 8192)
    assert b8192["reached_fraction"] == pytest.approx(2 / 3) and b8192["status"] == "2 of 3 reached"


def test_the_largest_batch_within_twice_the_epochs_of_batch_1024_per_optimizer():
    rows = analyze.time_to_target_rows(study())
    found = {k[0].split()[0]: batch_scaling.largest_batch(v)[1]["batch_size"]
             for k, v in batch_scaling.series(rows).items()}
    assert found == {"nesterov": 1024, "lamb": 4096}  # lamb 8192: 5.7 > 2 x 2.2 epochs


def test_cli_prints_mean_and_spread_and_draws_the_batch_figure(tmp_path, capsys):
    src = tmp_path / "lb.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in study()))
    assert analyze.main([str(src)]) == 0
    out = capsys.readouterr().out
    assert "Steps and epochs to 97% validation accuracy vs batch size" in out
    assert "largest batch reaching the target within 2x the epochs of B=1024" in out and "B=4096" in out
    assert "97.10 ± 0.10 (97.00–97.20)" in out  # test accuracy over nesterov's seeds at B = 1024
    from pbp_hpc.analyze import accuracy_figures  # (matplotlib: only the one figure, not analyze's every one)

    [(key, rows)] = analyze.by_target(analyze.time_to_target_rows(study())).items()
    written = []
    assert accuracy_figures.steps_vs_batch(rows, *key, tmp_path / "steps.png", written)
    assert written and (tmp_path / "steps.png").stat().st_size > 10_000


def test_the_shipped_recipes_load_and_say_what_they_turn_on():
    from pbp_hpc import config

    big = config.load(ROOT / "configs" / "large_batch.yaml")
    assert (big.optimizer.name, big.train.batch_size) == ("lamb", 8192)
    fast = config.load(ROOT / "configs" / "fast_net1h.yaml")
    assert (fast.train.batch_size, fast.train.epochs, fast.model.label_smoothing) == (1024, 6, 0.1)
    assert config.load(None).model.label_smoothing == 0 and config.load(None).train.ema_decay == 0  # off by default
