"""Study files: parsing, validation against the stage configs, runs per (variant, seed), shards."""

from __future__ import annotations

import textwrap

import pytest

from backtrack import study
from backtrack.config import resolve
from backtrack.errors import UserError
from backtrack.toy_base import ToyBaseConfig
from backtrack.train import TrainConfig

RECIPE = """\
task: arith
task_args: {steps: 2, seed: 7}
model: toy
output_dir: runs/ignored
seed: 5
toy_base: {steps: 20}
train: {learning_rate: 1.0e-4, epochs: 2}
eval: {n: 4, limit: 10}
"""


def write_study(tmp_path, body: str, recipe: str = RECIPE):
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "recipes" / "base.yaml").write_text(recipe)
    path = tmp_path / "studies" / "s.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("recipe: ../recipes/base.yaml\n" + textwrap.dedent(body))
    return path


def runs_of(tmp_path, body: str, recipe: str = RECIPE):
    return study.study_runs(study.load_study(write_study(tmp_path, body, recipe)))


def test_runs_have_their_own_folder_and_merged_recipe(tmp_path):
    runs = runs_of(tmp_path, """\
        seeds: [0, 3]
        output_dir: out/study
        variants:
          default: {}
          longer: {toy_base: {steps: 40}, task_args: {steps: 3}, train: {epochs: 4}}
        """)
    assert [r.name for r in runs] == ["default/seed0", "default/seed3", "longer/seed0",
                                      "longer/seed3"]
    longer = runs[3]
    assert longer.output_dir == "out/study/longer/seed3" == longer.recipe["output_dir"]
    assert longer.overrides == {"toy_base": {"steps": 40}, "task_args": {"steps": 3},
                                "train": {"epochs": 4}}
    train = resolve(TrainConfig, longer.recipe, "train")
    assert (train.epochs, train.learning_rate, train.seed) == (4, 1e-4, 3)  # section merged
    assert longer.recipe["task_args"] == {"steps": 3, "seed": 7}  # task seed untouched
    assert resolve(ToyBaseConfig, longer.recipe, "toy_base").steps == 40
    assert resolve(ToyBaseConfig, runs[1].recipe, "toy_base").steps == 20


@pytest.mark.parametrize("scope, base_seeds, train_seeds", [
    ("all", [0, 3], [0, 3]), ("finetune", [5, 5], [0, 3]), ("base", [0, 3], [5, 5])])
def test_seed_scope_decides_which_stages_the_seed_varies(tmp_path, scope, base_seeds,
                                                         train_seeds):
    runs = runs_of(tmp_path, f"seeds: [0, 3]\nseed_scope: {scope}\n")
    assert [resolve(ToyBaseConfig, r.recipe, "toy_base").seed for r in runs] == base_seeds
    assert [resolve(TrainConfig, r.recipe, "train").seed for r in runs] == train_seeds


def test_a_variant_may_set_its_own_seed_scope(tmp_path):
    runs = runs_of(tmp_path, """\
        seeds: [0, 3]
        seed_scope: finetune
        variants:
          default: {}
          bases: {seed_scope: all, train: {epochs: 1}}
        """)
    bases = {r.name: resolve(ToyBaseConfig, r.recipe, "toy_base").seed for r in runs}
    assert bases == {"default/seed0": 5, "default/seed3": 5, "bases/seed0": 0, "bases/seed3": 3}
    assert "seed_scope" not in runs[2].recipe  # the study's key, not the recipe's
    assert resolve(TrainConfig, runs[3].recipe, "train").epochs == 1


def test_finetune_scope_keeps_a_toy_base_seed_set_in_its_section(tmp_path):
    recipe = RECIPE.replace("toy_base: {steps: 20}", "toy_base: {steps: 20, seed: 9}")
    runs = runs_of(tmp_path, "seeds: [1, 2]\nseed_scope: finetune\n", recipe)
    assert [r.recipe["toy_base"]["seed"] for r in runs] == [9, 9]


def test_study_arms_set_the_recipes_top_level_arms_and_variants_may_override(tmp_path):
    from backtrack import pipeline

    runs = runs_of(tmp_path, "seeds: [0]\narms: [base, rft]\n"
                             "variants: {a: {}, b: {arms: [base, rft_bt]}}\n")
    assert [r.recipe["arms"] for r in runs] == [["base", "rft"], ["base", "rft_bt"]]
    assert runs[0].recipe["eval"] == {"n": 4, "limit": 10}  # eval.arms is not what `run` reads
    plans = [[s.name for s in pipeline.plan(*pipeline.resolve_recipe(r.recipe, "r", {}))]
             for r in runs]
    assert "eval_rft" in plans[0] and "backtrack" not in plans[0]
    assert "eval_rft_bt" in plans[1] and "backtrack" in plans[1] and "eval_rft" not in plans[1]
    assert study.load_study(write_study(tmp_path, "seeds: [0]\n")).share is True


def test_the_toy_recipe_validates_as_a_study_base(tmp_path):
    from backtrack import pipeline

    path = tmp_path / "s.yaml"
    path.write_text(f"recipe: {pipeline.EMBEDDED_RECIPE}\nseeds: [0, 1]\n")
    runs = study.study_runs(study.load_study(path))
    toy_arms = pipeline.read_recipe(pipeline.EMBEDDED_RECIPE)["arms"]
    assert "rft_bt" in toy_arms and [r.recipe["arms"] for r in runs] == [toy_arms] * 2


@pytest.mark.parametrize("body, message", [
    ("seeds: [0]\nvariants:\n  a: {train: {no_such_key: 1}}\n",
     "variant 'a': unknown key 'no_such_key' in section 'train'"),
    ("seeds: [0]\nvariants:\n  a: {no_such_key: 1}\n", "variant 'a': unknown key 'no_such_key'"),
    ("seeds: [0]\nvariants:\n  a: {train: {learning_rate: fast}}\n",
     "key 'train.learning_rate': expected a number"),
    ("seeds: [0]\nvariants:\n  a: {arms: [oracle]}\n", "unknown arm 'oracle'"),
    ("seeds: [0]\narms: [base, nope]\n", "unknown arm 'nope'"),
    ("seeds: [0]\nvariants:\n  a: {eval: {arms: [rft]}}\n",
     "key 'eval.arms' is set per step by `backtrack run`"),
    ("seeds: [0]\nvariants:\n  shared: {}\n", "are folders of the study itself"),
    ("seeds: [0]\nshare: maybe\n", "key 'share': expected true or false"),
    ("seeds: []\n", "key 'seeds' is empty"),
    ("variants: {a: {}}\n", "key 'seeds' is empty"),
    ("seeds: [1, 1]\n", "lists a seed twice"),
    ("seeds: [x]\n", "key 'seeds[0]': expected a number"),
    ("seeds: [0]\nvariants:\n  a: {}\n  b: {}\n  a: {train: {epochs: 1}}\n",
     "two variants named 'a' (lines 4 and 6)"),
    ("seeds: [0]\nseeds: [1]\n", "duplicate key 'seeds'"),
    ("seeds: [0]\nvariants:\n  a: {output_dir: x}\n", "key 'output_dir' is set by the study"),
    ("seeds: [0]\nvariants:\n  ../up: {}\n", "a variant name is a folder name"),
    ("seeds: [0]\nseed_scope: model\n", "'model' is not one of"),
    ("seeds: [0]\nvariants:\n  a: {seed_scope: model}\n",
     "variant 'a': key 'seed_scope': 'model' is not one of"),
    ("seeds: [0]\nvariantz: {}\n", "unknown key 'variantz'"),
    ("seeds: [0]\nvariants: {}\n", "key 'variants' is empty"),
    ("seeds: [0]\nreuse_shares: [no/such/study/shared]\n",
     "key 'reuse_shares[0]': no/such/study/shared is not a folder"),
    ("seeds: [0]\nshare: false\nreuse_shares: [.]\n", "needs share: true"),
])
def test_bad_study_is_one_line_user_error(tmp_path, body, message):
    with pytest.raises(UserError) as info:
        runs_of(tmp_path, body)
    text = str(info.value)
    assert message in text and "s.yaml" in text and "\n" not in text


def test_bad_base_recipe_names_the_recipe(tmp_path):
    with pytest.raises(UserError, match=r"base\.yaml: unknown key 'bogus' in section 'train'"):
        runs_of(tmp_path, "seeds: [0]\n", RECIPE + "train: {bogus: 1}\n")


def test_base_scope_needs_the_toy_model(tmp_path):
    with pytest.raises(UserError, match="seed_scope 'base'"):
        runs_of(tmp_path, "seeds: [0]\nseed_scope: base\n", RECIPE.replace("model: toy",
                                                                          "model: some/hub-id"))


def test_missing_recipe_and_study_files(tmp_path):
    with pytest.raises(UserError, match="study file not found"):
        study.load_study(tmp_path / "none.yaml")
    path = write_study(tmp_path, "seeds: [0]\n")
    path.write_text("recipe: missing.yaml\nseeds: [0]\n")
    with pytest.raises(UserError, match="missing.yaml: recipe file not found"):
        study.study_runs(study.load_study(path))


def test_shards_split_runs_disjointly_and_stably(tmp_path):
    body = "seeds: [0, 1, 2, 3]\nvariants: {a: {}, b: {train: {epochs: 1}}, c: {}}\n"
    runs = runs_of(tmp_path, body)
    shards = [study.select_runs(runs, f"{i}/3") for i in range(3)]
    names = [r.name for shard in shards for r in shard]
    assert sorted(names) == sorted(r.name for r in runs) and len(set(names)) == len(runs)
    again = runs_of(tmp_path, body)
    assert [r.name for r in study.select_runs(again, "1/3")] == [r.name for r in shards[1]]
    with pytest.raises(UserError, match="shard"):
        study.select_runs(runs, "3/3")


def test_only_selects_variants_and_runs_in_study_order(tmp_path):
    runs = runs_of(tmp_path, "seeds: [0, 1]\nvariants: {a: {}, b: {train: {epochs: 1}}, c: {}}\n")
    picked = study.only_runs(runs, "c, a/seed1")
    assert [r.name for r in picked] == ["a/seed1", "c/seed0", "c/seed1"]
    with pytest.raises(UserError, match="no variant or run named d, a/seed7"):
        study.only_runs(runs, "d,a/seed7")
    with pytest.raises(UserError, match="--only"):
        study.only_runs(runs, " , ")
