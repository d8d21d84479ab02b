"""Desired state -> assignments. Deployments say how many replicas of what; the reconciler decides where.

One pass (`reconcile`) compares deployments with assignments and the nodes' reports, and writes the
difference to the store; node agents watch their assignments and converge. Passes run on every change
the fleet view sees and on a timer, so a missed event or a failed write heals on the next pass.

What one pass does, per deployment:
  - drops assignments on nodes that are gone (lease expired) or of deployments that were removed;
  - unloads replicas idle longer than idle_timeout, down to min_replicas (lowering `replicas`);
  - places new replicas until `replicas` are assigned on schedulable nodes;
  - removes extra replicas when scaled down;
  - for a changed deployment: starts replicas of the new spec beside the old ones where there is room,
    else in an old one's place, no more than a quarter of them (at least one) loading at a time, and
    removes an old replica only once a new one serves in its stead;
  - for a draining node: places the replacement first, and removes the draining replica only once the
    replacement serves (or, with no room for one, another replica), so no request fails during the move
    and the deployment keeps its count where it can;
  - for a node that holds more than fits (it came back with less memory than its replicas were placed
    with): warns, and moves the replicas beyond what fits, the last placed first, as a drain does, where
    another node has room; with none they stay, and the node shows as over-committed until there is.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import timestamp_pb2

from controlplane import metrics, placement
from controlplane.fleet import FleetView
from controlplane.leader import Leadership
from controlplane.store import ClusterStore, Fence, FencedOut, StoreUnavailable, record_key
from fleetlm.controlplane.v1 import node_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.redaction import redact_spec

log = logging.getLogger(__name__)

READY = node_pb2.REPLICA_STATE_READY


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class Reconciler:
    def __init__(
        self,
        store: ClusterStore,
        fleet: FleetView,
        policy: placement.PlacementPolicy,
        interval_seconds: float = 2.0,
        leadership: Leadership | None = None,
    ) -> None:
        self._store = store
        self.leadership = leadership  # None: the only control plane, writes unfenced
        self._fleet = fleet
        self.policy = policy
        self._interval = interval_seconds
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.last_errors: dict[str, str] = {}  # deployment -> why it could not be placed
        self._overcommitted: dict[str, str] = {}  # node -> why it holds more than fits (as last logged)
        self._excess: set[str] = set()  # record keys of the assignments beyond what their nodes hold
        fleet.listeners.append(lambda event: self._wake.set() if event is None or event.kind != "model" else None)

    def kick(self) -> None:
        self._wake.set()

    def fence(self) -> Fence | None:
        """The fence for a write in the leader's role (None when there is no election); FencedOut when
        this control plane does not lead."""
        return None if self.leadership is None else self.leadership.fence()

    async def run(self) -> None:
        await self._fleet.settled.wait()  # nothing is moved while nodes may still be coming back
        while True:
            if self.leadership is not None and not self.leadership.is_leader:
                await self.leadership.elected.wait()  # followers decide nothing
                self._wake.set()  # a new leader does a pass at once
            try:
                # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a cancellation
                # that arrives as the wake-up does, and this loop would outlive the control plane's shutdown.
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.reconcile()
            except FencedOut as exc:
                if self.leadership is not None:
                    self.leadership.step_down(f"a fenced write was refused ({exc})")
            except StoreUnavailable:
                pass  # said once by the store; the next pass after etcd is back does what this one could not
            except Exception:
                log.exception("reconcile pass failed")

    # --- snapshot helpers -----------------------------------------------------------------------------

    def snapshots(self, without: str = "", skip: node_pb2.Assignment | None = None) -> list[placement.NodeSnapshot]:
        """The nodes as placement sees them; `without`: as if that model's replicas were gone (a deployment
        being changed, whose replicas the new ones replace); `skip`: as if that one replica were gone."""
        fleet = self._fleet
        return [
            placement.NodeSnapshot(
                n,
                fleet.scheduling(n.node_id),
                tuple(
                    a
                    for a in fleet.node_assignments(n.node_id)
                    if (not without or a.model.name != without) and a is not skip
                ),
            )
            for n in fleet.nodes.values()
        ]

    def overcommit(self, node_id: str) -> placement.Overcommit | None:
        """Whether the node holds more replicas than fit it now (None: they fit, or it is draining anyway)."""
        node = self._fleet.nodes.get(node_id)
        if node is None or self._fleet.scheduling(node_id) == node_pb2.SCHEDULING_DRAINING:
            return None
        return placement.overcommitted(node, self._fleet.node_assignments(node_id), self.policy)

    def _find_excess(self) -> None:
        """The assignments beyond what their nodes hold now; said once per change, as a warning."""
        found: dict[str, str] = {}
        self._excess = set()
        held: dict[str, list[node_pb2.Assignment]] = {}
        for assignment in self._fleet.assignments.values():  # one pass: a fleet of 1,000 nodes is asked often
            held.setdefault(assignment.node_id, []).append(assignment)
        for node_id, assignments in held.items():
            node = self._fleet.nodes.get(node_id)
            if node is None or self._fleet.scheduling(node_id) == node_pb2.SCHEDULING_DRAINING:
                continue
            over = placement.overcommitted(node, assignments, self.policy)
            if over is not None:
                found[node_id] = over.reason
                self._excess.update(record_key("assignment", a) for a in over.excess)
        for node_id, reason in found.items():
            if self._overcommitted.get(node_id) != reason:
                log.warning("node %s is over-committed: %s; moving them where another node has room", node_id,
                            reason)  # fmt: skip
        for node_id in self._overcommitted.keys() - found.keys():
            log.info("node %s is no longer over-committed", node_id)
        self._overcommitted = found

    def replica_of(self, assignment: node_pb2.Assignment) -> node_pb2.Replica | None:
        node = self._fleet.nodes.get(assignment.node_id)
        if node is None:
            return None
        return next((r for r in node.replicas if r.model.name == assignment.model.name and r.assigned), None)

    # --- writes (applied to the view at once, so the next decision sees them) -------------------------

    async def _assign(self, deployment: node_pb2.Deployment) -> node_pb2.Assignment:
        verdict = placement.place(deployment.spec, self.snapshots(), self.policy)
        assert verdict.fit is not None
        assignment = node_pb2.Assignment(
            node_id=verdict.node_id,
            model=deployment.spec,
            device=verdict.fit.device,
            gpu_indices=verdict.fit.gpu_indices,
            memory_bytes=verdict.fit.memory_bytes,
            assigned_at=_now(),
        )
        await self._store.put("assignment", assignment, fence=self.fence())
        self._fleet.assignments[record_key("assignment", assignment)] = assignment
        log.info("placed %s on %s (%s)", deployment.spec.name, verdict.node_id, verdict.reason)
        return assignment

    async def _unassign(self, assignment: node_pb2.Assignment, why: str) -> None:
        key = record_key("assignment", assignment)
        await self._store.delete("assignment", key, fence=self.fence())
        self._fleet.assignments.pop(key, None)
        log.info("removed %s from %s: %s", assignment.model.name, assignment.node_id, why)

    async def save_deployment(self, deployment: node_pb2.Deployment) -> None:
        name = deployment.spec.name
        await self._store.put("deployment", deployment, fence=self.fence())
        self._fleet.deployments[name] = deployment
        if name in self._fleet.records["undeployed"]:  # deployed again: an undeploy no longer stands
            await self._store.delete("undeployed", name, fence=self.fence())
            self._fleet.records["undeployed"].pop(name, None)

    async def remove_deployment(self, name: str) -> None:
        """Undeploy: the deployment goes, and a record of it stays (`undeployed/{name}`), so that a
        deployments file whose entry for it has not changed since does not bring it back at the next start."""
        deployment = self._fleet.deployments.get(name)
        if deployment is not None:  # written first: a deployment that outlives it is only undeployed again
            record = node_pb2.UndeployedDeployment(deployment=deployment, undeployed_at=_now())
            await self._store.put("undeployed", record, fence=self.fence())
            self._fleet.records["undeployed"][name] = record
        await self._store.delete("deployment", name, fence=self.fence())
        self._fleet.deployments.pop(name, None)

    # --- the pass -------------------------------------------------------------------------------------

    async def ensure_one(self, name: str) -> None:
        """Scale from zero: make sure a deployment has at least one replica assigned. Raises the
        placement error (NO_CAPACITY, FORMAT_NOT_SUPPORTED) when it fits nowhere."""
        async with self._lock:
            deployment = self._fleet.deployments.get(name)
            if deployment is None:
                return
            if not any(a.model.name == name for a in self._fleet.assignments.values()):
                await self._assign(deployment)
            if deployment.replicas < 1:
                updated = node_pb2.Deployment()
                updated.CopyFrom(deployment)
                updated.replicas = 1
                await self.save_deployment(updated)

    async def reconcile(self) -> None:
        async with self._lock:
            metrics.RECONCILE_PASSES.inc()
            await self._reconcile()

    async def _reconcile(self) -> None:
        fleet = self._fleet
        for assignment in list(fleet.assignments.values()):
            deployment = fleet.deployments.get(assignment.model.name)
            if assignment.node_id not in fleet.nodes:
                await self._unassign(assignment, "node is gone")
            elif deployment is None:
                await self._unassign(assignment, "deployment removed")
            # A replica of a changed deployment is replaced by _reconcile_deployment, a few at a time.
        self._find_excess()
        for deployment in list(fleet.deployments.values()):
            await self._reconcile_deployment(deployment)

    async def _reconcile_deployment(self, deployment: node_pb2.Deployment) -> None:
        fleet = self._fleet
        name = deployment.spec.name
        mine = [a for a in fleet.assignments.values() if a.model.name == name]
        draining = [a for a in mine if fleet.scheduling(a.node_id) == node_pb2.SCHEDULING_DRAINING]
        # On a node that holds more than fits: replaced elsewhere, where there is room, then removed.
        moving = [a for a in mine if record_key("assignment", a) in self._excess]
        active = [a for a in mine if a not in draining and a not in moving]

        # Idle unload, one replica per pass, never below min_replicas.
        timeout = deployment.idle_timeout.ToTimedelta().total_seconds()
        if timeout > 0 and deployment.replicas > deployment.min_replicas:
            now = time.time()
            for assignment in active:
                replica = self.replica_of(assignment)
                if replica is None or replica.state != READY:
                    continue
                if not fleet.load.fresh(assignment.node_id):
                    # Its load is not heard here (it reports to another control plane): the record's
                    # last_request_at is as old as its last durable change, so "idle" would be a guess.
                    continue
                busy = replica.running_requests + replica.queued_requests
                idle_for = now - replica.last_request_at.ToMicroseconds() / 1e6
                if not busy and idle_for > timeout:
                    updated = node_pb2.Deployment()
                    updated.CopyFrom(deployment)
                    updated.replicas = deployment.replicas - 1
                    await self.save_deployment(updated)
                    await self._unassign(assignment, f"idle for {idle_for:.0f}s (idle_timeout {timeout:g}s)")
                    deployment = updated
                    active.remove(assignment)
                    break

        want = max(deployment.min_replicas, min(deployment.replicas, deployment.max_replicas))
        # A changed deployment: replicas of an older spec serve until new ones are ready to take their place.
        current = [a for a in active if a.model == deployment.spec]
        outdated = [a for a in active if a.model != deployment.spec]
        for assignment in [a for a in outdated if not self._serving(a)]:
            await self._unassign(assignment, "deployment changed (it was not serving)")
            outdated.remove(assignment)
        try:
            for _ in range(max(0, want - len(current))):
                if outdated and not self._fits(deployment.spec):
                    break  # no room beside the old replicas: new ones take their places, a few at a time
                current.append(await self._assign(deployment))
            await self._replace_in_place(deployment, want, current, outdated)
            self.last_errors.pop(name, None)
        except StoreUnavailable:
            raise  # etcd away: not a reason this deployment fits nowhere
        except FleetError as error:
            if self.last_errors.get(name) != error.message:
                # No node at all is what every start (before the first node registers) and every clean stop
                # of the last node look like: said, not warned of (`fleetlm status` and the alert rules show
                # a deployment left without replicas); a fleet whose nodes cannot take it is a warning.
                empty = error.code == ErrorCode.MODEL_UNAVAILABLE
                log.log(logging.INFO if empty else logging.WARNING, "cannot place %s: %s", name, error.message)
            self.last_errors[name] = error.message
        for extra in sorted(current, key=self._removal_order)[: max(0, len(current) - want)]:
            await self._unassign(extra, f"scaled down to {want}")
            current.remove(extra)
        # An old replica goes once a new one serves in its stead.
        needed = max(0, want - sum(1 for a in current if self._serving(a)))
        for old in sorted(outdated, key=self._removal_order)[: max(0, len(outdated) - needed)]:
            await self._unassign(old, "deployment changed; a replica of the new spec serves in its stead")
            outdated.remove(old)
        active = current + outdated

        # A replica beyond what its node holds goes once the deployment's count serves elsewhere: its
        # replacement was placed above when another node had room. With none it stays where it is (fewer
        # replicas is not what the operator asked for), and its node shows as over-committed.
        if moving and sum(1 for a in current if self._serving(a)) >= want:
            for assignment in moving:
                await self._unassign(assignment, "its node has too little memory for it now; it serves elsewhere")

        # A draining replica goes once the replicas placed elsewhere serve: its replacement too, when there
        # was room for one (it was placed above), so the deployment keeps its count through the move; when
        # there was none, once one other serves, and the deployment runs short until there is room
        # (fleetlm status says why).
        ready_elsewhere = sum(1 for a in active if self._serving(a))
        needed = max(min(1, want), min(want, len(active)))  # scaled to zero: nothing to wait for
        for assignment in draining:
            if ready_elsewhere >= needed:
                await self._unassign(
                    assignment, f"node is draining; {ready_elsewhere} replica(s) ready elsewhere, {len(active)} placed"
                )

    def _fits(self, spec: node_pb2.ModelSpec, skip: node_pb2.Assignment | None = None) -> bool:
        """Would one more replica fit somewhere (as if `skip` were gone)? Asked, not placed: not counted
        as a placement failure."""
        verdicts = placement.evaluate(spec, self.snapshots(skip=skip), self.policy)
        return bool(verdicts) and verdicts[0].fit is not None

    def _serving(self, assignment: node_pb2.Assignment) -> bool:
        """Its node reports it ready with this very spec (a replica changed in place reports the old one
        ready until its node has taken in the change)."""
        replica = self.replica_of(assignment)
        return replica is not None and replica.state == READY and replica.model == redact_spec(assignment.model)

    async def _replace_in_place(
        self,
        deployment: node_pb2.Deployment,
        want: int,
        current: list[node_pb2.Assignment],
        outdated: list[node_pb2.Assignment],
    ) -> None:
        """Where there was no room beside them: an old replica gives its place to a new one, while no more
        than a quarter of `want` (at least one) new replicas are loading. Only an old replica whose removal
        lets the new spec be placed goes; FleetError when none does."""
        budget = max(1, want // 4)
        while len(current) < want and outdated and sum(1 for a in current if not self._serving(a)) < budget:
            spec = deployment.spec
            old = next((o for o in sorted(outdated, key=self._removal_order) if self._fits(spec, skip=o)), None)
            if old is None:  # the new spec fits in no old replica's place: the old ones go on serving
                placement.place(spec, self.snapshots(without=spec.name), self.policy)  # raises the reasons
                return
            await self._unassign(old, "deployment changed; replaced by a replica of the new spec")
            outdated.remove(old)
            current.append(await self._assign(deployment))

    def _removal_order(self, assignment: node_pb2.Assignment) -> tuple[int, int]:
        # Remove replicas that are not serving first, then the least busy.
        replica = self.replica_of(assignment)
        if replica is None or replica.state != READY:
            return (0, 0)
        return (1, replica.running_requests + replica.queued_requests)
