"""docker-compose.yml run without Docker: each service's command started as a local process
(hostnames mapped to localhost, ports to free local ports, volumes to folders), then a job
submitted through the API runs on those separate scheduler and worker processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml
from distributed import Client

from tests.service_fixtures import REPO, SAE, child_env, free_port, wait_job, write_tiny

N_WORKERS = 2  # docker compose up --scale worker=2
EXECUTABLES = {"dask": [sys.executable, "-m", "dask"], "sae": SAE}


def _expand(value: str) -> str:
    """Compose's ${VAR:-default} with an empty environment."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", re.sub(r"\$\{\w+\}", "", value))


class Compose:
    """The services of docker-compose.yml as local processes."""

    def __init__(self, path: Path, root: Path):
        self.spec = yaml.safe_load(path.read_text())
        self.root = root
        self.ports: dict[str, int] = {}
        for svc in self.spec["services"].values():
            for p in svc.get("ports", []):
                container = str(p).split(":")[-1]
                self.ports.setdefault(container, free_port())
        self.volumes: dict[str, Path] = {}
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def _local(self, svc: dict, arg: str) -> str:
        arg = _expand(str(arg))
        for v in svc.get("volumes", []):
            name, mount = v.split(":")[:2]
            folder = self.volumes.setdefault(name, self.root / name)
            if arg == mount or arg.startswith(mount + "/"):
                arg = str(folder) + arg[len(mount) :]
        for service in self.spec["services"]:
            arg = re.sub(rf"(?<=//){service}(?=:)", "127.0.0.1", arg)
        arg = arg.replace("0.0.0.0", "127.0.0.1").replace("localhost", "127.0.0.1")
        for container, local in self.ports.items():
            arg = re.sub(rf"(?<![\d.]){container}(?!\d)", str(local), arg)
        return arg

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        svc = self.spec["services"][name]
        cmd = svc["command"]
        cmd = cmd.split() if isinstance(cmd, str) else list(cmd)
        local = [*EXECUTABLES[cmd[0]], *(self._local(svc, a) for a in cmd[1:])]
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        # a variable without a value is passed through from the host's environment when set
        env = {k: (os.environ.get(k) if v is None else v) for k, v in env.items()}
        return local, {k: self._local(svc, str(v)) for k, v in env.items() if v is not None}

    def up(self, name: str, log: Path) -> subprocess.Popen:
        cmd, env = self.command(name)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(**env),
                start_new_session=True,
                cwd=self.root,
            )
        self.procs.append((name, proc))
        return proc

    def down(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def test_compose_services_train_a_job(tmp_path):
    compose = Compose(REPO / "docker-compose.yml", tmp_path)
    services = compose.spec["services"]
    assert {"scheduler", "worker", "api"} <= set(services)
    assert "8787" in compose.ports, "the scheduler's dashboard is published on 8787"
    worker_mounts = {v.split(":")[1] for v in services["worker"]["volumes"]}
    api_mounts = {v.split(":")[1] for v in services["api"]["volumes"]}
    assert "/data" in worker_mounts and {"/data", "/state"} <= api_mounts
    for name in ("worker",):
        assert "container_name" not in services[name] and "ports" not in services[name]

    compose.volumes["data"] = tmp_path / "data"
    write_tiny(tmp_path / "data", "tiny")
    scheduler_addr = f"tcp://127.0.0.1:{compose.ports['8786']}"
    pids: dict[str, int] = {}
    try:
        compose.up("scheduler", tmp_path / "scheduler.log")
        workers = [compose.up("worker", tmp_path / f"worker-{i}.log") for i in range(N_WORKERS)]
        api = compose.up("api", tmp_path / "api.log")
        with Client(scheduler_addr, timeout=30) as client:
            client.wait_for_workers(N_WORKERS, timeout=60)
            url = f"http://127.0.0.1:{compose.ports['8000']}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    health = httpx.get(url + "/health", timeout=2).json()
                    break
                except httpx.HTTPError:
                    assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "the API did not start"
                    time.sleep(0.3)
            assert health["scheduler"] == scheduler_addr
            dashboard = f"http://127.0.0.1:{compose.ports['8787']}/status"
            assert httpx.get(dashboard, timeout=10).status_code == 200

            before = client.run(lambda dask_worker: dask_worker.state.executed_count)
            with httpx.Client(base_url=url, timeout=30) as http:
                spec = {"dataset": "tiny", "hidden": 4, "max_iter": 5}
                job_id = http.post("/jobs", json=spec).json()["id"]
                job = wait_job(http, job_id)
                assert job["status"] == "succeeded", job
                assert job["dashboard_url"] == f"http://127.0.0.1:{compose.ports['8787']}/status"
                assert http.get(f"/jobs/{job_id}/model.npz").status_code == 200
            assert (tmp_path / "state" / "jobs" / job_id / "model.npz").is_file()

            after = client.run(lambda dask_worker: dask_worker.state.executed_count)
            ran = {addr: after[addr] - before.get(addr, 0) for addr in after}
            assert sum(ran.values()) > 0, ran
            # the tasks ran in the compose workers' processes, not in the API's
            pids = client.run(os.getpid)
            started = {p.pid for p in workers}
            for addr, pid in pids.items():
                family = {pid, *(a.pid for a in psutil.Process(pid).parents())}
                assert family & started, f"worker {addr} is not one of the compose workers"
                assert api.pid not in family
    finally:
        compose.down()
    # nothing survives: the compose processes and the worker processes they started
    for pid in [*pids.values(), *(p.pid for _, p in compose.procs)]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
