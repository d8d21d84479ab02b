"""`fleetlm status`: the fleet at a glance, refreshed in place (like `nvidia-smi -l` or `kubectl get -w`).

It reads what an operator may read through AdminService (ListNodes, ListDeployments, GetLeader) and shows
nodes (scheduling, heartbeat, CPU, RAM, GPUs and their memory, over-commitment), deployments, and every replica (state,
load against its slots, refusals, load progress or error). `--once` prints one view, `--json` one JSON
document for scripts; piped or redirected, it prints one view as with `--once`.

Where it connects and with which credentials: launcher/admin_access.py (flags, FLEETLM_ADMIN_TOKEN, then
the operator file `fleetlm up` writes).

Every failure (nothing listening, TLS refused, a wrong admin token, an unreadable file) is one line on
stderr and exit code 1; in the live view it is shown in place and tried again at the next refresh. A reader
that stops reading (`fleetlm status | head -3`) ends it quietly, as it ends `ls`: exit code 141 (128 +
SIGPIPE), no traceback. The live view gives the terminal its cursor back however it ends: Ctrl-C, or SIGTERM
(exit code 143).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from typing import Any

import grpc

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher import admin_access
from launcher.admin_access import CALL_TIMEOUT_SECONDS, AccessError, Target
from mesh.catalog import queue_limit, running_limit

GIB = 1024**3


async def fetch(target: Target) -> dict[str, Any]:
    """One snapshot of the fleet from the first of the control planes (--controlplane a,b,c) that answers:
    every one of them serves admin reads."""
    addresses = target.addresses
    for address in addresses[:-1]:
        try:
            return await _fetch_one(replace(target, address=address))
        except AccessError:
            continue
    return await _fetch_one(replace(target, address=addresses[-1]))


async def _fetch_one(target: Target) -> dict[str, Any]:
    metadata = admin_access.metadata(target)
    try:
        async with admin_access.channel(target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            call = {"metadata": metadata, "timeout": CALL_TIMEOUT_SECONDS}
            nodes = await stub.ListNodes(admin_pb2.ListNodesRequest(), **call)
            deployments = await stub.ListDeployments(admin_pb2.ListDeploymentsRequest(), **call)
            leader = await stub.GetLeader(admin_pb2.GetLeaderRequest(), **call)
            # A deployment with replicas wanted but not placed: why, when no node would take the next one (a
            # scale beyond what the nodes hold is accepted, and waits for room).
            unplaced: dict[str, str] = {}
            for d in deployments.deployments:
                if len(d.assignments) < d.deployment.replicas:
                    name = d.deployment.spec.name
                    why = await stub.ExplainPlacement(admin_pb2.ExplainPlacementRequest(name=name), **call)
                    if not why.chosen_node_id:
                        unplaced[name] = "; ".join(f"{v.node_id}: {v.reason}" for v in why.verdicts) or "no live node"
    except grpc.aio.AioRpcError as exc:
        raise AccessError(admin_access.explain(target, exc)) from None
    return snapshot(target.address, nodes, deployments, leader, time.time(), unplaced)


async def unplaceable(target: Target, names: list[str]) -> dict[str, str]:
    """Those of the deployments named that fit on none of the live nodes (there is at least one): name ->
    every node's reason, from the control plane's ExplainPlacement."""
    out: dict[str, str] = {}
    try:
        async with admin_access.channel(target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            call = {"metadata": admin_access.metadata(target), "timeout": CALL_TIMEOUT_SECONDS}
            for name in names:
                verdicts = (await stub.ExplainPlacement(admin_pb2.ExplainPlacementRequest(name=name), **call)).verdicts
                if verdicts and not any(v.fits for v in verdicts):
                    out[name] = "; ".join(f"{v.node_id}: {v.reason}" for v in verdicts)
    except grpc.aio.AioRpcError as exc:
        raise AccessError(admin_access.explain(target, exc)) from None
    return out


# --- the snapshot (what --json prints) -------------------------------------------------------------------


def _state(value: int) -> str:
    return node_pb2.ReplicaState.Name(value).removeprefix("REPLICA_STATE_").lower()  # type: ignore[arg-type]


def _replica(node_id: str, replica: node_pb2.Replica, now: float) -> dict[str, Any]:
    loading = replica.state == node_pb2.REPLICA_STATE_LOADING
    return {
        "node": node_id,
        "model": replica.model.name,
        "engine": replica.model.engine,
        "state": _state(replica.state),
        "device": replica.device,
        "assigned": replica.assigned,
        "running": replica.running_requests,
        "queued": replica.queued_requests,
        "slots": running_limit(replica.model),
        "queue_limit": queue_limit(replica.model),
        "rejected": replica.rejected_requests,
        "error": replica.error,
        "load_progress": replica.load_progress if loading and replica.HasField("load_progress") else None,
        "loading_seconds": round(max(0.0, now - replica.loading_since.ToNanoseconds() / 1e9), 1)
        if loading and replica.HasField("loading_since")
        else None,
    }


def _node(node: node_pb2.Node, now: float) -> dict[str, Any]:
    inv = node.inventory
    scheduling = node_pb2.Scheduling.Name(node.scheduling).removeprefix("SCHEDULING_").lower()  # type: ignore[arg-type]
    return {
        "id": node.node_id,
        "address": node.inference_address,
        "state": "active" if scheduling == "unspecified" else scheduling,
        "heartbeat_seconds_ago": round(max(0.0, now - node.last_heartbeat_at.ToNanoseconds() / 1e9), 1)
        if node.HasField("last_heartbeat_at")
        else None,
        "cpu": {"model": inv.cpu.model, "cores": inv.cpu.cores},
        "ram": {"total_bytes": inv.ram.total_bytes, "free_bytes": inv.ram.free_bytes},
        "gpus": [
            {"index": g.index, "name": g.name, "total_bytes": g.memory.total_bytes, "free_bytes": g.memory.free_bytes}
            for g in inv.gpus
        ],
        "agent_version": node.agent_version,
        "overcommitted": node.overcommitted or None,  # why its replicas need more memory than it has
    }


def snapshot(
    address: str,
    nodes: admin_pb2.ListNodesResponse,
    deployments: admin_pb2.ListDeploymentsResponse,
    leader: admin_pb2.GetLeaderResponse,
    now: float,
    unplaced: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`unplaced`: deployment name -> why no node takes the replicas it wants beyond those placed."""
    ready = node_pb2.REPLICA_STATE_READY
    return {
        "controlplane": address,
        "leader": leader.leader_address,
        "time": now,
        "nodes": [_node(n, now) for n in nodes.nodes],
        "deployments": [
            {
                "name": d.deployment.spec.name,
                "engine": d.deployment.spec.engine,
                "replicas": d.deployment.replicas,
                "min_replicas": d.deployment.min_replicas,
                "max_replicas": d.deployment.max_replicas,
                "ready": sum(r.state == ready for r in d.replicas),
                "nodes": [r.node_id for r in d.replicas],
                "assigned": len(d.assignments),  # replicas placed on nodes, ready or not
                # Replicas of an older spec, during a roll-out of a change (serving until replaced).
                "outdated": sum(a.model != d.deployment.spec for a in d.assignments),
                "unplaced_reason": (unplaced or {}).get(d.deployment.spec.name),
                # Nodes whose own catalog pins this name: their replica is not routed for the deployment.
                "pinned_by": sorted(
                    n.node_id
                    for n in nodes.nodes
                    if any(r.model.name == d.deployment.spec.name and not r.assigned for r in n.replicas)
                ),
            }
            for d in deployments.deployments
        ],
        "replicas": [_replica(n.node_id, r, now) for n in nodes.nodes for r in n.replicas],
    }


# --- the view -------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


def _gib(used: int, total: int) -> str:
    return f"{used / GIB:.1f}/{total / GIB:.1f} GiB"


def _progress(replica: dict[str, Any]) -> str:
    if replica["state"] == "loading":
        parts = []
        if replica["load_progress"] is not None:
            parts.append(f"{replica['load_progress'] * 100:.0f}%")
        if replica["loading_seconds"] is not None:
            parts.append(f"{replica['loading_seconds']:.0f}s")
        return "loading " + " ".join(parts) if parts else "loading"
    return replica["error"]


def render(snap: dict[str, Any], width: int) -> list[str]:
    """The view as lines, each cut to the terminal's width."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap["time"]))
    leader = f"   leader {snap['leader']}" if snap["leader"] else "   no leader"
    lines = [f"fleetlm status   control plane {snap['controlplane']}{leader}   {when}", ""]
    nodes = snap["nodes"]
    lines.append(f"NODES ({len(nodes)})")
    rows = []
    for n in nodes:
        ram = n["ram"]
        gpus = ", ".join(f"{g['name']} {_gib(g['total_bytes'] - g['free_bytes'], g['total_bytes'])}" for g in n["gpus"])
        beat = n["heartbeat_seconds_ago"]
        state = n["state"] + (", over-committed" if n.get("overcommitted") else "")
        rows.append([
            n["id"], state, n["address"], f"{n['cpu']['cores']} cores",
            _gib(ram["total_bytes"] - ram["free_bytes"], ram["total_bytes"]) if ram["total_bytes"] else "-",
            gpus or "-", "-" if beat is None else f"{beat:.1f}s ago",
        ])  # fmt: skip
    lines += _table(["NODE", "STATE", "ADDRESS", "CPU", "RAM USED", "GPUS", "HEARTBEAT"], rows) if rows else ["  none"]
    lines += [f"  {n['id']}: over-committed: {n['overcommitted']}" for n in nodes if n.get("overcommitted")]
    deployments = snap["deployments"]
    lines += ["", f"DEPLOYMENTS ({len(deployments)})"]
    rows = [[d["name"], d["engine"], f"{d['ready']}/{d['replicas']}", f"{d['min_replicas']}-{d['max_replicas']}",
             ",".join(d["nodes"]) or "-"] for d in deployments]  # fmt: skip
    lines += _table(["NAME", "ENGINE", "READY", "MIN-MAX", "NODES"], rows) if rows else ["  none"]
    for d in deployments:
        if d["outdated"]:
            new = d["assigned"] - d["outdated"]
            lines.append(f"  {d['name']}: rolling out a change: {new} of {d['replicas']} replicas placed with the new"
                         f" spec; {d['outdated']} with the old one serve until new ones are ready")  # fmt: skip
        if d["pinned_by"]:
            lines.append(f"  {d['name']}: node {', '.join(d['pinned_by'])} pins a model of this name from its own"
                         " catalog: not routed for the deployment (remove it from that catalog)")  # fmt: skip
        if d["unplaced_reason"]:
            short = d["replicas"] - d["assigned"]
            lines.append(f"  {d['name']}: {short} of {d['replicas']} replicas fit on no node: {d['unplaced_reason']}")
    replicas = snap["replicas"]
    lines += ["", f"REPLICAS ({len(replicas)})"]
    rows = [[r["node"], r["model"], r["state"], r["device"] or "-", f"{r['running']}/{r['slots']}",
             f"{r['queued']}/{r['queue_limit']}", str(r["rejected"]), _progress(r)] for r in replicas]  # fmt: skip
    lines += (
        _table(["NODE", "MODEL", "STATE", "DEVICE", "RUNNING/SLOTS", "QUEUED", "REFUSED", "PROGRESS / ERROR"], rows)
        if rows
        else ["  none"]
    )
    return [line[:width] for line in lines]


# --- the command ----------------------------------------------------------------------------------------


async def _live(target: Target, interval: float) -> None:
    """Redraw in place: home the cursor, write each line over the old one, clear what is left below. SIGTERM
    cancels it as Ctrl-C does, so that the cursor it hid is shown again (the default action would end the
    process with the terminal's cursor hidden)."""
    out = sys.stdout
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    out.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear the screen once
    try:
        while True:
            size = shutil.get_terminal_size()
            try:
                lines = render(await fetch(target), size.columns)
            except AccessError as exc:
                lines = [f"fleetlm status: {exc}"[: size.columns], f"(trying again every {interval:g}s)"]
            lines.append(f"every {interval:g}s; Ctrl-C to stop")
            out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines[: size.lines - 1]) + "\x1b[J")
            out.flush()
            await asyncio.sleep(interval)
    finally:
        out.write("\x1b[?25h")
        out.flush()


def run(args: argparse.Namespace) -> int:
    try:
        target = admin_access.find_target(args)
        # Piped or redirected (`fleetlm status | grep`, a log file): one view, as --once, not a screen redrawn
        # for ever in terminal escapes that no one sees.
        if args.json or args.once or not sys.stdout.isatty():
            snap = asyncio.run(fetch(target))
            if args.json:
                print(json.dumps(snap, indent=2))
            else:
                width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 1 << 16  # piped: whole
                print("\n".join(render(snap, width)))
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
            return 0
        asyncio.run(_live(target, args.interval))
    except AccessError as exc:
        print(f"fleetlm status: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        print()
    except asyncio.CancelledError:  # SIGTERM (see _live); the cursor is back
        return 128 + signal.SIGTERM
    return 0


def _reader_gone() -> int:
    """The reader closed the pipe (`| head`): end as a command the shell's SIGPIPE ends, without a word. What
    is still buffered for stdout goes nowhere (Python would report the failed flush at exit otherwise)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE
