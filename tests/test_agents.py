"""Unit tests of the offline-RL agents package (CPU, seconds each)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from agents import (TD3BC, DiffusionQL, DiffusionQLConfig, EvalResult, OfflineTrainer, ReplayBuffer, TD3BCConfig,
                    TrainerConfig, evaluate, flatten_state, load_checkpoint, sample_mixed, save_checkpoint,
                    unflatten_state)
from agents.diffusion_ql import (NoisePredictor, ddpm_sample, diffusion_bc_loss, ema_update, make_schedule,
                                 q_loss_term, select_by_q, vp_beta_schedule)
from agents.trainer import MetricsLog
from agents.td3bc import actor_loss, critic_loss, target_policy_smoothing, td_target
from dydiff_env.data import OfflineData
from dydiff_env.tasks import get_task

torch.set_num_threads(1)

OBS, ACT = 11, 3  # Hopper's sizes, so the tiny agents can also act in the real Hopper-v5
SMALL_TD3BC = TD3BCConfig(hidden_dims=(64, 64))
SMALL_DQL = DiffusionQLConfig(hidden_dims=(32, 32, 32), eval_candidates=4)


def random_data(n: int = 400, episode_len: int = 50, seed: int = 0) -> OfflineData:
    """Random transitions with a learnable reward r = 0.5 s_0 - 0.5 a_0 (zero mean, so Q stays small)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, OBS)).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(n, ACT)).astype(np.float32)
    rewards = (0.5 * obs[:, 0] - 0.5 * actions[:, 0]).astype(np.float32)
    starts = np.arange(0, n, episode_len)
    lengths = np.minimum(episode_len, n - starts)
    terminations = np.zeros(n, bool)
    terminations[starts[::2] + lengths[::2] - 1] = True  # every other episode terminates, the rest are truncated
    truncations = np.zeros(n, bool)
    truncations[starts[1::2] + lengths[1::2] - 1] = True
    return OfflineData(obs, actions, rewards, rng.normal(size=(n, OBS)).astype(np.float32), terminations,
                       truncations, starts, lengths, dataset_id="test/random-v0", env_id="Hopper-v5")


def random_batch(b: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(b, OBS, generator=g), "actions": torch.rand(b, ACT, generator=g) * 2 - 1,
            "rewards": torch.randn(b, generator=g), "next_obs": torch.randn(b, OBS, generator=g),
            "terminated": (torch.rand(b, generator=g) < 0.1).float()}


def fake_rollout(policy_fn, num_starts, generator):
    """Stands in for DydiffEnv: random start states, the policy's actions, random outcomes."""
    obs = generator.normal(size=(num_starts, OBS)).astype(np.float32)
    return {"obs": obs, "actions": policy_fn(obs), "rewards": generator.normal(size=num_starts).astype(np.float32),
            "next_obs": generator.normal(size=(num_starts, OBS)).astype(np.float32),
            "terminated": np.zeros(num_starts, np.float32)}


# ---------------------------------------------------------------------------------------------------------------
# TD3+BC


def test_td3bc_bc_term_is_mse_to_dataset_actions():
    pi, a = torch.rand(8, ACT) * 2 - 1, torch.rand(8, ACT) * 2 - 1
    _, bc, _ = actor_loss(pi, a, torch.randn(8), alpha=2.5)
    assert torch.allclose(bc, ((pi - a) ** 2).mean())


def test_td3bc_lambda_normalises_q_term():
    pi, a, q = torch.zeros(16, ACT), torch.zeros(16, ACT), torch.randn(16) * 7 + 3
    loss, bc, lmbda = actor_loss(pi, a, q, alpha=2.5)
    assert torch.allclose(lmbda, 2.5 / q.abs().mean())
    assert torch.allclose(loss - bc, -2.5 * q.mean() / q.abs().mean())
    # the Q term does not change when Q is rescaled, and lambda carries no gradient
    loss_scaled, _, _ = actor_loss(pi, a, 1000.0 * q, alpha=2.5)
    assert torch.allclose(loss, loss_scaled)
    q_leaf = q.clone().requires_grad_(True)
    actor_loss(pi, a, q_leaf, alpha=2.5)[0].backward()
    assert torch.allclose(q_leaf.grad, torch.full_like(q, -2.5 / q.abs().mean() / len(q)))


def test_target_smoothing_noise_is_clipped():
    g = torch.Generator().manual_seed(0)
    out = target_policy_smoothing(torch.zeros(10_000, ACT), noise_std=10.0, noise_clip=0.5, max_action=1.0, generator=g)
    assert out.abs().max() <= 0.5 + 1e-7 and (out.abs() == 0.5).float().mean() > 0.9
    out = target_policy_smoothing(torch.full((1000, ACT), 0.9), 0.2, 0.5, 1.0, generator=g)
    assert out.max() <= 1.0 and out.min() >= 0.4 - 1e-6


def test_td_target_bootstraps_unless_terminated():
    r, term = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    target = td_target(r, term, torch.tensor([10.0, 10.0]), torch.tensor([5.0, 20.0]), discount=0.9)
    assert torch.allclose(target, torch.tensor([1.0 + 0.9 * 5.0, 1.0]))
    assert torch.allclose(critic_loss(torch.ones(2), torch.zeros(2), torch.ones(2)), torch.tensor(1.0))


def test_td3bc_policy_delay_and_state_roundtrip(tmp_path):
    torch.manual_seed(0)
    agent = TD3BC.from_data(random_data(), SMALL_TD3BC)
    assert "actor_loss" not in agent.update(random_batch(seed=1))
    metrics = agent.update(random_batch(seed=2))
    assert {"actor_loss", "bc_loss", "lambda", "critic_loss"} <= set(metrics) and agent.step == 2
    save_checkpoint(tmp_path / "agent.safetensors", agent.state_dict())
    clone = TD3BC(OBS, ACT, config=SMALL_TD3BC)
    clone.load_state_dict(load_checkpoint(tmp_path / "agent.safetensors"))
    obs = np.random.default_rng(0).normal(size=(5, OBS)).astype(np.float32)
    assert clone.step == 2 and np.array_equal(clone.act(obs), agent.act(obs))
    assert clone.actor_optimizer.state_dict()["state"][0]["exp_avg"].equal(agent.actor_optimizer.state_dict()["state"][0]["exp_avg"])
    # the same update afterwards gives the same parameters (optimizer moments restored)
    torch.manual_seed(3)
    agent.update(random_batch(seed=3))
    torch.manual_seed(3)
    clone.update(random_batch(seed=3))
    assert all(torch.equal(p, q) for p, q in zip(agent.critic.parameters(), clone.critic.parameters()))
    # actor_fn keeps the input's type
    policy = agent.actor_fn()
    assert isinstance(policy(torch.as_tensor(obs)), torch.Tensor) and isinstance(policy(obs), np.ndarray)


def test_agents_reject_bad_input():
    agent = TD3BC(OBS, ACT, config=SMALL_TD3BC)
    with pytest.raises(ValueError, match=r"\(B, 11\)"):
        agent.act(np.zeros((2, 5), np.float32))
    bad = random_batch()
    bad["actions"] = bad["actions"][:, :2]
    with pytest.raises(ValueError, match="actions"):
        agent.update(bad)
    with pytest.raises(KeyError, match="terminated"):
        agent.update({k: v for k, v in random_batch().items() if k != "terminated"})
    with pytest.raises(ValueError, match="algorithm"):
        agent.load_state_dict(DiffusionQL(OBS, ACT, config=SMALL_DQL).state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Diffusion-QL


def test_vp_schedule_matches_paper_formula():
    betas = vp_beta_schedule(5, 0.1, 10.0)
    t = np.arange(1, 6)
    expected = 1 - np.exp(-0.1 / 5 - 0.5 * 9.9 * (2 * t - 1) / 25)
    assert np.allclose(betas.numpy(), expected, atol=1e-7)
    schedule = make_schedule(betas)
    # the discretisation integrates beta(t) exactly: abar_T = exp(-(b_min + (b_max - b_min) / 2))
    assert math.isclose(schedule.sqrt_alphas_cumprod[-1].item() ** 2, math.exp(-5.05), rel_tol=1e-5)
    assert torch.all(schedule.sqrt_alphas_cumprod[1:] < schedule.sqrt_alphas_cumprod[:-1])
    assert torch.allclose(schedule.sqrt_alphas_cumprod ** 2 + schedule.sqrt_one_minus_alphas_cumprod ** 2,
                          torch.ones(5))


def test_ddpm_sampler_shapes_bounds_and_gradient():
    torch.manual_seed(0)
    model = NoisePredictor(OBS, ACT, hidden=(16, 16, 16))
    schedule = make_schedule(vp_beta_schedule(5))
    obs = torch.randn(7, OBS)
    actions = ddpm_sample(model, obs, schedule, ACT, max_action=0.5, generator=torch.Generator().manual_seed(1))
    assert actions.shape == (7, ACT) and actions.abs().max() <= 0.5
    again = ddpm_sample(model, obs, schedule, ACT, max_action=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(actions, again)  # reproducible from a generator
    actions.sum().backward()  # the Q term trains the actor through the whole chain
    assert all(p.grad is not None for p in model.net.parameters())
    loss = diffusion_bc_loss(model, torch.rand(7, ACT) * 2 - 1, obs, schedule)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_q_term_and_candidate_selection():
    q1, q2 = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, -3.0])
    assert torch.allclose(q_loss_term(q1, q2, use_q1=True), torch.tensor(-3.0 / 2.0))
    assert torch.allclose(q_loss_term(q1, q2, use_q1=False), torch.tensor(2.0 / 3.0))
    candidates = torch.arange(2 * 4 * ACT, dtype=torch.float32).view(2, 4, ACT)
    q = torch.tensor([[0.0, 5.0, 1.0, 2.0], [9.0, 0.0, 1.0, 2.0]])
    assert torch.equal(select_by_q(candidates, q), candidates[[0, 1], [1, 0]])
    assert torch.equal(select_by_q(candidates, 1000 * q, "softmax"), candidates[[0, 1], [1, 0]])


def test_ema_update():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, decay=0.995)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.995 * b + 0.005 * p)
    # in the agent the EMA actor stays frozen before step_start_ema and follows the actor after it
    torch.manual_seed(0)
    agent = DiffusionQL(OBS, ACT, config=DiffusionQLConfig(hidden_dims=(16, 16, 16), step_start_ema=2,
                                                           update_ema_every=1))
    initial = [p.clone() for p in agent.actor_ema.parameters()]
    agent.update(random_batch())
    agent.update(random_batch(seed=1))
    assert all(torch.equal(a, b) for a, b in zip(agent.actor_ema.parameters(), initial))
    agent.update(random_batch(seed=2))
    assert not all(torch.equal(a, b) for a, b in zip(agent.actor_ema.parameters(), initial))


def test_diffusion_ql_update_act_and_state(tmp_path):
    torch.manual_seed(0)
    agent = DiffusionQL.from_data(random_data(), SMALL_DQL)
    for i in range(3):
        metrics = agent.update(random_batch(seed=i))
    assert {"critic_loss", "bc_loss", "q_loss", "actor_loss"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    obs = np.random.default_rng(0).normal(size=(6, OBS)).astype(np.float32)
    actions = agent.act(obs)
    assert actions.shape == (6, ACT) and actions.dtype == np.float32 and np.abs(actions).max() <= 1.0
    rollout_actions = agent.actor_fn()(torch.as_tensor(obs))
    assert isinstance(rollout_actions, torch.Tensor) and rollout_actions.shape == (6, ACT)
    save_checkpoint(tmp_path / "dql.safetensors", agent.state_dict())
    clone = DiffusionQL(OBS, ACT, config=SMALL_DQL)
    clone.load_state_dict(load_checkpoint(tmp_path / "dql.safetensors"))
    torch.manual_seed(5)
    a = agent.act(obs)
    torch.manual_seed(5)
    assert clone.step == 3 and np.array_equal(a, clone.act(obs))


# ---------------------------------------------------------------------------------------------------------------
# Buffers


def test_replay_buffer_fifo_and_from_offline():
    data = random_data(n=100)
    real = ReplayBuffer.from_offline(data)
    assert len(real) == 100
    rows = real.arrays()
    assert np.array_equal(rows["terminated"], data.terminations.astype(np.float32))  # truncations do not count
    batch = real.sample(8, np.random.default_rng(0))
    assert batch["obs"].shape == (8, OBS) and batch["rewards"].shape == (8,) and batch["obs"].dtype == torch.float32

    fifo = ReplayBuffer(OBS, ACT, capacity=5)
    for start in (0, 3, 6):  # rows are numbered by obs[:, 0]
        ids = np.arange(start, start + 3, dtype=np.float32)
        fifo.add({"obs": np.repeat(ids[:, None], OBS, 1), "actions": np.zeros((3, ACT)), "rewards": ids,
                  "next_obs": np.zeros((3, OBS)), "terminated": np.zeros((3, 1))})
    assert len(fifo) == 5 and fifo.total_added == 9
    assert np.array_equal(fifo.arrays()["rewards"], [4, 5, 6, 7, 8])  # the oldest four were overwritten
    with pytest.raises(ValueError, match="next_obs"):
        fifo.add({"obs": np.zeros((2, OBS)), "actions": np.zeros((2, ACT)), "rewards": np.zeros(2),
                  "next_obs": np.zeros((2, OBS + 1)), "terminated": np.zeros(2)})


def _marked_buffer(marker: float, n: int = 50) -> ReplayBuffer:
    buffer = ReplayBuffer(OBS, ACT, capacity=n)
    buffer.add({"obs": np.full((n, OBS), marker), "actions": np.zeros((n, ACT)), "rewards": np.zeros(n),
                "next_obs": np.zeros((n, OBS)), "terminated": np.zeros(n)})
    return buffer


@pytest.mark.parametrize("batch_size,real_fraction", [(256, 0.6), (255, 0.6), (10, 0.05), (7, 1.0), (9, 0.0)])
def test_sample_mixed_exact_ratio(batch_size, real_fraction):
    real, model = _marked_buffer(0.0), _marked_buffer(1.0)
    batch = sample_mixed(real, model, batch_size, real_fraction, np.random.default_rng(0))
    assert batch["obs"].shape == (batch_size, OBS)
    assert int((batch["obs"][:, 0] == 0).sum()) == round(real_fraction * batch_size)


def test_sample_mixed_all_real_without_model_rows():
    real, empty = _marked_buffer(0.0), ReplayBuffer(OBS, ACT, capacity=10)
    for model in (None, empty):
        batch = sample_mixed(real, model, 64, 0.6, np.random.default_rng(0))
        assert batch["obs"].shape == (64, OBS) and torch.all(batch["obs"] == 0)
    with pytest.raises(ValueError):
        sample_mixed(real, empty, 64, 1.5, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def test_normalized_score_arithmetic():
    task = get_task("hopper")
    result = EvalResult.from_returns("Hopper-v5", [task.ref_min_score, task.ref_max_score], [10, 1000])
    assert np.allclose(result.normalized_returns, [0.0, 100.0])
    assert math.isclose(result.normalized_mean, 50.0) and math.isclose(result.normalized_std, 50.0)
    assert math.isclose(result.mean, (-20.272305 + 3234.3) / 2)
    assert math.isclose(float(task.normalized_score(1607.013848)), 50.0, rel_tol=1e-6)
    assert "on Hopper-v5" in result.label


def test_evaluate_in_real_hopper():
    zero_policy = lambda obs: np.zeros((len(obs), ACT), np.float32)  # noqa: E731
    result = evaluate(zero_policy, "Hopper-v5", episodes=2, seed=0, max_episode_steps=20)
    assert result.returns.shape == (2,) and np.all(result.lengths <= 20) and np.isfinite(result.normalized_mean)
    again = evaluate(zero_policy, "Hopper-v5", episodes=2, seed=0, max_episode_steps=20)
    assert np.array_equal(result.returns, again.returns)  # deterministic seeding
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda obs: np.zeros((len(obs), 2)), "Hopper-v5", episodes=1, max_episode_steps=5)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_flatten_unflatten_roundtrip(tmp_path):
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {
        "model": net.state_dict(), "optimizer": optimizer.state_dict(),
        "nested": {"list": [1, 2.5, None, True, "text", torch.arange(3)], "tuple": (1, (2, 3)),
                   "nan": float("nan"), "inf": float("-inf"), 7: "int key", "ints": torch.tensor([1, 2], dtype=torch.int64)},
        "numpy": np.arange(6, dtype=np.float64).reshape(2, 3), "np_scalar": np.float32(1.5),
        "bool": torch.tensor([True, False]), "bf16": torch.ones(2, dtype=torch.bfloat16), "empty": torch.zeros(0, 4),
        "scalar_tensor": torch.tensor(3.0), "big_int": 2 ** 100, "same": [net.weight, net.weight],
    }
    tensors, meta = flatten_state(state)
    json.dumps(meta, allow_nan=False)  # meta is strict JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())

    def check(restored):
        assert restored["nested"]["tuple"] == (1, (2, 3)) and restored["nested"][7] == "int key"
        assert math.isnan(restored["nested"]["nan"]) and restored["nested"]["inf"] == float("-inf")
        assert restored["nested"]["list"][:5] == [1, 2.5, None, True, "text"]
        assert torch.equal(restored["nested"]["list"][5], torch.arange(3))
        assert isinstance(restored["numpy"], np.ndarray) and np.array_equal(restored["numpy"], state["numpy"])
        assert restored["np_scalar"] == 1.5 and restored["big_int"] == 2 ** 100
        for key in ("bool", "bf16", "empty", "scalar_tensor"):
            assert restored[key].dtype == state[key].dtype and torch.equal(restored[key], state[key])
        assert torch.equal(restored["same"][0], net.weight.detach())
        fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
        fresh.load_state_dict(restored["optimizer"])
        assert set(restored["optimizer"]["state"]) == {0, 1}  # int keys survive
        assert restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
        assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    check(unflatten_state(tensors, meta))
    path = tmp_path / "sub" / "state.safetensors"
    save_checkpoint(path, state)
    save_checkpoint(path, state)  # overwriting is atomic and leaves no temporary files behind
    assert os.listdir(path.parent) == ["state.safetensors"]
    check(load_checkpoint(path))
    with pytest.raises(TypeError, match="unsupported type"):
        flatten_state({"x": object()})


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def _trainer_config(tmp_path, name: str, **overrides) -> TrainerConfig:
    base = dict(total_steps=40, batch_size=32, real_fraction=0.6, model_buffer_capacity=500, rollout_every=10,
                rollout_starts=16, eval_every=0, eval_episodes=0, seed=0, out_dir=str(tmp_path / name),
                checkpoint_every=0, log_every=10, save_model_buffer=True, progress=False, tensorboard=False)
    base.update(overrides)
    return TrainerConfig(**base)


def test_trainer_resume_continues_exactly(tmp_path):
    data = random_data()

    def make_agent():
        torch.manual_seed(0)
        return TD3BC.from_data(data, SMALL_TD3BC)

    straight = OfflineTrainer(make_agent(), data, _trainer_config(tmp_path, "straight"), fake_rollout)
    straight.train()

    first = OfflineTrainer(make_agent(), data, _trainer_config(tmp_path, "split", total_steps=25), fake_rollout)
    first.train()
    with pytest.raises(FileExistsError):
        OfflineTrainer(make_agent(), data, _trainer_config(tmp_path, "split"), fake_rollout).train()
    resumed = OfflineTrainer(make_agent(), data, _trainer_config(tmp_path, "split"), fake_rollout)
    resumed.train(resume=True)

    assert resumed.step == straight.step == 40 and resumed.agent.step == 40
    for a, b in zip(straight.agent.state_dict()["critic"].values(), resumed.agent.state_dict()["critic"].values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.agent.actor.parameters(), resumed.agent.actor.parameters()):
        assert torch.equal(a, b)
    assert resumed.model_buffer.total_added == straight.model_buffer.total_added == 4 * 16
    steps = [row["step"] for row in resumed.metrics.rows]
    assert steps == [10, 20, 25, 30, 40]  # the first run's final row at step 25 is kept, nothing duplicated


def test_trainer_resume_refills_unsaved_model_buffer(tmp_path):
    data = random_data()
    config = _trainer_config(tmp_path, "refill", total_steps=15, save_model_buffer=False)
    OfflineTrainer(TD3BC.from_data(data, SMALL_TD3BC), data, config, fake_rollout).train()
    config = _trainer_config(tmp_path, "refill", total_steps=18, save_model_buffer=False)
    trainer = OfflineTrainer(TD3BC.from_data(data, SMALL_TD3BC), data, config, fake_rollout)
    trainer.train(resume=True)
    assert trainer.step == 18 and len(trainer.model_buffer) == 16  # one rollout round refilled it
    config = _trainer_config(tmp_path, "refill", total_steps=20, save_model_buffer=False)
    trainer = OfflineTrainer(TD3BC.from_data(data, SMALL_TD3BC), data, config, fake_rollout)
    trainer.train(resume=True)  # a second resumption reads the metrics file the first one rewrote
    assert [row["step"] for row in trainer.metrics.rows] == [10, 15, 18, 20]


def test_tiny_trainer_run_learns_and_writes_outputs(tmp_path):
    torch.manual_seed(0)
    data = random_data(n=600)
    agent = TD3BC.from_data(data, SMALL_TD3BC)
    config = _trainer_config(tmp_path, "run", total_steps=300, batch_size=64, log_every=50, eval_every=150,
                             eval_episodes=1, eval_max_episode_steps=10, checkpoint_every=100,
                             save_model_buffer=False, tensorboard=True)
    summary = OfflineTrainer(agent, data, config, rollout_fn=None).train()  # real data only: the no-dydiff baseline
    out = tmp_path / "run"
    for name in ("metrics.csv", "checkpoint.safetensors", "learning_curve.png", "summary.json"):
        assert (out / name).exists(), name
    log = MetricsLog(str(out / "metrics.csv"))
    log.load(max_step=10 ** 9)
    losses = [r["critic_loss"] for r in log.rows]
    assert losses[-1] < 0.5 * losses[0], losses
    assert [e["step"] for e in summary["evaluations"]] == [150, 300]
    assert math.isfinite(summary["last_eval"]["normalized_mean"]) and summary["score_label"].endswith("on Hopper-v5")
    written = json.loads((out / "summary.json").read_text())
    assert written["best_eval"]["normalized_mean"] == max(e["normalized_mean"] for e in summary["evaluations"])
    assert not written["uses_model_rollouts"] and written["model_rows_added"] == 0


def test_trainer_mixes_model_rows_and_drops_non_finite(tmp_path):
    data = random_data()

    def rollout_with_nan(policy_fn, num_starts, generator):
        out = fake_rollout(policy_fn, num_starts, generator)
        out["next_obs"][0, 0] = np.nan
        return out

    agent = DiffusionQL.from_data(data, SMALL_DQL)
    trainer = OfflineTrainer(agent, data, _trainer_config(tmp_path, "dql", total_steps=3, rollout_every=2,
                                                          save_model_buffer=False), rollout_with_nan)
    summary = trainer.train()
    assert summary["model_rows_added"] == 2 * 15 and summary["model_rows_dropped"] == 2


@pytest.mark.filterwarnings("ignore:`eval_env` is set to None")
def test_real_minari_dataset_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    from dydiff_env.data import collect_episodes, load_dataset, write_minari_dataset

    rng = np.random.default_rng(0)
    policy = lambda obs: rng.uniform(-1, 1, size=(len(obs), ACT)).astype(np.float32)  # noqa: E731
    buffers = collect_episodes("Hopper-v5", policy, num_steps=150, seed=0, progress=False)
    write_minari_dataset("test/hopper/random-v0", "Hopper-v5", buffers, overwrite=True)
    data = load_dataset("test/hopper/random-v0")
    real = ReplayBuffer.from_offline(data)
    assert len(real) == len(data) >= 150 and real.arrays()["terminated"].sum() == data.terminations.sum()
    agent = TD3BC.from_data(data, SMALL_TD3BC)
    for _ in range(2):
        metrics = agent.update(real.sample(32, rng))
    assert math.isfinite(metrics["critic_loss"])
