"""One writer at a time, consistent commits, --overwrite and --resume checks, and housekeeping (issue 16).

The training runs here use the tiny preset (about a second per model) on the session's tiny dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dydiff_env import cli, data
from dydiff_env.bundle import MODEL_FILES, BundleError, export_bundle, load_bundle
from dydiff_env.bundle_schema import files_by_kind
from dydiff_env.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dydiff_env.training import MODEL_KINDS, MetricsLog, RunContext, train_models
from dydiff_env.writers import LockedError, StaleLockWarning, WriterLock

from conftest import TINY_DATASET_ID

REPO = Path(__file__).resolve().parents[1]


def read_config(bundle: Path) -> dict:
    return json.loads((bundle / "config.json").read_text())


def model_file(bundle: Path, kind: str) -> Path:
    return bundle / files_by_kind(read_config(bundle)["files"])[kind]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def train_cli(bundle: Path, kind: str, *options: str) -> int:
    return cli.main(["train", kind, "--dataset", TINY_DATASET_ID, "--out", str(bundle), *options])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def metric_keys(bundle: Path) -> list[tuple[str, str, str]]:
    with open(bundle / "metrics.csv", newline="") as f:
        return [(row["model"], row["step"], row["metric"]) for row in csv.DictReader(f)]


def interrupt(name: str) -> None:
    """on_checkpoint callback that simulates a kill right after the first checkpoint."""
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_with_the_holder_named(tiny_bundle_copy, tiny_dataset, tiny_config, tmp_path,
                                                          capsys):
    source = shutil.copytree(tiny_bundle_copy, tmp_path / "source")
    before = (tiny_bundle_copy / "config.json").read_bytes()
    with WriterLock(tiny_bundle_copy / ".lock", "test"):
        with pytest.raises(LockedError, match=rf"pid {os.getpid()} on .*delete the lock file"):
            train_models(["reward"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)
        assert train_cli(tiny_bundle_copy, "reward", "--preset", "tiny") == 1
        assert "is being written by another process" in one_error_line(capsys)
        with pytest.raises(LockedError):
            export_bundle(source, tiny_bundle_copy)
    assert (tiny_bundle_copy / "config.json").read_bytes() == before
    assert not (tiny_bundle_copy / ".lock").exists()
    train_models(["reward"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)  # free again
    assert not (tiny_bundle_copy / ".lock").exists()


def test_a_lock_of_another_process_is_refused_and_taken_over_once_it_died(tiny_bundle_copy, tiny_dataset,
                                                                         tiny_config):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dydiff_env.writers import WriterLock; "
         "WriterLock(sys.argv[1], 'test').acquire(); print('held', flush=True); sys.stdin.read()",
         str(tiny_bundle_copy / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"pid {holder.pid} on "):
            train_models(["bc"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock file stays behind
        holder.wait()
    assert (tiny_bundle_copy / ".lock").exists()
    with pytest.warns(StaleLockWarning, match=rf"took over the lock of pid {holder.pid}"):
        train_models(["bc"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)
    assert not (tiny_bundle_copy / ".lock").exists()


def test_collect_refuses_a_locked_or_existing_dataset_id_before_collecting(tiny_dataset, monkeypatch, capsys):
    def collect_episodes(*args, **kwargs):
        raise AssertionError("collected although the dataset id was refused")

    monkeypatch.setattr(data, "collect_episodes", collect_episodes)
    with data.dataset_lock("test/hopper/locked-v0"):
        assert cli.main(["collect", "hopper-random", "--steps", "50", "--dataset-id", "test/hopper/locked-v0",
                         "--overwrite"]) == 1
        assert "Minari dataset 'test/hopper/locked-v0' is being written by another process" in one_error_line(capsys)
    assert cli.main(["collect", "hopper-random", "--steps", "50", "--dataset-id", TINY_DATASET_ID]) == 1
    err = one_error_line(capsys)
    assert "already exists" in err and "pass --overwrite" in err


# ------------------------------------------------------------------------------------------ consistent commits


def test_a_fault_between_weights_and_config_keeps_the_previous_bundle_and_resume_completes_it(
        tiny_bundle_copy, tiny_dataset, tiny_config, monkeypatch):
    previous = sha256(model_file(tiny_bundle_copy, "reward"))
    real_replace = os.replace
    written = []

    def replace_failing_at_the_commit(src, dst):
        if Path(dst).parent == tiny_bundle_copy and Path(dst).name.startswith("reward."):  # not checkpoints/
            written.append(Path(dst).name)
        if Path(dst).name == "config.json" and written:
            raise OSError("injected fault: the disk is full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_at_the_commit)
    with pytest.raises(OSError, match="injected fault"):
        train_models(["reward"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert written and written[0] != MODEL_FILES["reward"]  # the new weights did not overwrite the old
    bundle = load_bundle(tiny_bundle_copy, require=("reward",))  # the previous bundle, unchanged
    assert sha256(model_file(tiny_bundle_copy, "reward")) == previous
    assert bundle.meta["in_training"] == ["reward"]
    assert not (tiny_bundle_copy / ".lock").exists()

    summaries = train_models(["reward"], tiny_dataset, tiny_bundle_copy, tiny_config, resume=True, progress=False)
    assert list(summaries) == ["reward"]  # continued from its final checkpoint and committed
    meta = load_bundle(tiny_bundle_copy, require=("reward",)).meta
    assert "in_training" not in meta and model_file(tiny_bundle_copy, "reward").name == written[0]
    bundle_files = sorted(p.name for p in tiny_bundle_copy.glob("*.safetensors"))
    assert bundle_files == sorted(meta["files"])  # the replaced file is gone, nothing else left behind


def test_resume_trains_again_a_model_whose_file_fails_its_sha256(tiny_bundle_copy, tiny_dataset, tiny_config, capsys):
    """What a crash of an older version left: a weight file replaced in place, config.json not yet rewritten."""
    reward = model_file(tiny_bundle_copy, "reward")
    reward.write_bytes(model_file(tiny_bundle_copy, "bc").read_bytes())
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(tiny_bundle_copy)
    summaries = train_models(["dynamics", "reward"], tiny_dataset, tiny_bundle_copy, tiny_config, resume=True,
                             progress=False)
    assert list(summaries) == ["reward"]
    out = capsys.readouterr().out
    assert "dynamics: already in" in out and "reward.safetensors does not match its sha256" in out
    load_bundle(tiny_bundle_copy, require=("reward",))


# ---------------------------------------------------------------------------------------------- architecture


def test_another_architecture_is_refused_without_overwrite(tiny_bundle_copy, tiny_dataset, tiny_config, capsys):
    before = (tiny_bundle_copy / "config.json").read_bytes()
    tiny_config.reward.hidden = (16,)
    with pytest.raises(BundleError, match=r"another architecture for reward \(hidden \(32, 32\) -> \(16,\)\); "
                                          "pass --overwrite"):
        train_models(["reward"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)
    shutil.rmtree(tiny_bundle_copy / "checkpoints")
    for options in ([], ["--resume"]):  # --resume without a checkpoint, too
        assert train_cli(tiny_bundle_copy, "diffusion", "--preset", "cpu", *options) == 1
        assert "another architecture for diffusion (horizon 16 -> 64" in one_error_line(capsys)
    assert (tiny_bundle_copy / "config.json").read_bytes() == before

    train_models(["reward"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False, overwrite=True)
    bundle = load_bundle(tiny_bundle_copy, require=("reward", "dynamics"))
    assert bundle.meta["train_config"]["reward"]["hidden"] == [16] and bundle.config.reward.hidden == (16,)
    assert bundle.config.dynamics.hidden == (32, 32)  # the other models' records are untouched
    assert model_file(tiny_bundle_copy, "reward").name.startswith("reward.")
    assert not (tiny_bundle_copy / MODEL_FILES["reward"]).exists()


def test_checkpoints_of_another_architecture_or_damaged_are_refused_in_one_line(tiny_dataset, tiny_config, tmp_path,
                                                                                capsys):
    bundle, other = tmp_path / "bundle", tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        train_models(["bc"], tiny_dataset, bundle, tiny_config, progress=False, on_checkpoint=interrupt)
    tiny_config.bc.hidden = (8,)
    with pytest.raises(KeyboardInterrupt):
        train_models(["bc"], tiny_dataset, other, tiny_config, progress=False, on_checkpoint=interrupt)
    checkpoint = RunContext(bundle, None).checkpoint_path("bc")
    shutil.copy(RunContext(other, None).checkpoint_path("bc"), checkpoint)
    assert train_cli(bundle, "bc", "--preset", "tiny", "--resume") == 1
    err = one_error_line(capsys)
    assert "was not written for the bc model being trained" in err and "delete it to train bc afresh" in err

    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert train_cli(bundle, "bc", "--preset", "tiny", "--resume") == 1
    err = one_error_line(capsys)
    assert f"checkpoint {checkpoint} is unreadable" in err and "or run without --resume" in err
    assert train_cli(bundle, "bc", "--preset", "tiny") == 0  # without --resume it starts afresh
    load_bundle(bundle, require=("bc",))
    with pytest.raises(CheckpointError, match="unreadable"):  # any damaged file, in one documented error
        load_checkpoint(Path(__file__))


# ------------------------------------------------------------------------------------------------ housekeeping


def test_stale_temporaries_and_uncommitted_files_are_removed(tiny_bundle_copy, tiny_dataset, tiny_config):
    dead, alive = dead_pid(), os.getppid()
    stale = [tiny_bundle_copy / "checkpoints" / f"diffusion.safetensors.tmp-{dead}",
             tiny_bundle_copy / f"config.json.tmp-{dead}", tiny_bundle_copy / "reward.0123abcd.safetensors"]
    kept = [tiny_bundle_copy / "checkpoints" / f"bc.safetensors.tmp-{alive}", tiny_bundle_copy / "notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"left behind")
    train_models(["bc"], tiny_dataset, tiny_bundle_copy, tiny_config, progress=False)
    assert [p.exists() for p in stale + kept] == [False] * len(stale) + [True] * len(kept)


def test_metrics_have_no_duplicates_after_interrupted_runs(tiny_dataset, tiny_config, tmp_path, monkeypatch):
    tiny_config.checkpoint_every_s = 1e9  # no checkpoint but the final one
    bundle = tmp_path / "bundle"
    real_log = MetricsLog.log

    def kill_after_logging(model: str, calls: int):
        """A MetricsLog.log that raises KeyboardInterrupt after writing `model`'s rows `calls` times."""
        logged = []

        def log(self, name, step, **metrics):
            real_log(self, name, step, **metrics)
            logged.append(name)
            if logged.count(model) == calls:
                raise KeyboardInterrupt

        return log

    # reward: killed after two epochs' rows, before any checkpoint; diffusion: after its final evaluation's rows,
    # which come after its final checkpoint (two evaluations during training, then the final one)
    for model, calls in (("reward", 2), ("diffusion", 3)):
        monkeypatch.setattr(MetricsLog, "log", kill_after_logging(model, calls))
        with pytest.raises(KeyboardInterrupt):
            train_models([model], tiny_dataset, bundle, tiny_config, progress=False)
    monkeypatch.setattr(MetricsLog, "log", real_log)
    summaries = train_models(["diffusion", "reward"], tiny_dataset, bundle, tiny_config, resume=True, progress=False)
    assert list(summaries) == ["reward", "diffusion"]
    keys = metric_keys(bundle)
    assert [key for key, count in Counter(keys).items() if count > 1] == []
    reward_epochs = {int(step) for model, step, _ in keys if model == "reward"}
    assert reward_epochs == set(range(1, summaries["reward"]["epochs"] + 1))
    assert ("diffusion", str(tiny_config.diffusion.train_steps), "teacher_forced_error_h1") in keys


def test_config_records_the_steps_and_the_time_of_every_run(tiny_dataset, tiny_config, tmp_path):
    tiny_config.checkpoint_every_s = 0.0
    bundle = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        train_models(["diffusion"], tiny_dataset, bundle, tiny_config, progress=False, on_checkpoint=interrupt)
    checkpoint = RunContext(bundle, None).checkpoint_path("diffusion")
    state = load_checkpoint(checkpoint)
    assert state["step"] == 1 and state["train_seconds"] > 0
    state["train_seconds"] = 1000.0  # as if the interrupted run had trained for a long time
    save_checkpoint(checkpoint, state)
    tiny_config.diffusion.train_steps = 8  # `--diffusion-steps 8` on resume
    summaries = train_models(["diffusion"], tiny_dataset, bundle, tiny_config, resume=True, progress=False)
    meta = read_config(bundle)
    assert meta["train_config"]["diffusion"]["train_steps"] == 8 == meta["models"]["diffusion"]["steps"]
    assert 1000 < summaries["diffusion"]["train_seconds"] == meta["models"]["diffusion"]["train_seconds"] < 1100


def test_bundle_files_get_ordinary_permissions(tiny_bundle):
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in [tiny_bundle / "config.json", *tiny_bundle.glob("*.safetensors"), tiny_bundle / "metrics.csv"]:
        assert path.stat().st_mode & 0o777 == expected, path


# ------------------------------------------------------------------------------------------------------ export


def test_export_refuses_its_source_and_commits_over_an_existing_bundle(tiny_bundle_copy, tmp_path, capsys):
    before = (tiny_bundle_copy / "config.json").read_bytes()
    assert cli.main(["export", str(tiny_bundle_copy), str(tiny_bundle_copy)]) == 1
    assert "would overwrite its source" in one_error_line(capsys)
    assert cli.main(["export", str(tiny_bundle_copy), str(tiny_bundle_copy / ".." / tiny_bundle_copy.name)]) == 1
    assert (tiny_bundle_copy / "config.json").read_bytes() == before

    dst = tmp_path / "exported"
    export_bundle(tiny_bundle_copy, dst)
    first = read_config(dst)["files"]
    assert sorted(first) == sorted([*(MODEL_FILES[kind] for kind in MODEL_KINDS), "start_states.safetensors"])
    export_bundle(tiny_bundle_copy, dst, half=False)  # over the first export: new names, one commit
    second = read_config(dst)["files"]
    assert not set(first) & set(second) and sorted(p.name for p in dst.glob("*.safetensors")) == sorted(second)
    assert load_bundle(dst).meta["weights_dtype"] == "float32"


# ------------------------------------------------------------------------------------------------ file names


def test_tagged_file_names_load_and_are_checked(tiny_bundle_copy):
    meta = read_config(tiny_bundle_copy)
    digest = meta["files"].pop(MODEL_FILES["bc"])
    tagged = f"bc.{digest[:8]}.safetensors"
    (tiny_bundle_copy / MODEL_FILES["bc"]).rename(tiny_bundle_copy / tagged)
    meta["files"][tagged] = digest
    (tiny_bundle_copy / "config.json").write_text(json.dumps(meta))
    assert load_bundle(tiny_bundle_copy, require=("bc",)).bc is not None

    for files, fragment in (({**meta["files"], "bc.0000000f.safetensors": digest}, "must start with the file name's tag"),
                            ({**meta["files"], MODEL_FILES["bc"]: digest}, "names 2 files for bc")):
        (tiny_bundle_copy / "config.json").write_text(json.dumps({**meta, "files": files}))
        with pytest.raises(BundleError, match=fragment):
            load_bundle(tiny_bundle_copy)


def test_an_unexpected_cli_failure_is_one_line_too(tiny_bundle, monkeypatch, capsys):
    def broken_info(args):
        raise RuntimeError("something nobody expected\nover two lines")

    monkeypatch.setattr(cli, "cmd_info", broken_info)
    assert cli.main(["info", str(tiny_bundle)]) == 1
    err = one_error_line(capsys)
    assert "something nobody expected over two lines" in err and "DYDIFF_ENV_TRACEBACK=1" in err
    monkeypatch.setenv("DYDIFF_ENV_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="nobody expected"):
        cli.main(["info", str(tiny_bundle)])
