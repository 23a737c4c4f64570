"""The rollout state machine: a pure function over what the controller knows and the clock.

Shaped like ``edge_agent.batching.collate``: frozen dataclasses in, a decision out (the new state, the
commands to carry out, when to look again), no I/O. The controller feeds it observations of its nodes,
executes the actions (publish ``desired``, record the outcome), saves the state and calls it again on
the next observation or at ``wake_at``.

A rollout takes the nodes that match a selector, in node-id order, through cumulative waves. Each node
goes ``pending -> desired_sent -> installed -> ready -> baked``; it leaves that path as ``failed``,
``skipped`` or ``rolled_back``. A wave starts when every node of the waves before it has settled
(baked, skipped, or failed within ``max_failed``). A gate broken during a bake fails the rollout, and
every node it touched is told to run its previous artifact again. A node that leaves the rollout without
baking (failed or skipped) is told the same, so each node ends on the new artifact only after it has
shown it healthy, or on what it had.

Pause holds back new work (no node is sent its desired state, no wave starts); nodes already in flight
are still watched, their gates and timeouts still apply, because a bad artifact stays bad while paused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from typing import Any, NamedTuple

from quantize.planner import Workload, gib, plan_variants
from quantize.profiles import profile_from_facts
from quantize.specs import Z_IMAGE_TURBO, ModelSpec
from quantize.variants import VariantRecipe
from zimage_edge.device import DeviceFacts

# The format of ``RolloutState.to_dict``; a stored state of another version is refused, not guessed at.
STATE_VERSION = 1


class OnTimeout(StrEnum):
    FAIL = "fail"  # counts against max_failed
    SKIP = "skip"  # leaves the rollout without counting: the node is dealt with later


class NodePhase(StrEnum):
    PENDING = "pending"
    DESIRED_SENT = "desired_sent"
    INSTALLED = "installed"
    READY = "ready"
    BAKED = "baked"
    FAILED = "failed"
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"


class RolloutStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


# Between being told and being ready: these count against max_unavailable.
UNAVAILABLE = frozenset({NodePhase.DESIRED_SENT, NodePhase.INSTALLED})
IN_FLIGHT = UNAVAILABLE | {NodePhase.READY}
# Nodes whose desired state this rollout changed and has not yet put back.
TOUCHED = IN_FLIGHT | {NodePhase.BAKED}
SETTLED = frozenset({NodePhase.BAKED, NodePhase.SKIPPED, NodePhase.FAILED})
ACTIVE = frozenset({RolloutStatus.RUNNING, RolloutStatus.PAUSED})


@dataclass(frozen=True)
class Gates:
    """Limits on a node's telemetry during its bake; None: not checked."""

    max_error_rate: float | None = None
    max_p95_ms: float | None = None

    @property
    def active(self) -> bool:
        return self.max_error_rate is not None or self.max_p95_ms is not None

    def breach(self, sample: Telemetry) -> str | None:
        """Why ``sample`` breaks a gate, or None. A metric the sample lacks is not judged."""
        if (
            self.max_error_rate is not None
            and sample.error_rate is not None
            and sample.error_rate > self.max_error_rate
        ):
            return f"error rate {sample.error_rate:g} above the gate of {self.max_error_rate:g}"
        if self.max_p95_ms is not None and sample.p95_ms is not None and sample.p95_ms > self.max_p95_ms:
            return f"p95 latency {sample.p95_ms:g} ms above the gate of {self.max_p95_ms:g} ms"
        return None


Wave = int | str  # a cumulative node count (1) or a cumulative share of the selected nodes ("10%")


def _wave_fraction(wave: Wave) -> Fraction | None:
    """The share a ``"N%"`` wave stands for (exact, so 10% of 30 is 3, not 3.0000000000000004 -> 4)."""
    if isinstance(wave, bool) or not isinstance(wave, int | str):
        raise ValueError(f"wave {wave!r} is neither a node count nor a percentage")
    if isinstance(wave, int):
        if wave < 1:
            raise ValueError(f"wave {wave} must be at least 1 node")
        return None
    text = wave.strip()
    if not text.endswith("%"):
        raise ValueError(f"wave {wave!r} must be a node count (1) or a percentage ('10%')")
    try:
        share = Fraction(text[:-1]) / 100
    except ValueError:
        raise ValueError(f"wave {wave!r} is not a percentage") from None
    if not 0 < share <= 1:
        raise ValueError(f"wave {wave!r} must be above 0% and at most 100%")
    return share


def wave_bounds(waves: Sequence[Wave], count: int) -> tuple[int, ...]:
    """Cumulative node counts at the end of each wave, for ``count`` selected nodes.

    Counts never go down (a later wave smaller than an earlier one is already covered, which happens
    when counts and percentages mix on a small fleet), empty waves are dropped, and the last wave always
    takes every node: waves are checkpoints on the way to the whole selection, not a stopping point.
    """
    bounds: list[int] = []
    for wave in waves:
        share = _wave_fraction(wave)
        size = math.ceil(share * count) if share is not None else int(wave)
        size = max(min(size, count), bounds[-1] if bounds else 0)
        if size and (not bounds or size > bounds[-1]):
            bounds.append(size)
    if count and (not bounds or bounds[-1] < count):
        bounds.append(count)
    return tuple(bounds)


@dataclass(frozen=True)
class RolloutSpec:
    """What an operator asked for (``fleet rollout create``)."""

    release: str
    selector: dict[str, str] = field(default_factory=dict)  # labels a node must all have; empty: every node
    waves: tuple[Wave, ...] = ("100%",)
    # Two minutes of healthy serving catches an artifact that loads but fails or slows under real
    # requests, at the cost of a few minutes per wave; operators with busy nodes may shorten it.
    bake_s: float = 120.0
    gates: Gates = field(default_factory=Gates)
    max_unavailable: int = 1
    # Ten minutes covers a 20 GiB download at ~35 MB/s plus load and warm-up; a slower site link needs
    # more. Timers restart at each phase, so this bounds each step of a node, not the whole node.
    node_timeout_s: float = 600.0
    on_timeout: OnTimeout = OnTimeout.FAIL
    # Nodes that may fail (timeouts with on_timeout=fail, refused installs) before the rollout fails.
    max_failed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "waves", tuple(self.waves))
        object.__setattr__(self, "on_timeout", OnTimeout(self.on_timeout))
        if not self.release:
            raise ValueError("a rollout needs a release")
        if not self.waves:
            raise ValueError("a rollout needs at least one wave")
        for wave in self.waves:
            _wave_fraction(wave)
        if self.bake_s < 0:
            raise ValueError("bake_s must not be negative")
        if self.max_unavailable < 1:
            raise ValueError("max_unavailable must be at least 1, or nothing would ever start")
        if self.node_timeout_s <= 0:
            raise ValueError("node_timeout_s must be positive")
        if self.max_failed < 0:
            raise ValueError("max_failed must not be negative")

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.selector.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "selector": dict(self.selector),
            "waves": list(self.waves),
            "bake_s": self.bake_s,
            "gates": {"max_error_rate": self.gates.max_error_rate, "max_p95_ms": self.gates.max_p95_ms},
            "max_unavailable": self.max_unavailable,
            "node_timeout_s": self.node_timeout_s,
            "on_timeout": str(self.on_timeout),
            "max_failed": self.max_failed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        return cls(
            release=data["release"],
            selector=dict(data["selector"]),
            waves=tuple(data["waves"]),
            bake_s=data["bake_s"],
            gates=Gates(**data["gates"]),
            max_unavailable=data["max_unavailable"],
            node_timeout_s=data["node_timeout_s"],
            on_timeout=OnTimeout(data["on_timeout"]),
            max_failed=data["max_failed"],
        )


@dataclass(frozen=True)
class Target:
    """What one node is to run: a variant of the release and that variant's artifact id."""

    variant: str
    artifact: str


@dataclass(frozen=True)
class NoTarget:
    """Why a node gets nothing from this release (e.g. no variant fits it)."""

    reason: str


@dataclass(frozen=True)
class Telemetry:
    """The latest telemetry of a node that the gates judge."""

    at: float  # when the controller received it, on the controller's (injected) clock
    error_rate: float | None = None
    p95_ms: float | None = None
    # The artifact the agent was serving when it measured this; a sample of another artifact (e.g. one
    # buffered in the node's outbox from before the swap) says nothing about the new one.
    artifact: str | None = None


@dataclass(frozen=True)
class NodeObservation:
    """What the controller knows of one node now (from its registry)."""

    node: str
    labels: dict[str, str] = field(default_factory=dict)
    online: bool = False
    reported_generation: int = 0  # the last desired generation the node says it applied
    desired_generation: int = 0  # the last generation the controller sent it (new ones go above both)
    artifact: str | None = None  # the artifact it runs
    ready: bool = False  # its agent's /readyz
    # The highest generation the node gave up on (a refused download, a failed verify or swap), and
    # why; it keeps serving ``artifact``. Without it a refusal would only show as a timeout.
    failed_generation: int = 0
    error: str | None = None
    telemetry: Telemetry | None = None
    last_seen: float | None = None


@dataclass(frozen=True)
class NodeState:
    node: str
    target: Target | None  # None: the node gets nothing from this release (it is skipped)
    phase: NodePhase = NodePhase.PENDING
    since: float | None = None  # when the node entered its phase: the timers start there
    generation: int | None = None  # the desired generation that carries the target
    previous: str | None = None  # the artifact it ran before (None: none), what a rollback restores
    rollback_generation: int | None = None  # set once the node was told to run ``previous`` again
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        target = self.target
        return {
            "node": self.node,
            "target": {"variant": target.variant, "artifact": target.artifact} if target else None,
            "phase": str(self.phase),
            "since": self.since,
            "generation": self.generation,
            "previous": self.previous,
            "rollback_generation": self.rollback_generation,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeState:
        target = data["target"]
        return cls(
            node=data["node"],
            target=Target(**target) if target is not None else None,
            phase=NodePhase(data["phase"]),
            since=data["since"],
            generation=data["generation"],
            previous=data["previous"],
            rollback_generation=data["rollback_generation"],
            reason=data["reason"],
        )


@dataclass(frozen=True)
class RolloutState:
    id: str
    spec: RolloutSpec
    nodes: tuple[NodeState, ...]  # the selected nodes in wave order (node id)
    bounds: tuple[int, ...]  # cumulative node count at the end of each wave
    created_at: float
    updated_at: float
    wave: int = 0  # the wave in progress; len(bounds) once every wave is done
    status: RolloutStatus = RolloutStatus.RUNNING
    reason: str = ""

    def node(self, node: str) -> NodeState:
        return next(state for state in self.nodes if state.node == node)

    def counts(self) -> dict[NodePhase, int]:
        """Nodes per phase (every phase present), for status pages and metrics."""
        counts = dict.fromkeys(NodePhase, 0)
        for state in self.nodes:
            counts[state.phase] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "id": self.id,
            "spec": self.spec.to_dict(),
            "nodes": [state.to_dict() for state in self.nodes],
            "bounds": list(self.bounds),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "wave": self.wave,
            "status": str(self.status),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"rollout state version {data.get('version')!r} is not {STATE_VERSION}")
        return cls(
            id=data["id"],
            spec=RolloutSpec.from_dict(data["spec"]),
            nodes=tuple(NodeState.from_dict(state) for state in data["nodes"]),
            bounds=tuple(data["bounds"]),
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            wave=data["wave"],
            status=RolloutStatus(data["status"]),
            reason=data["reason"],
        )


# What the controller carries out, in order.


@dataclass(frozen=True)
class SetDesired:
    """Publish ``desired`` for the node: run this artifact of the release, as this generation."""

    node: str
    release: str
    variant: str
    artifact: str
    generation: int


@dataclass(frozen=True)
class Rollback:
    """Publish ``desired`` for the node: run ``artifact`` again (None: it ran none; clear its model)."""

    node: str
    artifact: str | None
    generation: int


@dataclass(frozen=True)
class Finish:
    """Every node of the rollout has settled and the rollout succeeded."""

    rollout: str


@dataclass(frozen=True)
class Fail:
    """The rollout failed; the touched nodes' rollbacks come before this action."""

    rollout: str
    reason: str


Action = SetDesired | Rollback | Finish | Fail


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    actions: tuple[Action, ...]
    wake_at: float | None  # when to step again if nothing is observed before (None: nothing to wait for)


def start(
    rollout_id: str,
    spec: RolloutSpec,
    observations: Mapping[str, NodeObservation],
    targets: Mapping[str, Target | NoTarget],
    now: float,
) -> RolloutState:
    """A new rollout over the nodes ``spec`` selects, each to get its target (chosen by the planner).

    The selection is fixed here: a node that registers later joins the next rollout, not this one.
    A selected node without a target is skipped with the reason given.
    """
    selected = sorted(node for node, obs in observations.items() if spec.selects(obs.labels))
    nodes = []
    for node in selected:
        target = targets.get(node, NoTarget("no variant was chosen for this node"))
        if isinstance(target, NoTarget):
            nodes.append(NodeState(node, None, NodePhase.SKIPPED, since=now, reason=target.reason))
        else:
            nodes.append(NodeState(node, target))
    return RolloutState(
        id=rollout_id,
        spec=spec,
        nodes=tuple(nodes),
        bounds=wave_bounds(spec.waves, len(nodes)),
        created_at=now,
        updated_at=now,
    )


def _drop(state: NodeState, spec: RolloutSpec, reason: str, now: float) -> NodeState:
    """The node timed out (or left the registry): failed or skipped, as the spec says."""
    phase = NodePhase.SKIPPED if spec.on_timeout is OnTimeout.SKIP else NodePhase.FAILED
    return replace(state, phase=phase, since=now, reason=reason)


# One transition of an in-flight node per phase: (state, observation, spec, now) -> (state, gate breach or "").
_Watch = Callable[[NodeState, NodeObservation | None, RolloutSpec, float], tuple[NodeState, str]]


def _applied(state: NodeState, obs: NodeObservation | None) -> bool:
    """The node says it applied this rollout's generation (or a later one)."""
    assert state.generation is not None
    return obs is not None and obs.reported_generation >= state.generation


def _watch_sent(state: NodeState, obs: NodeObservation | None, spec: RolloutSpec, now: float) -> tuple[NodeState, str]:
    assert state.target is not None
    assert state.since is not None
    if obs is not None and _applied(state, obs):
        if obs.artifact == state.target.artifact:
            return replace(state, phase=NodePhase.INSTALLED, since=now), ""
        why = obs.error or f"it runs {obs.artifact} instead of the target"
        reason = f"applied generation {obs.reported_generation} but did not install: {why}"
        return replace(state, phase=NodePhase.FAILED, since=now, reason=reason), ""
    assert state.generation is not None
    if obs is not None and obs.failed_generation >= state.generation:
        reason = f"refused generation {obs.failed_generation}: {obs.error or 'no reason given'}"
        return replace(state, phase=NodePhase.FAILED, since=now, reason=reason), ""
    if now >= state.since + spec.node_timeout_s:
        reason = f"did not report generation {state.generation} within {spec.node_timeout_s:g} s"
        return _drop(state, spec, reason, now), ""
    return state, ""


def _swapped_away(state: NodeState, obs: NodeObservation | None, now: float) -> NodeState | None:
    """Failed if the node, having installed the target, now runs something else."""
    assert state.target is not None
    if obs is None or not _applied(state, obs) or obs.artifact == state.target.artifact:
        return None
    reason = f"stopped running the target (now runs {obs.artifact}): {obs.error or 'no reason given'}"
    return replace(state, phase=NodePhase.FAILED, since=now, reason=reason)


def _watch_installed(
    state: NodeState, obs: NodeObservation | None, spec: RolloutSpec, now: float
) -> tuple[NodeState, str]:
    assert state.since is not None
    if (failed := _swapped_away(state, obs, now)) is not None:
        return failed, ""
    if obs is not None and obs.online and obs.ready:
        return replace(state, phase=NodePhase.READY, since=now), ""
    if now >= state.since + spec.node_timeout_s:
        return _drop(state, spec, f"installed but not ready within {spec.node_timeout_s:g} s", now), ""
    return state, ""


def _watch_ready(state: NodeState, obs: NodeObservation | None, spec: RolloutSpec, now: float) -> tuple[NodeState, str]:
    """Baking: healthy and inside the gates from ``since`` for ``bake_s``."""
    assert state.target is not None
    assert state.since is not None
    if (failed := _swapped_away(state, obs, now)) is not None:
        return failed, ""
    if obs is None or not obs.online or not obs.ready:
        # Lost while baking (offline, agent not ready): the bake starts again once it is ready, and the
        # node has node_timeout to get there, so a node that went away cannot stall the rollout.
        return replace(state, phase=NodePhase.INSTALLED, since=now), ""
    sample = obs.telemetry
    if sample is None or sample.at < state.since or sample.artifact not in (None, state.target.artifact):
        sample = None  # nothing measured on the target since the bake began
    elif breach := spec.gates.breach(sample):
        return replace(state, phase=NodePhase.FAILED, since=now, reason=f"gate: {breach}"), breach
    bake_end = state.since + spec.bake_s
    # With gates, a sample from the end of the bake shows the node healthy through it; without gates,
    # being ready for the whole bake is the test.
    proven = not spec.gates.active or (sample is not None and sample.at >= bake_end)
    if now >= bake_end and proven:
        return replace(state, phase=NodePhase.BAKED, since=now), ""
    if now >= bake_end + spec.node_timeout_s:
        return _drop(state, spec, f"no telemetry within {spec.node_timeout_s:g} s after its bake ended", now), ""
    return state, ""


_WATCH: dict[NodePhase, _Watch] = {
    NodePhase.DESIRED_SENT: _watch_sent,
    NodePhase.INSTALLED: _watch_installed,
    NodePhase.READY: _watch_ready,
}


def _watch(state: NodeState, obs: NodeObservation | None, spec: RolloutSpec, now: float) -> tuple[NodeState, str]:
    """Every transition one observation allows (a node may be seen installed and ready at once)."""
    while state.phase in IN_FLIGHT:
        new, breach = _WATCH[state.phase](state, obs, spec, now)
        if new == state or breach:
            return new, breach
        state = new
    return state, ""


def _deadline(state: NodeState, spec: RolloutSpec, now: float) -> float | None:
    """When the node's timer next runs out: its timeout, or the end of its bake."""
    if state.phase not in IN_FLIGHT or state.since is None:
        return None
    if state.phase is NodePhase.READY:
        bake_end = state.since + spec.bake_s
        return bake_end if now < bake_end else bake_end + spec.node_timeout_s
    return state.since + spec.node_timeout_s


def _rollback(state: NodeState, phase: NodePhase, now: float) -> tuple[NodeState, Rollback]:
    assert state.generation is not None
    generation = state.generation + 1
    new = replace(state, phase=phase, since=now, rollback_generation=generation)
    return new, Rollback(state.node, state.previous, generation)


def _end(
    state: RolloutState, nodes: list[NodeState], status: RolloutStatus, reason: str, now: float
) -> tuple[RolloutState, list[Action]]:
    """Fail or abort: every touched node is told to run its previous artifact again."""
    actions: list[Action] = []
    for index, node in enumerate(nodes):
        if node.phase in TOUCHED:
            nodes[index], action = _rollback(node, NodePhase.ROLLED_BACK, now)
            actions.append(action)
    if status is RolloutStatus.FAILED:
        actions.append(Fail(state.id, reason))
    new = replace(state, nodes=tuple(nodes), status=status, reason=reason, updated_at=now)
    return new, actions


def _failure(nodes: Sequence[NodeState], breaches: Sequence[str], spec: RolloutSpec) -> str:
    """Why the rollout fails now, or ''."""
    if breaches:
        return "gate broken during bake: " + "; ".join(breaches)
    failed = [node for node in nodes if node.phase is NodePhase.FAILED]
    if len(failed) <= spec.max_failed:
        return ""
    listed = "; ".join(f"{node.node}: {node.reason}" for node in failed)
    return f"{len(failed)} node(s) failed, more than the {spec.max_failed} allowed: {listed}"


def _send(
    nodes: list[NodeState],
    members: range,
    spec: RolloutSpec,
    observations: Mapping[str, NodeObservation],
    now: float,
) -> list[Action]:
    """Tell pending nodes of the wave their target, keeping at most max_unavailable between told and ready."""
    actions: list[Action] = []
    unavailable = sum(nodes[index].phase in UNAVAILABLE for index in members)
    for index in members:
        node = nodes[index]
        if unavailable >= spec.max_unavailable:
            break
        if node.phase is not NodePhase.PENDING:
            continue
        assert node.target is not None
        obs = observations.get(node.node)
        if obs is None:
            # No generation to go above: the node left the registry.
            nodes[index] = _drop(node, spec, "not in the node registry", now)
            if nodes[index].phase is NodePhase.FAILED and _failure(nodes, (), spec):
                break
            continue
        generation = max(obs.desired_generation, obs.reported_generation) + 1
        nodes[index] = replace(
            node, phase=NodePhase.DESIRED_SENT, since=now, generation=generation, previous=obs.artifact
        )
        actions.append(SetDesired(node.node, spec.release, node.target.variant, node.target.artifact, generation))
        unavailable += 1
    return actions


def step(state: RolloutState, observations: Mapping[str, NodeObservation], now: float) -> Decision:
    """Advance the rollout from what is observed at ``now``; the actions are for the controller."""
    if state.status not in ACTIVE:
        return Decision(state, (), None)
    spec = state.spec
    nodes = list(state.nodes)
    actions: list[Action] = []
    breaches: list[str] = []
    for index, node in enumerate(nodes):
        if node.phase not in IN_FLIGHT:
            continue
        new, breach = _watch(node, observations.get(node.node), spec, now)
        if new.phase in (NodePhase.FAILED, NodePhase.SKIPPED):
            new, action = _rollback(new, new.phase, now)
            actions.append(action)
        if breach:
            breaches.append(f"node {node.node}: {breach}")
        nodes[index] = new

    wave, status = state.wave, state.status
    while status is RolloutStatus.RUNNING and not _failure(nodes, breaches, spec):
        if wave == len(state.bounds):
            status = RolloutStatus.SUCCEEDED
            actions.append(Finish(state.id))
            break
        members = range(state.bounds[wave - 1] if wave else 0, state.bounds[wave])
        actions.extend(_send(nodes, members, spec, observations, now))
        if not all(nodes[index].phase in SETTLED for index in members):
            break
        wave += 1

    if why := _failure(nodes, breaches, spec):
        ended, rollbacks = _end(replace(state, wave=wave), nodes, RolloutStatus.FAILED, why, now)
        return Decision(ended, (*actions, *rollbacks), None)
    new_state = replace(state, nodes=tuple(nodes), wave=wave, status=status)
    if new_state != state:
        new_state = replace(new_state, updated_at=now)
    deadlines = [deadline for node in nodes if (deadline := _deadline(node, spec, now)) is not None]
    return Decision(new_state, tuple(actions), min(deadlines, default=None))


def pause(state: RolloutState, now: float) -> RolloutState:
    """Hold back new work; in-flight nodes are still watched by ``step``. Pausing a paused rollout is a no-op."""
    if state.status is RolloutStatus.PAUSED:
        return state
    if state.status is not RolloutStatus.RUNNING:
        raise ValueError(f"rollout {state.id} is {state.status}; only a running rollout can be paused")
    return replace(state, status=RolloutStatus.PAUSED, updated_at=now)


def resume(state: RolloutState, now: float) -> RolloutState:
    """Let new work start again at the next ``step``. Resuming a running rollout is a no-op."""
    if state.status is RolloutStatus.RUNNING:
        return state
    if state.status is not RolloutStatus.PAUSED:
        raise ValueError(f"rollout {state.id} is {state.status}; only a paused rollout can be resumed")
    return replace(state, status=RolloutStatus.RUNNING, updated_at=now)


def abort(state: RolloutState, now: float, reason: str = "aborted by the operator") -> Decision:
    """Stop the rollout and tell every node it touched to run its previous artifact again."""
    if state.status not in ACTIVE:
        raise ValueError(f"rollout {state.id} is {state.status}; only a running or paused rollout can be aborted")
    ended, actions = _end(state, list(state.nodes), RolloutStatus.ABORTED, reason, now)
    return Decision(ended, tuple(actions), None)


# Choosing the variant for a node.


@dataclass(frozen=True)
class ReleaseVariant:
    """One variant of a release, as the planner needs it: its recipe, its artifact and its size."""

    recipe: VariantRecipe
    artifact: str
    bytes: int
    # The variant's own parameter counts when they are not the release model's (a distilled student).
    model: ModelSpec | None = None

    @property
    def name(self) -> str:
        return self.recipe.name


class VariantChoice(NamedTuple):
    variant: str | None  # None: nothing in the release suits the node
    explanation: str


def choose_variant(
    facts: DeviceFacts,
    variants: Sequence[ReleaseVariant],
    pinned: str | None = None,
    workload: Workload | None = None,
    model: ModelSpec = Z_IMAGE_TURBO,
) -> VariantChoice:
    """The best variant of the release that fits the node, per ``quantize.planner.plan``, explained.

    ``facts.free_memory`` is the memory the model may have, so the node must report it as measured
    without its own model loaded (or every swap would look tighter than it is). A pinned variant wins
    over the planner if the release has it; the explanation says whether the planner expects it to fit.
    """
    by_name = {variant.name: variant for variant in variants}
    if not by_name:
        return VariantChoice(None, "the release has no variants")
    candidates = [(variant.recipe, variant.model or model) for variant in variants]
    result = plan_variants(profile_from_facts(facts), workload, candidates, model)
    if pinned is not None:
        if pinned not in by_name:
            return VariantChoice(
                None, f"pinned variant {pinned!r} is not in the release ({', '.join(sorted(by_name))})"
            )
        fit = next((row for row in result.rows if row.variant == pinned and row.fits), None)
        if fit is not None:
            why = f"the planner expects it to fit with placement {fit.placement} ({gib(fit.margin_bytes)} spare)"
        else:
            # Like Plan.explain: the nearest miss among placements the device could use at all.
            rows = [row for row in result.rows if row.variant == pinned]
            short = [row for row in rows if row.reason.startswith("short")] or rows
            closest = max(short, key=lambda row: row.margin_bytes)
            why = f"the planner expects it not to fit (closest: {closest.placement}, {closest.reason})"
        return VariantChoice(pinned, f"{pinned} pinned by the operator; {why}")
    if result.choice is None:
        return VariantChoice(None, result.explain())
    chosen = by_name[result.choice.variant]
    return VariantChoice(chosen.name, f"{result.explain()}; its artifact is {gib(chosen.bytes)}")
