"""Runner: serial, 2 local processes and 2 torchrun ranks agree; SIGKILL, SIGINT, SIGTERM or an interrupt at any
store write, then a restart, recompute only the unfinished shards and give identical scores."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastif.files
from fastif.cli import Interrupted
from fastif.errors import ConfigError, DataError, ModelError, SolverError, StoreError
from fastif.hvp import Hessian
from fastif.runner import Runner, RunnerConfig
from fastif.solvers import LiSSA
from fastif.solvers.kfac import EKFACConfig

# A tiny problem every process builds identically; written to a file so torchrun ranks and subprocesses import it.
PROBLEM_SOURCE = '''
import time

import torch
from torch import nn

from fastif import AdapterConfig, CGConfig, LiSSAConfig, ScoreConfig, TensorData, TorchAdapter
from fastif.config import config_to_dict
from fastif.grads import dataset_grads
from fastif.runner import Problem, Runner
from fastif.store import Store, fingerprint_parameters, fingerprint_tensors

LISSA = LiSSAConfig(damping=1.0, depth=60, repeats=5, batch_size=5, seed=3)
CG = CGConfig(damping=0.5, tolerance=1e-10)
SCORE = ScoreConfig(batch_size=12)
SHARD = 8  # so scoring batches have 8 examples, LiSSA's 5 and the Hessian's 32 or 26


class SlowData(TensorData):
    """Sleeps in every full scoring batch, so a run lasts long enough to be killed between shards."""

    def batch(self, indices):
        if len(indices) == SHARD:
            time.sleep(0.25)
        return super().batch(indices)


def make(slow=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(90, 6, dtype=torch.float64), torch.randint(0, 3, (90,))
    adapter = TorchAdapter(model, nn.CrossEntropyLoss(reduction="none"), AdapterConfig(l2=1e-2))
    return Problem(adapter, (SlowData if slow else TensorData)((x, y)), hessian_batch_size=32)


def build(device):
    return make()


def build_slow(device):
    return make(slow=True)


def query_gradients(problem):
    generator = torch.Generator().manual_seed(1)
    test = TensorData((torch.randn(3, 6, dtype=torch.float64, generator=generator), torch.tensor([0, 1, 2])))
    return dataset_grads(problem.adapter, problem.adapter.flat_params(), test)


def open_store(folder, problem):
    return Store.open(
        folder,
        model_fingerprint=fingerprint_parameters({"flat": problem.adapter.flat_params()}),
        data_fingerprint=fingerprint_tensors(problem.train.tensors),
        config={"lissa": config_to_dict(LISSA), "score": config_to_dict(SCORE), "shard_size": SHARD},
    )


def run_all(config, folder=None, slow=False):
    """s_test (LiSSA and CG) and scores of every training point; tensors on the main rank, None elsewhere."""
    with Runner(build_slow if slow else build, config) as runner:
        main, problem = runner.is_main, runner.problem
        store = open_store(folder, problem) if main and folder is not None else None
        vectors = query_gradients(problem) if main else None
        lissa = runner.solve(LISSA, vectors, store)
        scores = runner.scores(lissa.x, None, store, score=SCORE)
        cg = runner.solve(CG, vectors)
        cg_scores = runner.scores(cg.x, list(range(5, 90, 2)), score=SCORE)
        if store is not None:
            store.close()
        result = {"lissa": lissa.x, "scores": scores, "cg": cg.x, "cg_scores": cg_scores}
        return (result, runner.last_run) if main else (None, None)
'''

SCRIPT = """
import sys
import safetensors.torch
from runner_problem import run_all
from fastif.cli import run_command, stop_on_sigterm
from fastif.runner import RunnerConfig


def main():
    backend, workers, output, *store = sys.argv[1:]  # with a store folder, scoring is slowed down (to be stopped)
    config = RunnerConfig(backend=backend, workers=int(workers) or None, threads=1, shard_size=8)
    result, _ = run_all(config, store[0] if store else None, slow=bool(store))
    if result is not None:
        safetensors.torch.save_file(result, output)
    return 0


stop_on_sigterm()  # as the fastif command does
sys.exit(run_command(main))
"""

SERIAL = RunnerConfig(threads=1, shard_size=8)
LOCAL = RunnerConfig(backend="processes", workers=2, threads=1, shard_size=8)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the runner's ranks use: on a busy 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("runner")
    (folder / "runner_problem.py").write_text(PROBLEM_SOURCE)
    (folder / "script.py").write_text(SCRIPT)
    return folder


@pytest.fixture(scope="module")
def problem(workdir: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("runner_problem", workdir / "runner_problem.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def serial(problem: ModuleType) -> dict[str, torch.Tensor]:
    return problem.run_all(SERIAL)[0]


@pytest.fixture(scope="module")
def local_run(problem: ModuleType, workdir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return problem.run_all(LOCAL, workdir / "reference-store")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_equal_up_to_summation_order(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-9 * scale, msg=key)


def test_serial_runner_matches_the_lissa_solver(problem, serial):
    base = problem.make()
    solver = LiSSA(problem.LISSA).fit(Hessian(base.adapter, base.train, None, 32))
    direct = solver.solve(problem.query_gradients(base)).x
    torch.testing.assert_close(serial["lissa"], direct, rtol=1e-10, atol=0)


def test_preconditioned_lissa_runs_on_the_main_rank_with_the_solver_s_answer(problem):
    """Fixed-mode LiSSA with an EK-FAC preconditioner is not spread over the workers (each would refit the
    factors): two local processes give exactly the solver's own answer."""
    config = replace(problem.LISSA, preconditioner=EKFACConfig(damping=1.0))
    base = problem.make()
    direct = LiSSA(config).fit(Hessian(base.adapter, base.train, None, 32)).solve(problem.query_gradients(base))
    with Runner(problem.build, LOCAL) as runner:
        result = runner.solve(config, problem.query_gradients(runner.problem))
    torch.testing.assert_close(result.x, direct.x, rtol=1e-10, atol=0)
    assert result.info["preconditioner"] == "ekfac"


def test_two_local_processes_equal_serial(serial, local_run):
    result, last_run = local_run
    assert_equal_up_to_summation_order(result, serial)
    assert last_run["computed"] == list(range(6)) and last_run["loaded"] == []  # the CG scores: 43 points, 6 shards


def test_two_torchrun_ranks_equal_serial(workdir, serial, tmp_path):
    output = tmp_path / "torchrun.safetensors"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [*launcher, "--master_port", str(free_port()), "script.py", "distributed", "0", str(output)]
    done = subprocess.run(command, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equal_up_to_summation_order(safetensors.torch.load_file(output), serial)


def finished_files(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every finished score shard's data file and sidecar."""
    paths = [path for stem in folder.glob("scores-*.json") for path in (stem, stem.with_suffix(".safetensors"))]
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in paths if path.exists()}


def processes_running(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_slow_run(workdir: Path, folder: Path) -> subprocess.Popen:
    """Start the slowed-down two-process run on store ``folder`` in its own process group (as a shell starts a
    command); return once two score shards are finished."""
    command = [sys.executable, "script.py", "processes", "2", str(folder.with_name("unused")), str(folder)]
    run = subprocess.Popen(command, cwd=workdir, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("scores-*.json"))) < 2:
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.01)
    return run


def assert_no_half_entries(folder: Path) -> None:
    """No temporary file is left, and every data file has its sidecar (a finished entry) and vice versa."""
    assert not list(folder.glob(".*.tmp"))
    sidecars = {path.stem for path in folder.glob("*.json")} - {"manifest"}
    assert {path.stem for path in folder.glob("*.safetensors")} == sidecars


def finished_shards(folder: Path) -> tuple[dict[str, tuple[int, int]], list[int]]:
    """The finished score shards' files (inode, mtime) and indices, checked to be some but not all of the 12."""
    before = finished_files(folder)
    done = sorted(int(name[len("scores-") :].split(".")[0]) for name in before if name.endswith(".json"))
    assert 2 <= len(done) < 12 and (folder / "s_test.json").exists()
    return before, done


def assert_resume_recomputes_only_the_rest(problem: ModuleType, folder: Path, local_run: tuple) -> None:
    """Rerun on ``folder``: s_test and the finished shards are loaded untouched; scores equal an unbroken run's."""
    before, done = finished_shards(folder)
    with Runner(problem.build, LOCAL) as runner, problem.open_store(folder, runner.problem) as store:
        lissa = runner.solve(problem.LISSA, problem.query_gradients(runner.problem), store)
        scores = runner.scores(lissa.x, None, store, score=problem.SCORE)
        assert lissa.info["loaded"]
        assert runner.last_run == {"shards": 12, "loaded": done, "computed": sorted(set(range(12)) - set(done))}
    assert finished_files(folder).items() >= before.items()  # finished shards untouched: same inode and mtime
    reference, _ = local_run
    assert torch.equal(scores, reference["scores"])
    assert torch.equal(lissa.x, reference["lissa"])


def test_sigkill_mid_run_then_restart_recomputes_only_unfinished_shards(problem, workdir, local_run, tmp_path):
    folder = tmp_path / "killed-store"
    run = start_slow_run(workdir, folder)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    run.stderr.close()
    deadline = time.monotonic() + 10
    while processes_running(str(folder)):  # its worker dies with it (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "a worker outlived its killed parent"
        time.sleep(0.05)
    assert_resume_recomputes_only_the_rest(problem, folder, local_run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_mid_run_stop_cleanly_and_the_rerun_resumes(problem, workdir, local_run, tmp_path, signum):
    folder = tmp_path / "stopped-store"
    run = start_slow_run(workdir, folder)
    if signum == signal.SIGINT:
        os.killpg(run.pid, signum)  # Ctrl-C: the terminal signals the main rank and its worker alike
    else:
        run.send_signal(signum)  # `kill PID`: the main rank alone
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    message = f"fastif: interrupted by {signum.name}; finished work is kept, run the same command again to resume"
    assert stderr.strip().splitlines()[-1] == message
    assert not processes_running(str(folder))  # the main rank stopped its worker before exiting
    assert_no_half_entries(folder)
    assert_resume_recomputes_only_the_rest(problem, folder, local_run)


@contextlib.contextmanager
def interrupt_at_write(number: int, moment: str):
    """Raise Interrupted (as SIGTERM does) at the store's atomic write ``number`` (data files and sidecars alike):
    ``before`` it, ``during`` it (its temporary file written, not renamed) or ``after`` its rename."""
    real, count = fastif.files.atomic_write, itertools.count()

    def stop() -> None:
        raise Interrupted(signal.SIGTERM)

    def atomic_write(path, write):
        if next(count) != number:
            return real(path, write)
        if moment == "before":
            stop()

        def write_then_stop(tmp):
            write(tmp)
            stop()

        real(path, write_then_stop if moment == "during" else write)
        stop()

    with (
        mock.patch("fastif.store.store.atomic_write", atomic_write),
        mock.patch("fastif.files.atomic_write", atomic_write),
    ):
        yield


@settings(max_examples=20, deadline=None)
@given(number=st.integers(0, 23), moment=st.sampled_from(["before", "during", "after"]))
def test_an_interrupt_at_any_store_write_then_resume_gives_identical_scores(
    problem, serial, tmp_path_factory, number, moment
):
    folder = tmp_path_factory.mktemp("interrupted")
    with (
        Runner(problem.build, SERIAL) as runner,
        problem.open_store(folder, runner.problem) as store,
        interrupt_at_write(number, moment),
        pytest.raises(Interrupted),
    ):
        runner.scores(serial["lissa"], None, store, score=problem.SCORE)
    assert_no_half_entries(folder)
    before = finished_files(folder)
    finished = number // 2 + (number % 2 == 1 and moment == "after")  # writes 2i, 2i + 1: shard i's data, sidecar
    with Runner(problem.build, SERIAL) as runner, problem.open_store(folder, runner.problem) as store:
        assert store.completed_shards("scores") == list(range(finished))
        scores = runner.scores(serial["lissa"], None, store, score=problem.SCORE)
        assert runner.last_run == {"shards": 12, "loaded": list(range(finished)), "computed": list(range(finished, 12))}
    assert finished_files(folder).items() >= before.items()
    assert torch.equal(scores, serial["scores"])


def test_errors_reach_the_caller_and_the_local_runner_survives(problem, serial):
    with Runner(problem.build, LOCAL) as runner:
        vectors = problem.query_gradients(runner.problem)
        with pytest.raises(DataError, match=r"indices must lie in \[0, 89\]"):
            runner.scores(vectors, [0, 90])
        with pytest.raises(SolverError, match=r"LiSSA diverged.*Increase scale"):
            runner.solve(replace(problem.LISSA, scale=1e-4, depth=200), vectors)
        cg = runner.solve(problem.CG, vectors)
        assert_equal_up_to_summation_order({"cg": cg.x}, {"cg": serial["cg"]})
        adapter = runner.problem.adapter
        adapter.load_flat_params(adapter.flat_params() + 1e-3)
        with pytest.raises(ModelError, match="rank 1's model parameters differ from rank 0's"):
            runner.scores(cg.x, [1, 2])


def test_store_entries_are_reused_and_foreign_ones_refused(problem, tmp_path):
    with Runner(problem.build, SERIAL) as runner, problem.open_store(tmp_path, runner.problem) as store:
        vectors = problem.query_gradients(runner.problem)
        first = runner.solve(problem.LISSA, vectors, store)
        scores = runner.scores(first.x, range(20), store)
        again = runner.solve(problem.LISSA, vectors, store)
        assert again.info["loaded"] and torch.equal(again.x, first.x)
        assert torch.equal(runner.scores(first.x, range(20), store), scores)
        assert runner.last_run == {"shards": 3, "loaded": [0, 1, 2], "computed": []}
        with pytest.raises(StoreError, match=r"'s_test'.*other test vectors.*another name, or rerun with --overwrite"):
            runner.solve(problem.LISSA, 2 * vectors, store)
        with pytest.raises(StoreError, match=r"'scores-00000'.*other s_test.*another prefix"):
            runner.scores(first.x, range(1, 21), store)


def test_configs_are_checked_and_errors_name_the_fix(problem, monkeypatch):
    with pytest.raises(ConfigError, match="backend must be one of"):
        RunnerConfig(backend="threads")
    with pytest.raises(ConfigError, match="shard_size must be a positive integer"):
        RunnerConfig(shard_size=0)
    with pytest.raises(ConfigError, match="workers=2 needs backend='processes'"):
        RunnerConfig(workers=2)
    with pytest.raises(ConfigError, match="set threads=1 or start_method='spawn'"):
        Runner(problem.build, RunnerConfig(backend="processes", workers=2, threads=2, start_method="fork"))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"launch with `torchrun --nproc_per_node N script\.py`"):
        Runner(problem.build, RunnerConfig(backend="distributed"))


def test_forked_workers_leave_the_store_lock_to_its_owner(problem, tmp_path):
    base = problem.make()
    store = problem.open_store(tmp_path, base)
    with Runner(problem.build, LOCAL):  # forks while this process holds the store's lock
        store.close()
        problem.open_store(tmp_path, base).close()  # the workers' inherited copies do not keep it locked
