"""Replicas that come and go behind the balancer: what eight clients see meanwhile.

Drives eight keep-alive clients through the compose `scale` profile's balancer (each posts a
48×48 face crop to /predict, one request at a time, with a 30-s deadline as a client would
have) while, phase by phase:

- steady: two replicas, nothing happens;
- stop and start: each replica in turn gets `docker stop` (SIGTERM: it drains, then exits), stays
  down 20 s, is started again and becomes ready;
- kill and start: the same with `docker kill` (SIGKILL, as the kernel's OOM killer would);
- recreate: each replica in turn is replaced by a new container at another address, created and
  ready before the old one is stopped and removed, as a rolling update does;
- scale up, scale down: `docker compose --profile scale up -d --scale api-replica=3`, then `=2`.

Per phase: requests answered, non-200s by kind (a status, "timeout", or the transport error),
p99 latency, throughput of 200s. For the scale-up: how long after the new replica's /ready first
answered 200 it served its first /predict (its own `fer_requests_total`, read from its address on
the compose network, which the host reaches); for every phase, how many /predict each replica
that ran from its start to its end served (one that served none was never found).

Needs a Docker engine and the images built (../shared/docker-check builds them); run from the
repository root. It brings the stack up with two replicas and takes it down at the end
(`--keep` leaves it up); COMPOSE_FILE works as for docker compose itself.

    python -m benchmarks.rolling --json benchmarks/results/rolling.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.http import BOUNDARY, multipart
from benchmarks.loadgen import build_request, exchange
from benchmarks.machine import machine_line, write_results
from benchmarks.workloads import face_jpeg_48

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 8
CLIENT_DEADLINE_S = 30.0  # what the operator gave each request
REPLICA_PORT = 8000
READY_DEADLINE_S = 120.0  # a bound on a replica's start, not a measurement
TRAFFIC_TARGET_S = 10.0  # a scaled-up replica takes traffic within this long of being ready


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request: when it ended (monotonic), how long it took, and "200", another status, or what failed."""

    ended: float
    seconds: float
    result: str


@dataclasses.dataclass
class Phase:
    name: str
    started: float
    ended: float = 0.0
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    served_before: dict[str, float] = dataclasses.field(default_factory=dict)  # replica name → its /predict 200s
    served_after: dict[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- the clients


async def _client(host: str, port: int, request: bytes, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Requests back to back until `stop`; a new connection after any failure, as an HTTP client makes."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while not stop.is_set():
        started = time.monotonic()
        close = True
        try:
            async with asyncio.timeout(CLIENT_DEADLINE_S):
                if reader is None or writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                result, close = await exchange(reader, writer, request)
        except TimeoutError:
            result = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            result = type(exc).__name__
        ended = time.monotonic()
        outcomes.append(Outcome(ended, ended - started, result))
        if close and writer is not None:
            writer.close()
            reader = writer = None
        if not result.isdigit():
            await asyncio.sleep(0.05)  # the balancer itself is unreachable: do not spin


class Load:
    """`CLIENTS` clients on their own event loop in a thread, from `start()` to `stop()`."""

    def __init__(self, host: str, port: int) -> None:
        body = multipart("file", [face_jpeg_48()])
        self.request = build_request(host, port, "/predict", body, f"multipart/form-data; boundary={BOUNDARY}")
        self.host, self.port = host, port
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rolling-clients", daemon=True)

    def _run(self) -> None:
        async def clients() -> None:
            await asyncio.gather(
                *(_client(self.host, self.port, self.request, self._stop, self.outcomes) for _ in range(CLIENTS))
            )

        uvloop.run(clients())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CLIENT_DEADLINE_S + 5)


# ---------------------------------------------------------------- the stack


class Stack:
    """The compose project's `scale` profile, driven with docker and docker compose."""

    def __init__(self, project: str | None, project_dir: Path) -> None:
        self.prefix = ["docker", "compose", *(["-p", project] if project else []), "--profile", "scale"]
        self.project_dir = project_dir

    def compose(self, *args: str) -> str:
        return self._run([*self.prefix, *args])

    def docker(self, *args: str) -> str:
        return self._run(["docker", *args])

    def _run(self, command: list[str]) -> str:
        done = subprocess.run(command, cwd=self.project_dir, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}\n{done.stderr}")
        return done.stdout

    def scale(self, replicas: int) -> None:
        """What an operator runs: the replicas' count set, nothing else recreated."""
        self.compose("up", "-d", "--no-build", "--no-recreate", "--scale", f"api-replica={replicas}", "api-replica")

    def replicas(self) -> list[str]:
        """The running replicas' container ids, oldest first."""
        ids = self.compose("ps", "-q", "api-replica").split()
        created = {cid: self.docker("inspect", "-f", "{{.Created}}", cid).strip() for cid in ids}
        return sorted(ids, key=created.__getitem__)

    def name(self, cid: str) -> str:
        return self.docker("inspect", "-f", "{{.Name}}", cid).strip().lstrip("/")

    def started_at(self, cid: str) -> str:
        return self.docker("inspect", "-f", "{{.State.StartedAt}}", cid).strip()

    def address(self, cid: str) -> str:
        return self.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid).strip()


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_ready(stack: Stack, cid: str) -> float:
    """When the replica's own /ready first answered 200 (polled every 50 ms from its address)."""
    end = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < end:
        address = stack.address(cid)  # given when the container starts, and again on a restart
        if address and answers_200(f"http://{address}:{REPLICA_PORT}/ready"):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"{stack.name(cid)} was not ready within {READY_DEADLINE_S:g} s")


def predictions_served(address: str) -> float:
    """The replica's own count of /predict requests answered 200."""
    with urllib.request.urlopen(f"http://{address}:{REPLICA_PORT}/metrics/prometheus", timeout=2) as response:
        text = response.read().decode()
    prefix = 'fer_requests_total{route="/predict",status="200"} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


def first_traffic(address: str, deadline_s: float) -> float | None:
    """When the replica had served its first /predict (polled every 100 ms), or None by the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predictions_served(address) > 0:
            return time.monotonic()
        time.sleep(0.1)
    return None


def wait_for_balancer(url: str) -> None:
    end = time.monotonic() + READY_DEADLINE_S
    while not answers_200(f"{url}/ready"):
        if time.monotonic() > end:
            raise TimeoutError(f"{url}/ready did not answer 200 within {READY_DEADLINE_S:g} s")
        time.sleep(0.2)


# ---------------------------------------------------------------- the phases


class Run:
    """The phases, in order, each recorded with its start and end on the clients' clock."""

    def __init__(self, stack: Stack, down_s: float, steady_s: float) -> None:
        self.stack, self.down_s, self.steady_s = stack, down_s, steady_s
        self.phases: list[Phase] = []

    def served(self) -> dict[str, float]:
        """Each running replica's own count of /predict answered 200, by container name and start.

        A replica restarted within a phase counts from zero again, so it is a different key.
        """
        return {
            f"{self.stack.name(cid)} {self.stack.started_at(cid)}": predictions_served(self.stack.address(cid))
            for cid in self.stack.replicas()
        }

    def begin(self, name: str) -> Phase:
        phase = Phase(name, time.monotonic(), served_before=self.served())
        self.phases.append(phase)
        print(f"-- {name}", flush=True)
        return phase

    def end(self, phase: Phase) -> None:
        phase.ended = time.monotonic()
        phase.served_after = self.served()

    def steady(self, name: str) -> None:
        phase = self.begin(name)
        time.sleep(self.steady_s)
        self.end(phase)

    def each_down_and_up(self, name: str, how: str) -> None:
        """Each replica in turn taken down by `how` ("stop" or "kill"), kept down, started, ready."""
        phase = self.begin(name)
        for cid in self.stack.replicas():
            taken = time.monotonic()
            self.stack.docker(how, cid)
            stopped_s = time.monotonic() - taken
            time.sleep(self.down_s)
            restarted = time.monotonic()
            self.stack.docker("start", cid)
            ready_s = wait_ready(self.stack, cid) - restarted
            print(f"   {self.stack.name(cid)}: {how} took {stopped_s:.1f} s, ready {ready_s:.1f} s after start")
            time.sleep(3)  # a moment with both replicas in rotation before the next
        self.end(phase)

    def recreate_each(self, count: int) -> None:
        """Each replica replaced by a new container, the new one first (as a rolling update with a surge).

        The new one is created while the old one still holds its address, so it gets another one
        (Docker hands a freed address straight back): the balancer must follow the name, not the
        addresses it saw at start.
        """
        phase = self.begin("recreate one at a time")
        for old in self.stack.replicas():
            before = set(self.stack.replicas())
            self.stack.scale(count + 1)
            (new,) = set(self.stack.replicas()) - before
            wait_ready(self.stack, new)
            self.stack.docker("stop", old)  # SIGTERM: it drains, then exits
            self.stack.docker("rm", old)
            print(f"   {self.stack.name(new)} at {self.stack.address(new)} replaced {old[:12]}")
            time.sleep(3)
        self.end(phase)

    def scale_up(self, count: int) -> None:
        phase = self.begin(f"scale up to {count}")
        before = set(self.stack.replicas())
        self.stack.scale(count)
        (new,) = set(self.stack.replicas()) - before
        ready = wait_ready(self.stack, new)
        served = first_traffic(self.stack.address(new), TRAFFIC_TARGET_S * 3)
        took = None if served is None else max(0.0, served - ready)
        print(f"   {self.stack.name(new)}: first /predict {'never' if took is None else f'{took:.1f} s'} after ready")
        time.sleep(self.steady_s)
        phase.notes = {
            "new_replica": self.stack.name(new),
            "first_request_after_ready_s": took,
            "new_replica_served": predictions_served(self.stack.address(new)),
        }
        self.end(phase)

    def scale_down(self, count: int) -> None:
        phase = self.begin(f"scale down to {count}")
        before = {cid: self.stack.name(cid) for cid in self.stack.replicas()}
        self.stack.scale(count)  # compose stops one (SIGTERM: it drains) and removes it
        gone = sorted(name for cid, name in before.items() if cid not in self.stack.replicas())
        phase.notes = {"removed": gone}
        print(f"   removed {', '.join(gone)}")
        time.sleep(self.steady_s)
        self.end(phase)


def summary(phase: Phase, outcomes: list[Outcome]) -> dict[str, Any]:
    mine = [outcome for outcome in outcomes if phase.started <= outcome.ended < phase.ended]
    seconds = sorted(outcome.seconds for outcome in mine)
    failures: dict[str, int] = {}
    for outcome in mine:
        if outcome.result != "200":
            failures[outcome.result] = failures.get(outcome.result, 0) + 1
    ok = len(mine) - sum(failures.values())
    # Replicas there from the phase's start to its end, and how many /predict each served in it:
    # one that served none while the others did was never found by the balancer.
    by_replica = {
        key.split()[0]: phase.served_after[key] - phase.served_before[key]
        for key in phase.served_before
        if key in phase.served_after
    }
    p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))] * 1000 if seconds else float("nan")
    return {
        "phase": phase.name,
        "seconds": phase.ended - phase.started,
        "requests": len(mine),
        "non_200": failures,
        "p99_ms": p99,
        "max_ms": seconds[-1] * 1000 if seconds else float("nan"),
        "ok_per_s": ok / (phase.ended - phase.started),
        "served_by_replica_throughout": by_replica,
        **phase.notes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the balancer, as published on this host")
    parser.add_argument("--project", default=None, help="compose project name (docker compose -p)")
    parser.add_argument("--project-dir", type=Path, default=ROOT, help="where docker-compose.yml is")
    parser.add_argument("--down-s", type=float, default=20.0, help="how long a stopped or killed replica stays down")
    parser.add_argument("--steady-s", type=float, default=15.0, help="seconds of load in each steady stretch")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    print(machine_line())
    host, port = args.url.removeprefix("http://").split(":")
    stack = Stack(args.project, args.project_dir)
    stack.compose("up", "-d", "--no-build", "--scale", "api-replica=2")
    for cid in stack.replicas():
        wait_ready(stack, cid)
    wait_for_balancer(args.url)
    load = Load(host, int(port))
    run = Run(stack, args.down_s, args.steady_s)
    load.start()
    try:
        run.steady("steady, 2 replicas")
        run.each_down_and_up("stop and start each", "stop")
        run.each_down_and_up("kill and start each", "kill")
        run.recreate_each(2)
        run.scale_up(3)
        run.scale_down(2)
    finally:
        load.stop()
        if not args.keep:
            stack.compose("down")
    rows = [summary(phase, load.outcomes) for phase in run.phases]
    print(f"{'phase':<24} {'s':>5} {'requests':>9} {'non-200':>8} {'p99 ms':>8} {'max ms':>8} {'200/s':>7}")
    for row in rows:
        failures = sum(row["non_200"].values())
        print(
            f"{row['phase']:<24} {row['seconds']:>5.0f} {row['requests']:>9,} {failures:>8} {row['p99_ms']:>8.0f} "
            f"{row['max_ms']:>8.0f} {row['ok_per_s']:>7.1f}  {json.dumps(row['non_200']) if failures else ''}"
        )
    print("/predict served in each phase by the replicas running from its start to its end:")
    for row in rows:
        counts = ", ".join(f"{name} {count:,.0f}" for name, count in row["served_by_replica_throughout"].items())
        if "new_replica" in row:
            counts += f", {row['new_replica']} (new) {row['new_replica_served']:,.0f}"
        print(f"  {row['phase']:<24} {counts or '(none ran throughout)'}")
    write_results(args.json, clients=CLIENTS, client_deadline_s=CLIENT_DEADLINE_S, down_s=args.down_s, phases=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
