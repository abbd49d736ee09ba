"""The assets shipped in the package: the pretrained Hopper bundle and the behaviour actors."""

import numpy as np
import pytest

import dydiff_env
from dydiff_env.behaviour import load_shipped_actor
from dydiff_env.bundle import load_bundle
from dydiff_env.data import DEFAULT_DATASET_ID
from dydiff_env.env import shipped_bundle_path
from dydiff_env.tasks import TASKS, get_task


SHIPPED_BUNDLES = sorted(TASKS)  # every task has a bundle in dydiff_env/assets/bundles


def test_shipped_bundles_are_small_together():
    sizes = {task: sum(f.stat().st_size for f in shipped_bundle_path(task).iterdir()) for task in SHIPPED_BUNDLES}
    assert max(sizes.values()) < 20 * 2**20 and sum(sizes.values()) < 60 * 2**20, sizes


@pytest.mark.parametrize("task", SHIPPED_BUNDLES)
def test_shipped_bundle_loads_and_learned_the_medium_dataset(task):
    bundle = load_bundle(shipped_bundle_path(task), env_id=get_task(task).env_id,
                         require=("diffusion", "dynamics", "reward", "bc"))
    assert bundle.meta["dataset_id"] == get_task(task).dataset_id("medium")
    assert len(bundle.start_states["observations"]) > 0


def test_hopper_bundle_learned_the_default_dataset():
    assert load_bundle(shipped_bundle_path("hopper")).meta["dataset_id"] == DEFAULT_DATASET_ID


@pytest.mark.parametrize("task", SHIPPED_BUNDLES)
def test_make_with_no_arguments_uses_the_shipped_bundle(task):
    import gymnasium

    # a cheap sampler keeps the test fast; the defaults are exercised by benchmarks/throughput.py
    env = gymnasium.make(dydiff_env.ENV_IDS[task], sampler={"num_steps": 3}, pool_size=2)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (get_task(task).obs_dim,) and obs.dtype == np.float64
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert np.isfinite(obs).all() and np.isfinite(reward)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_make_without_a_shipped_bundle_gives_advice_that_works(task, tmp_path, monkeypatch):
    import gymnasium

    from dydiff_env import env as env_module
    from dydiff_env.bundle_schema import BundleError

    monkeypatch.setattr(env_module, "SHIPPED_BUNDLES", tmp_path)  # an installation whose bundles were left out
    with pytest.raises(BundleError) as failure:
        gymnasium.make(dydiff_env.ENV_IDS[task])
    advice = str(failure.value)
    assert f"dydiff-env collect {task}-medium" in advice and get_task(task).dataset_id("medium") in advice
    assert "dydiff-env train all" in advice


@pytest.mark.parametrize("name", ["medium", "replay-1", "replay-2", "replay-3", "expert"])
def test_shipped_behaviour_actors(name):
    actor = load_shipped_actor("hopper", name)
    actions = actor.act(np.zeros((4, 11), np.float32))
    assert actions.shape == (4, 3) and (np.abs(actions) <= 1).all()


def test_unknown_shipped_actor_names_the_fix():
    with pytest.raises(FileNotFoundError, match="behaviour train"):
        load_shipped_actor("hopper", "grandmaster")


def test_every_collect_preset_names_shipped_actors():
    from dydiff_env.tasks import COLLECT_PRESETS

    for preset in COLLECT_PRESETS.values():
        for actor in preset.actors:
            if actor != "random":
                load_shipped_actor(preset.task, actor)  # raises if a preset names an actor that is not shipped


@pytest.mark.parametrize("task", sorted(TASKS))
def test_medium_expert_starts_with_the_medium_episodes(task):
    """As in D4RL, medium-expert is the medium data plus expert data: same actor, seed and share, same episodes."""
    from dydiff_env.cli import main
    from dydiff_env.data import load_dataset

    assert main(["collect", f"{task}-medium", "--steps", "150", "--dataset-id", f"test/{task}/m-v0"]) == 0
    assert main(["collect", f"{task}-medium-expert", "--steps", "300", "--dataset-id", f"test/{task}/me-v0"]) == 0
    medium, medium_expert = load_dataset(f"test/{task}/m-v0"), load_dataset(f"test/{task}/me-v0")
    n = len(medium)
    assert len(medium_expert) > n
    np.testing.assert_array_equal(medium_expert.observations[:n], medium.observations)
    np.testing.assert_array_equal(medium_expert.actions[:n], medium.actions)
    # the rest is the expert's, which survives longer than the medium actor on average
    assert medium_expert.episode_returns[len(medium.episode_returns):].mean() > medium.episode_returns.mean()


def test_every_task_has_collect_presets_that_write_replayable_datasets():
    """Each task's medium preset collects with the simulator's qpos/qvel and the task's reference scores."""
    from dydiff_env.cli import main
    from dydiff_env.data import load_dataset
    from dydiff_env.tasks import COLLECT_PRESETS, LEVELS, preset_for_dataset

    for task in ("walker2d", "halfcheetah"):
        for level in LEVELS:
            preset = COLLECT_PRESETS[f"{task}-{level}"]
            assert preset.task == task and preset_for_dataset(preset.dataset_id) == f"{task}-{level}"
        assert main(["collect", f"{task}-medium", "--steps", "60", "--dataset-id", f"test/{task}/presets-v0"]) == 0
        data = load_dataset(f"test/{task}/presets-v0")
        assert data.env_id == get_task(task).env_id and len(data) >= 60
        assert data.qpos is not None and data.qvel is not None


def test_the_hopper_bundle_ships_a_student_that_samples_by_default():
    import gymnasium

    env = gymnasium.make("Dydiff-hopper-v0", plans="always", pool_size=2)
    sampler = env.unwrapped.vector_env.sampler
    assert (sampler.kind, sampler.num_steps) == ("student", 2)  # docs/samplers.md
    env.reset(seed=0)
    obs, reward, *_ = env.step(env.action_space.sample())
    assert np.isfinite(obs).all() and np.isfinite(reward)
    assert load_bundle(shipped_bundle_path("hopper")).student is not None


def test_a_bundle_without_a_task_serves_its_own_task():
    from dydiff_env import BundleError, DydiffEnv

    bundle = load_bundle(shipped_bundle_path("walker2d"))
    for given in (bundle, shipped_bundle_path("walker2d")):
        env = DydiffEnv(2, bundle=given, plans="never")
        assert env.task.name == "walker2d" and env.single_observation_space.shape == (17,)
        env.close()
    with pytest.raises(BundleError, match="models Walker2d-v5, not Hopper-v5"):
        DydiffEnv(bundle=bundle, task="hopper")
