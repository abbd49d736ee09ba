"""`dydiff-env generate`: DyDiff rollouts written as a Minari dataset, equal to `dydiff_rollout` run chunk by chunk
with the chunks' seeds, and the same dataset from 1 process or 2 under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dydiff_env import cli
from dydiff_env.data import dataset_exists, dataset_lock, load_dataset
from dydiff_env.generate import (METADATA_KEY, ChunkEpisodes, chunks_of_rank, episode_buffers, plan_chunks,
                                 rollout_episodes, shard_directory)
from dydiff_env.rollout import RolloutResult

from conftest import TINY_DATASET_ID, torchrun_problem

PACKAGE_ROOT = str(Path(cli.__file__).resolve().parents[1])
SHIPPED_EXPERT = Path(PACKAGE_ROOT) / "dydiff_env" / "assets" / "behaviour" / "hopper-expert.safetensors"
# 10 starts in chunks of 4 (4, 4, 2): under 2 processes rank 0 runs chunks 0 and 2, rank 1 chunk 1
SETTINGS = ["--starts", "10", "--chunk", "4", "--horizon", "4", "--iterations", "1", "--sampler-steps", "2",
            "--seed", "3"]


def generate_argv(bundle, out: str, policy: str = "bc", *extra: str) -> list[str]:
    return ["generate", "--bundle", str(bundle), "--policy", policy, "--out", out, *SETTINGS, *extra]


def dataset_arrays(dataset_id: str) -> dict[str, np.ndarray]:
    data = load_dataset(dataset_id)
    return {name: getattr(data, name) for name in ("observations", "actions", "rewards", "next_observations",
                                                   "terminations", "truncations", "episode_lengths")}


def zero_policy(obs: np.ndarray) -> np.ndarray:
    """A module:func policy for the tests (`test_generate:zero_policy`)."""
    return np.zeros((len(obs), 3), np.float32)


# ------------------------------------------------------------------------------------------- pure functions


def test_chunks_cover_the_starts_and_their_seeds_do_not_depend_on_the_split():
    plans = plan_chunks(10, 4, seed=3)
    assert [(p.index, p.first_start, p.count) for p in plans] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert len({p.seed for p in plans}) == 3 and plans[0].seed != plan_chunks(10, 4, seed=4)[0].seed
    assert plan_chunks(100, 4, seed=3)[:2] == plans[:2]  # a chunk's seed is fixed by (seed, index) alone
    for world_size in (1, 2, 3, 5):
        ranks = [chunks_of_rank(plans, rank, world_size) for rank in range(world_size)]
        assert sorted(p.index for mine in ranks for p in mine) == [0, 1, 2]
    assert [p.index for p in chunks_of_rank(plans, 0, 2)] == [0, 2]


def test_kept_valid_steps_become_episodes_that_end_in_termination_or_truncation():
    batch, horizon, obs_dim = 4, 3, 2
    states = torch.arange(batch * (horizon + 1) * obs_dim, dtype=torch.float32).reshape(batch, horizon + 1, obs_dim)
    terminated = torch.zeros(batch, horizon, dtype=torch.bool)
    terminated[0, 1] = True  # trajectory 0 ends in a predicted termination at step 1
    valid = torch.ones(batch, horizon, dtype=torch.bool)
    valid[0, 2] = False
    valid[3, :] = False  # trajectory 3: a model failure at its first step, no data
    kept = torch.tensor([True, False, True, True])  # trajectory 1 filtered out
    result = RolloutResult(states[:, :-1], torch.zeros(batch, horizon, 1), torch.ones(batch, horizon),
                           states[:, 1:], terminated, valid, torch.zeros(batch), kept,
                           torch.zeros(batch, horizon), torch.zeros(batch, dtype=torch.bool),
                           torch.zeros(batch, dtype=torch.bool))
    chunk = rollout_episodes(result)
    assert chunk.episode_lengths.tolist() == [2, 3] and len(chunk) == 5 and chunk.horizon == horizon
    np.testing.assert_array_equal(chunk.obs, result.transitions()["obs"])
    first, second = episode_buffers(chunk, first_id=7)
    assert (first.id, second.id) == (7, 8)
    np.testing.assert_array_equal(first.observations, states[0, :3].numpy())  # steps' obs + the last next obs
    np.testing.assert_array_equal(second.observations, states[2].numpy())
    assert first.terminations.tolist() == [False, True] and first.truncations.tolist() == [False, False]
    assert second.terminations.tolist() == [False] * 3 and second.truncations.tolist() == [False, False, True]
    empty = ChunkEpisodes(*(np.zeros((0, 2)),) * 4, np.zeros(0, bool), np.zeros(0, np.int64), horizon)
    assert episode_buffers(empty) == []


# ------------------------------------------------------------------------------------------ the command


def test_generate_writes_the_rollouts_of_each_chunk_with_its_seed(tiny_bundle, capsys):
    from dydiff_env.bundle import load_bundle
    from dydiff_env.rollout import behaviour_policy, dydiff_rollout

    out = "test/hopper/generated-single-v0"
    assert cli.main(generate_argv(tiny_bundle, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = dataset_arrays(out)

    bundle = load_bundle(tiny_bundle)
    sampler = dataclasses.replace(bundle.config.sampler, num_steps=2)
    expected = []
    for plan in plan_chunks(10, 4, seed=3):
        generator = torch.Generator().manual_seed(plan.seed)
        start_obs = bundle.sample_start_obs(plan.count, np.random.default_rng(plan.seed), "any")
        result = dydiff_rollout(bundle, start_obs, behaviour_policy(bundle, generator), horizon=4, num_iterations=1,
                                sampler=sampler, generator=generator)
        expected.append(result.transitions())
    for ours, theirs in (("observations", "obs"), ("actions", "actions"), ("rewards", "rewards"),
                         ("next_observations", "next_obs"), ("terminations", "terminated")):
        np.testing.assert_array_equal(data[ours], np.concatenate([e[theirs] for e in expected]), err_msg=ours)
    ends = np.cumsum(data["episode_lengths"]) - 1
    assert (data["truncations"] | data["terminations"])[ends].all()  # every episode ends one way or the other
    assert not (data["truncations"] & data["terminations"]).any()
    assert summary["transitions"] == len(data["rewards"]) and summary["episodes"] == len(data["episode_lengths"])
    assert summary["episodes"] == 3 * 2 + 2  # hardmax 0.6 keeps ceil(0.6 * 4) = 3 of each chunk of 4, 2 of 2

    import minari

    meta = minari.load_dataset(out).storage.metadata
    recorded = meta[METADATA_KEY]
    assert recorded["bundle"] == str(Path(tiny_bundle).resolve())
    assert recorded["bundle_dataset_hash"] == bundle.meta["dataset_hash"]
    assert (recorded["policy"], recorded["iterations"], recorded["horizon"], recorded["seed"]) == ("bc", 1, 4, 3)
    assert recorded["filter"] == {"mode": "hardmax", "keep_fraction": 0.6, "temperature": 0.05}
    assert recorded["package_version"] and recorded["sampler"]["num_steps"] == 2
    assert "policy bc" in meta["description"] and bundle.meta["dataset_hash"] in meta["description"]
    # nothing left behind
    assert not shard_directory(out).exists() and not dataset_lock(out).path.exists()


def test_two_processes_under_torchrun_write_the_same_dataset_as_one(tiny_bundle, tmp_path, capsys):
    single, double = "test/hopper/generated-one-process-v0", "test/hopper/generated-two-processes-v0"
    assert cli.main(generate_argv(tiny_bundle, single)) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # MINARI_DATASETS_PATH: the session's root (conftest.py)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dydiff_env.cli", *generate_argv(tiny_bundle, double)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if run.returncode != 0:
        problem = torchrun_problem(tmp_path, env)
        if problem is not None:
            pytest.skip(f"torchrun cannot start two gloo processes on this machine ({problem})")
        pytest.fail(f"torchrun generate failed with exit code {run.returncode}:\n{run.stderr[-4000:]}")
    summary = json.loads(run.stdout.strip().splitlines()[-1])  # rank 0 prints it
    assert summary["world_size"] == 2 and summary["dataset_id"] == double
    one, two = dataset_arrays(single), dataset_arrays(double)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    import minari

    assert minari.load_dataset(single).storage.metadata[METADATA_KEY] == \
        minari.load_dataset(double).storage.metadata[METADATA_KEY]
    assert not shard_directory(double).exists() and not dataset_lock(double).path.exists()


def test_snapshot_and_module_policies_act_in_the_rollouts(tiny_bundle, capsys):
    from dydiff_env.behaviour import GaussianActor

    out = "test/hopper/generated-snapshot-v0"
    assert cli.main(generate_argv(tiny_bundle, out, f"snapshot:{SHIPPED_EXPERT}", "--deterministic")) == 0
    data = dataset_arrays(out)
    actor = GaussianActor.load(SHIPPED_EXPERT)
    # every action is relabelled on the final states: the snapshot's mean action there
    expected = actor.act(data["observations"], deterministic=True)
    np.testing.assert_allclose(data["actions"], expected, rtol=0, atol=1e-6)

    out = "test/hopper/generated-module-v0"
    assert cli.main(generate_argv(tiny_bundle, out, "test_generate:zero_policy")) == 0
    assert not dataset_arrays(out)["actions"].any()
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_in_one_line_before_generating(tiny_bundle, tiny_dataset, monkeypatch, capsys):
    from dydiff_env import generate

    def write_chunks(*args, **kwargs):
        raise AssertionError("generation started before the input was checked")

    monkeypatch.setattr(generate, "write_chunks", write_chunks)
    refusals = {  # argv -> exit code, words of the message
        "unknown policy": (generate_argv(tiny_bundle, "test/hopper/x-v0", "nonsense"), 2, "unknown policy 'nonsense'"),
        "existing output": (generate_argv(tiny_bundle, TINY_DATASET_ID), 1, "--overwrite"),
        "not a dataset id": (generate_argv(tiny_bundle, "no-version"), 2, "namespace/name-v<version>"),
    }
    for name, (argv, code, words) in refusals.items():
        assert cli.main(argv) == code, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, (name, err)
    assert load_dataset(TINY_DATASET_ID).content_hash == tiny_dataset.content_hash  # untouched
    assert not dataset_lock(TINY_DATASET_ID).path.exists() and not shard_directory(TINY_DATASET_ID).exists()

    monkeypatch.undo()  # policies that fail to load are found when the bundle is there, before the first chunk
    for policy, words in (("no_such_module_here:policy", "cannot be loaded"),
                          ("snapshot:missing-actor.safetensors", "missing-actor.safetensors")):
        out = "test/hopper/never-written-v0"
        assert cli.main(generate_argv(tiny_bundle, out, policy)) in (1, 2)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, err
        assert not dataset_exists(out) and not shard_directory(out).exists()

    for starts in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", "--bundle", str(tiny_bundle), "--policy", "bc", "--out", "test/hopper/x-v0",
                      "--starts", starts])
        assert exit_info.value.code == 2 and "--starts" in capsys.readouterr().err
