"""Optimizer checkpoints: O(n) bytes per save, crash safety, orphan cleanup, thread safety."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import rosen, rosen_der

from sae.optimize import OptimizerState, minimize
from sae.optimize import state as state_module

N = 2000  # parameters: one vector is 16 kB, well above the npz/npy headers
MEMORY = 4


def rosenbrock(x):
    return float(rosen(x)), rosen_der(x)


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).view(np.int64)


def same_state(a: OptimizerState, b: OptimizerState, status: bool = True) -> bool:
    vectors = ("theta", "grad", "d_prev", "g_prev")
    for name in vectors:
        u, v = getattr(a, name), getattr(b, name)
        if (u is None) != (v is None) or (u is not None and not np.array_equal(bits(u), bits(v))):
            return False
    if len(a.s) != len(b.s) or len(a.y) != len(b.y):
        return False
    for u, v in zip(a.s + a.y, b.s + b.y, strict=True):
        if not np.array_equal(bits(u), bits(v)):
            return False
    scalars = ("method", "iteration", "n_evals", "J", "J_prev", "last_step")
    if status:
        scalars += ("status", "message")
    return all(getattr(a, k) == getattr(b, k) for k in scalars)


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """path -> (inode, mtime_ns, size) of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def written(before: dict, after: dict) -> int:
    """Bytes in files that are new or changed (a replaced file has a new inode)."""
    return sum(v[2] for p, v in after.items() if before.get(p) != v)


@pytest.fixture(scope="module")
def run():
    """States of iterations 0..12 of L-BFGS (memory 4) on Rosenbrock in 2000 dimensions."""
    x0 = np.tile([-1.2, 1.0], N // 2)
    states: list[OptimizerState] = []
    minimize(rosenbrock, OptimizerState.start("lbfgs", x0, {"memory": MEMORY}), 12, states.append)
    assert [s.iteration for s in states] == list(range(13))
    assert len(states[-1].s) == MEMORY
    return states


def test_bytes_per_save_stay_o_n(run, tmp_path):
    path = tmp_path / "state.npz"
    vector = 8 * N
    before = snapshot(tmp_path)
    per_save = []
    for state in run:
        state.save(path)
        after = snapshot(tmp_path)
        per_save.append(written(before, after))
        before = after
        pairs = sorted(os.listdir(str(path) + ".pairs")) if state.s else []
        assert len(pairs) == len(state.s)  # exactly the live pairs, no temporary files
        assert sorted(p.name for p in tmp_path.iterdir())[0] == "state.npz"
    full = [w for w, s in zip(per_save, run, strict=True) if s.iteration > MEMORY]
    assert len(full) >= 5
    # theta and grad in the state file, s and y of the one new pair, small headers
    assert max(full) <= 4 * vector + 8192, per_save
    # the whole state (what a save used to write every time) is far larger
    whole = (2 * MEMORY + 2) * vector
    assert sum(snapshot(tmp_path)[p][2] for p in snapshot(tmp_path)) >= whole
    assert max(full) < 0.5 * whole
    # a save that has nothing new to store only rewrites the small state file
    run[-1].save(path)
    assert written(before, snapshot(tmp_path)) <= 2 * vector + 8192
    assert same_state(OptimizerState.load(path), run[-1])


def test_crash_between_pair_write_and_state_replace(run, tmp_path, monkeypatch):
    path = tmp_path / "state.npz"
    folder = Path(str(path) + ".pairs")
    old, new = run[9], run[10]
    old.save(path)
    old_pairs = set(os.listdir(folder))

    def crash(fh, **arrays):
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(state_module.np, "savez", crash)
        with pytest.raises(OSError, match="power cut"):
            new.save(path)
    orphans = set(os.listdir(folder)) - old_pairs
    assert len(orphans) == 1  # the new pair was written, the state file was not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz", "state.npz.pairs"]
    back = OptimizerState.load(path)
    assert same_state(back, old)
    # the next save cleans the orphan up (here: the previous state saved again)
    back.save(path)
    assert set(os.listdir(folder)) == old_pairs
    new.save(path)
    assert len(os.listdir(folder)) == MEMORY
    assert same_state(OptimizerState.load(path), new)


_KILLED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from scipy.optimize import rosen, rosen_der
    from sae.optimize import OptimizerState, minimize
    from sae.optimize import state as state_module

    path, k = sys.argv[1], int(sys.argv[2])
    x0 = np.tile([-1.2, 1.0], 1000)
    f = lambda x: (float(rosen(x)), rosen_der(x))
    state = minimize(f, OptimizerState.start("lbfgs", x0, {"memory": 4}), k)
    state.save(path)
    state = minimize(f, state, k + 1)

    def die(fh, **arrays):
        os._exit(17)  # the process dies after the pair files, before the state file

    state_module.np.savez = die
    state.save(path)
    """
)


def test_killed_process_leaves_a_loadable_state(run, tmp_path):
    """A process killed between the pair write and the state replace (no cleanup runs)."""
    path = tmp_path / "state.npz"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", _KILLED_SCRIPT, str(path), "8"]
    assert subprocess.run(cmd, env=env, timeout=300).returncode == 17
    files = os.listdir(str(path) + ".pairs")
    assert len(files) == MEMORY + 1  # one orphan
    back = OptimizerState.load(path)
    assert back.status == "max_iter" and same_state(back, run[8], status=False)
    # resuming from it continues the trajectory bit for bit, and the next save cleans up
    states: list[OptimizerState] = []
    minimize(rosenbrock, back, 10, states.append)
    states[0].save(path)
    assert len(os.listdir(str(path) + ".pairs")) == MEMORY
    assert same_state(OptimizerState.load(path), run[9], status=False)
    assert same_state(states[1], run[10], status=False)


def test_orphans_and_stale_pairs_are_cleaned(run, tmp_path):
    path = tmp_path / "state.npz"
    folder = Path(str(path) + ".pairs")
    run[6].save(path)
    (folder / ".00000099-0123456789abcdef.npy.x1y2.tmp").write_bytes(b"half written")
    (folder / "00000099-0123456789abcdef.npy").write_bytes(b"a pair of an older run")
    run[7].save(path)
    assert len(os.listdir(folder)) == MEMORY
    assert all(n.endswith(".npy") and not n.startswith(".") for n in os.listdir(folder))
    # a state without pairs (CG, a fresh start) removes the folder
    OptimizerState.start("cg", np.zeros(3)).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.npz"]


def test_fresh_run_over_an_old_checkpoint(run, tmp_path):
    """Pair files are named by their bits: another run's files of the same iteration are not
    taken for this run's."""
    path = tmp_path / "state.npz"
    run[8].save(path)
    x0 = np.tile([-1.0, 1.1], N // 2)
    other = minimize(rosenbrock, OptimizerState.start("lbfgs", x0, {"memory": MEMORY}), 8)
    other.save(path)
    assert same_state(OptimizerState.load(path), other)
    assert len(os.listdir(str(path) + ".pairs")) == MEMORY


def test_missing_or_corrupt_pair_is_a_clear_error(run, tmp_path):
    path = tmp_path / "state.npz"
    run[5].save(path)
    folder = Path(str(path) + ".pairs")
    first = sorted(folder.iterdir())[0]
    pair = np.load(first)
    pair[1, 7] += 1.0
    np.save(first, pair)
    with pytest.raises(ValueError, match="does not hold the pair"):
        OptimizerState.load(path)
    first.unlink()
    with pytest.raises(ValueError, match=f"pair file .*{first.name} named by .* is missing"):
        OptimizerState.load(path)


def test_same_pairs_saved_to_two_paths(run, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run[11].save(tmp_path / name / "state.npz")
        assert same_state(OptimizerState.load(tmp_path / name / "state.npz"), run[11])


def test_loaded_state_saves_only_new_pairs(run, tmp_path):
    """After a load (a resumed job), the pairs on disk are known: not written again."""
    path = tmp_path / "state.npz"
    run[9].save(path)
    loaded = OptimizerState.load(path)
    before = snapshot(tmp_path)
    nxt = minimize(rosenbrock, loaded, 10)
    assert same_state(nxt, run[10], status=False)
    nxt.save(path)
    assert written(before, snapshot(tmp_path)) <= 4 * 8 * N + 8192


def test_saving_on_another_thread_while_minimize_runs(tmp_path):
    """As worker.train's CheckpointWriter does: states queued to a thread that saves them in
    order while the optimizer continues; every saved file loads as the state it was given."""
    path = tmp_path / "state.npz"
    todo: queue.Queue = queue.Queue(maxsize=2)
    bad: list[int] = []

    def writer():
        while (state := todo.get()) is not None:
            state.save(path)
            if not same_state(OptimizerState.load(path), state):
                bad.append(state.iteration)

    thread = threading.Thread(target=writer)
    thread.start()
    x0 = np.tile([-1.2, 1.0], N // 2)
    try:
        end = minimize(rosenbrock, OptimizerState.start("lbfgs", x0, {"memory": 3}), 15, todo.put)
    finally:
        todo.put(None)
        thread.join()
    assert bad == []
    assert same_state(OptimizerState.load(path), end)
    assert len(os.listdir(str(path) + ".pairs")) == 3
