"""A Ray head of one's own on this machine: started on free ports, used, and stopped again, alone.

    python -m raysst.local_head --num-cpus 2 --log runs/ray-head.log -- ray job submit --working-dir . -- python ...

`make run` and the job tests use it. A bare `ray stop` would end every Ray on the machine and `ray start`'s
default ports clash with any other Ray here, so the head gets its own ports and process group, and only
that group is ended. Ray 2.60 heads check a token (RAY_AUTH_MODE=token): one that is given (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is used, else a fresh one is made for this head alone and handed
to the command through RAY_AUTH_TOKEN, so a machine with no ~/.ray works and nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

RAY = str(Path(sys.executable).with_name("ray"))
PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
              "object-manager-port")
START_TIMEOUT_S = 120


def free_port() -> int:
    """A port no one listens on now (the OS's pick)."""
    return free_ports(("port",))["port"]


def auth_env(env: dict) -> dict:
    """`env` in token mode with a token the head and its clients share (a fresh one if none is given)."""
    env = {**env, "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "token")}
    home = Path(env.get("HOME") or Path.home())  # the head's HOME, which may not be this process's
    given = env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (home / ".ray/auth_token").exists()
    if env["RAY_AUTH_MODE"] == "token" and not given:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    return env


@dataclass
class Head:
    """A running head: `gcs` for `ray status --address`, `dashboard` for `ray job submit --address`."""
    proc: subprocess.Popen
    gcs: str
    dashboard: str
    env: dict

    def stop(self, grace: float = 5) -> None:
        """End the head's process group (its raylet, GCS, dashboard, workers and jobs) and wait until it is gone.

        Ray's GCS lingers for half a minute after SIGTERM; what still runs after `grace` seconds gets SIGKILL."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
            deadline = time.time() + wait
            try:
                os.killpg(self.proc.pid, sig)
                while time.time() < deadline:
                    self.proc.poll()  # reap `ray start`, whose zombie would keep the group alive
                    os.killpg(self.proc.pid, 0)
                    time.sleep(0.2)
            except ProcessLookupError:
                return


def free_ports(flags: Sequence[str] = PORT_FLAGS) -> dict:
    """A distinct free port for each of `flags` (by default `ray start --head`'s port flags).

    Every socket stays bound until all are picked: one bound and closed at a time, the OS may hand out the
    same port twice, and `ray start` then refuses it ("used by other components")."""
    sockets = [socket.socket() for _ in flags]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return {flag: s.getsockname()[1] for flag, s in zip(flags, sockets)}
    finally:
        for s in sockets:
            s.close()


def start_head(num_cpus: Optional[int] = None, log: Optional[str] = None, env: Optional[dict] = None,
               ports: Optional[dict] = None, extra_args: Sequence[str] = ()) -> Head:
    """Start `ray start --head --block` on free ports (or `ports`, from `free_ports`, for a caller that must
    know them first) in its own process group, with `extra_args` added; return once it takes jobs."""
    env = auth_env(dict(env or os.environ))
    # Jobs run `python` from the head's PATH: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ports = ports or free_ports()
    # Ray's helpers inside the cluster (Train's placement-group cleaner, the state API) find it by this address;
    # without it they pick the newest Ray on the machine, which may be another one (see runtime.pin_dashboard).
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{ports['dashboard-port']}"
    cmd = [RAY, "start", "--head", "--block", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items()),
           *([f"--num-cpus={num_cpus}"] if num_cpus else []), *extra_args]
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    head = Head(proc, f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}", env)
    deadline = time.time() + START_TIMEOUT_S
    while subprocess.run([RAY, "job", "list", "--address", head.dashboard], env=env, capture_output=True).returncode:
        if proc.poll() is not None or time.time() > deadline:
            head.stop()
            raise RuntimeError(f"ray start --head did not come up within {START_TIMEOUT_S} s"
                               + (f"; see {log}" if log else ""))
        time.sleep(1)
    return head


def run_with_head(command: Sequence[str], num_cpus: Optional[int] = None, log: Optional[str] = None) -> int:
    """Start a head, run `command` against it (RAY_ADDRESS set), stop the head; the command's exit code."""
    print(f"[raysst] starting a local Ray head{f' (log: {log})' if log else ''}", flush=True)
    head = start_head(num_cpus, log)
    print(f"[raysst] Ray head at {head.gcs}, dashboard {head.dashboard}", flush=True)
    try:
        return subprocess.run(list(command), env={**head.env, "RAY_ADDRESS": head.dashboard}).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        head.stop()
        print("[raysst] Ray head stopped", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all of this machine's)")
    parser.add_argument("--log", help="file for the head's own output")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run against the head")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return run_with_head(command, args.num_cpus, args.log)


if __name__ == "__main__":
    sys.exit(main())
