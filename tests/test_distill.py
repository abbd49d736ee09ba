"""The distilled few-step student: its sampler, `dydiff-env train distill`, storage in the bundle, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dydiff_env import DydiffEnv, cli
from dydiff_env.bundle import MODEL_FILES, BundleError, export_bundle, load_bundle
from dydiff_env.checkpoint import load_checkpoint
from dydiff_env.config import DistillConfig, SamplerConfig, preset
from dydiff_env.models import TrajectoryDiffusion, edm_sample, student_sample
from dydiff_env.rollout import behaviour_policy, dydiff_rollout
from dydiff_env.training import RunContext, distill_student, train_models


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def write_config(path: Path, meta: dict) -> None:
    (Path(path) / "config.json").write_text(json.dumps(meta, indent=2))


@pytest.fixture(scope="module")
def distilled_bundle(tiny_bundle, tiny_dataset, tmp_path_factory) -> Path:
    """A copy of the tiny bundle with a student distilled for a few steps (read-only; copy to modify)."""
    out = tmp_path_factory.mktemp("distilled") / "bundle"
    shutil.copytree(tiny_bundle, out)
    summary = distill_student(out, tiny_dataset, preset("tiny"), progress=False)
    assert summary["student"]["steps"] == preset("tiny").student.train_steps
    return out


@pytest.fixture
def distilled_copy(distilled_bundle, tmp_path) -> Path:
    dst = tmp_path / "distilled-copy"
    shutil.copytree(distilled_bundle, dst)
    return dst


# ------------------------------------------------------------------------------------------------- sampler


def test_student_sampler_keeps_conditions_exact_and_is_deterministic():
    torch.manual_seed(0)
    model = TrajectoryDiffusion(3, 2, 8, channels=(8, 16)).eval()
    cond = torch.randn(4, 8, 5)
    mask = model.condition_mask()
    sigmas = [80.0, 2.0, 0.3]
    first = student_sample(model.denoise, cond, mask, sigmas, torch.Generator().manual_seed(3))
    again = student_sample(model.denoise, cond, mask, sigmas, torch.Generator().manual_seed(3))
    other = student_sample(model.denoise, cond, mask, sigmas, torch.Generator().manual_seed(4))
    assert torch.equal(first[:, mask], cond[:, mask])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.isfinite(first).all()


def test_edm_sample_records_the_teacher_trajectory():
    torch.manual_seed(0)
    model = TrajectoryDiffusion(3, 2, 8, channels=(8, 16)).eval()
    cond, mask = torch.randn(2, 8, 5), model.condition_mask()
    for kind in ("euler", "dpmpp_2m", "heun"):
        config = SamplerConfig(kind=kind, num_steps=4, s_churn=0.0)
        trajectory = []
        sample = edm_sample(model.denoise, cond, mask, config, torch.Generator().manual_seed(1), trajectory)
        assert len(trajectory) == 5 and torch.equal(trajectory[-1], sample), kind
        assert torch.equal(sample, edm_sample(model.denoise, cond, mask, config, torch.Generator().manual_seed(1)))
        assert all(torch.equal(x[:, mask], cond[:, mask]) for x in trajectory)


def test_student_grid():
    distill = DistillConfig(teacher_steps=12, max_steps=4)
    assert [distill.student_sigma_indices(k) for k in range(1, 5)] == [[0], [0, 6], [0, 4, 8], [0, 3, 6, 9]]
    assert distill.training_indices() == [0, 3, 4, 6, 8, 9]
    with pytest.raises(ValueError, match="1 to 4 steps"):
        distill.student_sigma_indices(5)
    assert SamplerConfig(kind="student", num_steps=2).calls_per_sample == 2
    with pytest.raises(ValueError, match="student"):
        edm_sample(lambda x, s: x, torch.zeros(1, 4, 2), torch.zeros(4, 2, dtype=torch.bool), SamplerConfig(kind="student"))


# ------------------------------------------------------------------------------------ distillation, bundle


def test_distilled_student_loads_and_samples(distilled_bundle, tiny_bundle):
    meta = read_config(distilled_bundle)
    name = MODEL_FILES["student"]
    assert meta["files"][name] == hashlib.sha256((distilled_bundle / name).read_bytes()).hexdigest()
    assert meta["models"]["student"]["teacher_sha256"] == meta["files"][MODEL_FILES["diffusion"]]
    assert meta["train_config"]["student"]["max_steps"] == preset("tiny").student.max_steps
    rows = [line.split(",") for line in (distilled_bundle / "metrics.csv").read_text().splitlines()[1:]]
    assert {"train_loss", "gap_k1", "gap_k2"} <= {r[3] for r in rows if r[1] == "student"}

    bundle = load_bundle(distilled_bundle)
    assert bundle.student is not None and load_bundle(tiny_bundle).student is None
    cond_mask = bundle.diffusion.condition_mask()
    cond = torch.randn(3, *cond_mask.shape)
    sample = student_sample(bundle.student.denoise, cond, cond_mask, bundle.student_sigmas(2),
                            torch.Generator().manual_seed(0))
    assert torch.equal(sample[:, cond_mask], cond[:, cond_mask])

    starts = torch.as_tensor(bundle.start_states["observations"][:6])
    runs = [dydiff_rollout(bundle, starts, behaviour_policy(bundle, torch.Generator().manual_seed(0)),
                           sampler=SamplerConfig(kind="student", num_steps=k),
                           generator=torch.Generator().manual_seed(0)) for k in (1, 2, 2)]
    assert all(torch.isfinite(r.obs).all() for r in runs)
    assert torch.equal(runs[1].obs, runs[2].obs)  # deterministic under a seeded generator


def test_student_steps_beyond_max_steps_are_refused(distilled_bundle, tiny_bundle):
    bundle = load_bundle(distilled_bundle)
    starts = torch.as_tensor(bundle.start_states["observations"][:2])
    policy = behaviour_policy(bundle)
    with pytest.raises(BundleError, match="1 to 2 steps"):
        dydiff_rollout(bundle, starts, policy, sampler=SamplerConfig(kind="student", num_steps=3))
    with pytest.raises(BundleError, match="train distill --bundle"):
        dydiff_rollout(load_bundle(tiny_bundle), starts, policy, sampler=SamplerConfig(kind="student", num_steps=1))


def test_corrupt_student_file_is_refused(distilled_copy):
    path = distilled_copy / MODEL_FILES["student"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(distilled_copy)


def test_student_of_another_teacher_is_refused(distilled_copy):
    meta = read_config(distilled_copy)
    meta["models"]["student"]["teacher_sha256"] = "0" * 64
    write_config(distilled_copy, meta)
    with pytest.raises(BundleError, match="another diffusion model.*train distill"):
        load_bundle(distilled_copy)
    assert load_bundle(distilled_copy, without=("student",)).student is None


def test_retraining_the_teacher_drops_its_student(distilled_copy, tiny_dataset):
    cfg = preset("tiny")
    cfg.diffusion.train_steps = 2
    train_models(["diffusion"], tiny_dataset, distilled_copy, cfg, progress=False)
    meta = read_config(distilled_copy)
    assert "student" not in meta["models"] and not (distilled_copy / MODEL_FILES["student"]).exists()
    assert load_bundle(distilled_copy).student is None


def test_export_keeps_the_student_and_its_teacher(distilled_bundle, tmp_path):
    dst = export_bundle(distilled_bundle, tmp_path / "exported")
    bundle = load_bundle(dst)
    assert bundle.student is not None and bundle.meta["weights_dtype"] == "float16"


def test_export_makes_the_student_the_default_sampler(distilled_bundle, tiny_bundle, tmp_path):
    assert cli.main(["export", str(distilled_bundle), str(tmp_path / "fast"), "--sampler", "student:2"]) == 0
    bundle = load_bundle(tmp_path / "fast")
    assert (bundle.config.sampler.kind, bundle.config.sampler.num_steps) == ("student", 2)
    env = DydiffEnv(bundle=bundle, plans="always", pool_size=2)  # the env takes the bundle's default
    assert env.sampler.kind == "student"
    env.close()
    with pytest.raises(BundleError, match="has no student"):  # refused before anything is written
        export_bundle(tiny_bundle, tmp_path / "none", sampler={"kind": "student", "num_steps": 2})
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit, match="kind:steps"):
        cli.main(["export", str(distilled_bundle), str(tmp_path / "bad"), "--sampler", "student"])


def test_env_steps_with_the_student(distilled_bundle):
    env = DydiffEnv(bundle=str(distilled_bundle), plans="always", sampler={"kind": "student", "num_steps": 2},
                    pool_size=2)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert np.isfinite(obs).all() and np.isfinite(reward)
        if terminated or truncated:
            env.reset()
    env.close()


def test_env_refuses_the_student_sampler_without_a_student(tiny_bundle):
    with pytest.raises(BundleError, match="train distill --bundle"):
        DydiffEnv(bundle=str(tiny_bundle), sampler={"kind": "student", "num_steps": 1})


def test_distill_refuses_a_bundle_without_diffusion(tiny_bundle_copy, tiny_dataset):
    meta = read_config(tiny_bundle_copy)
    del meta["models"]["diffusion"]
    write_config(tiny_bundle_copy, meta)
    with pytest.raises(BundleError, match="no intact diffusion model"):
        distill_student(tiny_bundle_copy, tiny_dataset, preset("tiny"), progress=False)


# ---------------------------------------------------------------------------------------------------- resume


class Interrupt:
    """on_checkpoint callback that simulates a kill (KeyboardInterrupt) right after the first checkpoint."""

    def __call__(self, name):
        raise KeyboardInterrupt


def test_distillation_resumes_after_an_interruption(tiny_bundle, tiny_dataset, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    shutil.copytree(tiny_bundle, reference)
    shutil.copytree(tiny_bundle, resumed)
    cfg = preset("tiny")
    distill_student(reference, tiny_dataset, cfg, progress=False)

    with pytest.raises(KeyboardInterrupt):
        distill_student(resumed, tiny_dataset, cfg, progress=False, on_checkpoint=Interrupt())
    assert load_checkpoint(RunContext(resumed, torch.device("cpu")).checkpoint_path("student"))["step"] == 1
    assert read_config(resumed)["in_training"] == ["student"]
    assert load_bundle(resumed).student is None  # the interrupted bundle loads, without a student

    summary = distill_student(resumed, tiny_dataset, cfg, resume=True, progress=False)
    assert summary["student"]["steps"] == cfg.student.train_steps
    ref_w, res_w = (load_file(str(d / MODEL_FILES["student"])) for d in (reference, resumed))
    assert ref_w.keys() == res_w.keys() and all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert distill_student(resumed, tiny_dataset, cfg, resume=True, progress=False) == {}  # nothing left to do


def test_cli_train_distill(tiny_bundle_copy, capsys):
    # the dataset is the bundle's own (no --dataset)
    assert cli.main(["train", "distill", "--bundle", str(tiny_bundle_copy), "--preset", "tiny", "--distill-steps", "2",
                     "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed[printed.index("\n{") + 1:])
    assert out["student"]["steps"] == 2
    assert cli.main(["info", str(tiny_bundle_copy)]) == 0
    assert "student" in json.loads(capsys.readouterr().out)["models"]


def test_sampler_benchmark_grid_takes_student_entries(distilled_bundle, tiny_bundle):
    from benchmarks.samplers import parse_grid, usable_samplers

    grid = parse_grid("euler:3,student:2@bfloat16", SamplerConfig())
    assert [(s.kind, p) for s, p in usable_samplers(grid, load_bundle(distilled_bundle))] == [
        ("euler", "float32"), ("student", "bfloat16")]
    said = []
    assert [s.kind for s, _ in usable_samplers(grid, load_bundle(tiny_bundle), said.append)] == ["euler"]
    assert "no distilled student" in said[0]
