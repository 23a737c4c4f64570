"""The rollout state machine, driven by hand with an injected clock: no broker, no database, no sleeps."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from fleet.rollout import (
    Action,
    Fail,
    Finish,
    Gates,
    NodeObservation,
    NodePhase,
    NoTarget,
    OnTimeout,
    ReleaseVariant,
    Rollback,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    SetDesired,
    Target,
    Telemetry,
    abort,
    choose_variant,
    pause,
    resume,
    start,
    step,
    wave_bounds,
)
from quantize.planner import Workload, estimate
from quantize.profiles import PROFILES
from quantize.specs import Z_IMAGE_TURBO
from quantize.variants import VARIANTS

OLD = "0" * 64  # the artifact every node runs before the rollout
TIMEOUT = 600.0
BAKE = 120.0


def artifact_of(variant: str) -> str:
    return hashlib.sha256(variant.encode()).hexdigest()


class Fleet:
    """The controller's view of simulated nodes; the test says what each node does and when."""

    def __init__(self, *nodes: str, labels: dict[str, str] | None = None) -> None:
        self.obs = {
            node: NodeObservation(
                node, labels=dict(labels or {"site": "a"}), online=True, reported_generation=4,
                desired_generation=4, artifact=OLD, ready=True,
            )
            for node in nodes
        }  # fmt: skip

    def carry_out(self, actions: tuple[Action, ...]) -> None:
        """What the controller records when it publishes a desired state."""
        for action in actions:
            if isinstance(action, SetDesired | Rollback):
                self.obs[action.node] = replace(self.obs[action.node], desired_generation=action.generation)

    def installs(self, node: str, artifact: str, ready: bool = True) -> None:
        obs = self.obs[node]
        self.obs[node] = replace(obs, reported_generation=obs.desired_generation, artifact=artifact, ready=ready)

    def refuses(self, node: str, error: str) -> None:
        """The node gives up on its desired generation and keeps serving what it had."""
        obs = self.obs[node]
        self.obs[node] = replace(obs, failed_generation=obs.desired_generation, error=error)

    def sample(self, node: str, at: float, error_rate: float = 0.0, p95_ms: float = 900.0) -> None:
        artifact = self.obs[node].artifact
        telemetry = Telemetry(at=at, error_rate=error_rate, p95_ms=p95_ms, artifact=artifact)
        self.obs[node] = replace(self.obs[node], telemetry=telemetry)

    def offline(self, node: str) -> None:
        self.obs[node] = replace(self.obs[node], online=False)


TARGETS = {
    "n1": Target("int4", artifact_of("int4")),
    "n2": Target("int8", artifact_of("int8")),
    "n3": Target("bf16", artifact_of("bf16")),
    "n4": Target("bf16", artifact_of("bf16")),
    "n5": Target("bf16", artifact_of("bf16")),
}


def spec(**overrides: object) -> RolloutSpec:
    values: dict[str, object] = {
        "release": "r1", "selector": {"site": "a"}, "waves": (1, "100%"), "bake_s": BAKE,
        "gates": Gates(max_error_rate=0.05, max_p95_ms=5000.0), "max_unavailable": 1, "node_timeout_s": TIMEOUT,
    }  # fmt: skip
    values.update(overrides)
    return RolloutSpec(**values)  # type: ignore[arg-type]


def begin(fleet: Fleet, rollout_spec: RolloutSpec, now: float = 0.0) -> RolloutState:
    return start("ro-1", rollout_spec, fleet.obs, TARGETS, now)


def run(fleet: Fleet, state: RolloutState, now: float) -> tuple[RolloutState, tuple[Action, ...]]:
    decision = step(state, fleet.obs, now)
    fleet.carry_out(decision.actions)
    return decision.state, decision.actions


def bake(fleet: Fleet, state: RolloutState, node: str, ready_at: float) -> tuple[RolloutState, tuple[Action, ...]]:
    """The node installs its target at ``ready_at``, serves within the gates, and its bake ends."""
    fleet.installs(node, TARGETS[node].artifact)
    state, _ = run(fleet, state, ready_at)
    assert state.node(node).phase is NodePhase.READY
    fleet.sample(node, ready_at + BAKE)
    return run(fleet, state, ready_at + BAKE)


def phases(state: RolloutState) -> dict[str, NodePhase]:
    return {node.node: node.phase for node in state.nodes}


def test_wave_bounds_are_cumulative_counts_over_the_selection() -> None:
    assert wave_bounds([1, "10%", "50%", "100%"], 1000) == (1, 100, 500, 1000)
    assert wave_bounds([1, "10%", "50%", "100%"], 3) == (1, 2, 3)  # 10% of 3 rounds up to the 1 already there
    assert wave_bounds(["10%"], 30) == (3, 30)  # exact: not 3.0000000000000004 rounded up to 4
    assert wave_bounds([5, "10%"], 20) == (5, 20)  # never smaller than a wave before; always ends with all
    assert wave_bounds([1, "100%"], 0) == ()


@pytest.mark.parametrize("wave", [0, "0%", "150%", "ten", True, 1.5])
def test_wave_specs_are_validated(wave: object) -> None:
    with pytest.raises(ValueError, match="wave"):
        RolloutSpec("r1", waves=(wave,))  # type: ignore[arg-type]


def test_start_selects_by_labels_in_node_id_order_and_skips_nodes_without_a_target() -> None:
    fleet = Fleet("n3", "n1", "n2")
    fleet.obs["x9"] = NodeObservation("x9", labels={"site": "b"})
    targets: dict[str, Target | NoTarget] = {
        "n1": TARGETS["n1"],
        "n2": NoTarget("nothing fits NVIDIA T4 16 GB"),
        "n3": TARGETS["n3"],
    }
    state = start("ro-1", spec(), fleet.obs, targets, 0.0)
    assert [node.node for node in state.nodes] == ["n1", "n2", "n3"]
    assert phases(state) == {"n1": NodePhase.PENDING, "n2": NodePhase.SKIPPED, "n3": NodePhase.PENDING}
    assert state.node("n2").reason == "nothing fits NVIDIA T4 16 GB"


def test_three_nodes_in_two_waves_converge_each_on_its_own_variant() -> None:
    fleet = Fleet("n1", "n2", "n3")
    state = begin(fleet, spec())
    state, actions = run(fleet, state, 0.0)
    assert actions == (SetDesired("n1", "r1", "int4", artifact_of("int4"), 5),)

    # Wave 1 is one node: nothing else starts until it has baked.
    state, actions = bake(fleet, state, "n1", ready_at=30.0)
    assert phases(state)["n1"] is NodePhase.BAKED
    assert actions == (SetDesired("n2", "r1", "int8", artifact_of("int8"), 5),)

    # n2 ready (baking) no longer counts as unavailable, so n3 is told at once.
    fleet.installs("n2", artifact_of("int8"))
    state, actions = run(fleet, state, 200.0)
    assert actions == (SetDesired("n3", "r1", "bf16", artifact_of("bf16"), 5),)
    fleet.sample("n2", 200.0 + BAKE)
    state, actions = run(fleet, state, 200.0 + BAKE)
    assert actions == ()
    assert state.status is RolloutStatus.RUNNING

    state, actions = bake(fleet, state, "n3", ready_at=400.0)
    assert actions == (Finish("ro-1"),)
    assert state.status is RolloutStatus.SUCCEEDED
    assert set(phases(state).values()) == {NodePhase.BAKED}
    assert {node: obs.artifact for node, obs in fleet.obs.items()} == {n: TARGETS[n].artifact for n in fleet.obs}
    assert step(state, fleet.obs, 1e9).actions == ()  # a finished rollout does nothing more


def test_at_most_max_unavailable_nodes_are_between_told_and_ready() -> None:
    fleet = Fleet("n1", "n2", "n3", "n4", "n5")
    state = begin(fleet, spec(waves=("100%",), max_unavailable=2))

    def unavailable() -> int:
        return sum(phase in (NodePhase.DESIRED_SENT, NodePhase.INSTALLED) for phase in phases(state).values())

    state, actions = run(fleet, state, 0.0)
    assert [a.node for a in actions if isinstance(a, SetDesired)] == ["n1", "n2"]
    state, actions = run(fleet, state, 1.0)
    assert actions == ()
    fleet.installs("n1", TARGETS["n1"].artifact, ready=False)  # installed, agent still warming up
    state, actions = run(fleet, state, 2.0)
    assert actions == ()
    assert unavailable() == 2
    fleet.installs("n1", TARGETS["n1"].artifact, ready=True)
    state, actions = run(fleet, state, 3.0)
    assert [a.node for a in actions if isinstance(a, SetDesired)] == ["n3"]
    assert unavailable() == 2


def test_a_gate_broken_during_bake_fails_the_rollout_and_rolls_back_touched_nodes_only() -> None:
    fleet = Fleet("n1", "n2", "n3", "n4")
    state = begin(fleet, spec())
    state, _ = run(fleet, state, 0.0)
    state, _ = bake(fleet, state, "n1", ready_at=10.0)
    fleet.installs("n2", TARGETS["n2"].artifact)
    state, actions = run(fleet, state, 200.0)  # n2 baking, n3 told, n4 still pending
    assert actions == (SetDesired("n3", "r1", "bf16", artifact_of("bf16"), 5),)

    fleet.sample("n2", at=230.0, error_rate=0.2)
    decision = step(state, fleet.obs, 230.0)
    state = decision.state
    assert state.status is RolloutStatus.FAILED
    assert "n2: error rate 0.2 above the gate of 0.05" in state.reason
    assert decision.actions == (
        Rollback("n2", OLD, 6),
        Rollback("n1", OLD, 6),
        Rollback("n3", OLD, 6),
        Fail("ro-1", state.reason),
    )
    assert phases(state) == {
        "n1": NodePhase.ROLLED_BACK, "n2": NodePhase.FAILED, "n3": NodePhase.ROLLED_BACK, "n4": NodePhase.PENDING,
    }  # fmt: skip
    assert decision.wake_at is None
    assert step(state, fleet.obs, 1e9).actions == ()


def test_telemetry_from_before_the_bake_does_not_judge_the_new_artifact() -> None:
    fleet = Fleet("n1")
    state = begin(fleet, spec(waves=("100%",)))
    state, _ = run(fleet, state, 0.0)
    fleet.installs("n1", TARGETS["n1"].artifact)
    # Received before the bake began, from a node that does not say which artifact it measured.
    fleet.obs["n1"] = replace(fleet.obs["n1"], telemetry=Telemetry(at=19.0, error_rate=0.9))
    state, _ = run(fleet, state, 20.0)
    assert phases(state)["n1"] is NodePhase.READY
    # Received during the bake, but measured on the old artifact (flushed late from the node's outbox).
    fleet.obs["n1"] = replace(fleet.obs["n1"], telemetry=Telemetry(at=30.0, error_rate=0.9, artifact=OLD))
    state, actions = run(fleet, state, 30.0)
    assert (actions, state.status) == ((), RolloutStatus.RUNNING)
    # The bake time has passed, but no sample of the new artifact proves it healthy yet: the next look
    # is when the node would time out.
    decision = step(state, fleet.obs, 20.0 + BAKE)
    assert decision.actions == ()
    assert phases(decision.state)["n1"] is NodePhase.READY
    assert decision.wake_at == 20.0 + BAKE + TIMEOUT
    fleet.sample("n1", at=20.0 + BAKE + 1)
    state, actions = run(fleet, decision.state, 20.0 + BAKE + 1)
    assert actions == (Finish("ro-1"),)


def test_a_new_generation_goes_above_what_was_sent_before() -> None:
    fleet = Fleet("n1")
    # An earlier desired state (generation 7) the node never applied: it was away.
    fleet.obs["n1"] = replace(fleet.obs["n1"], desired_generation=7)
    state, actions = run(fleet, begin(fleet, spec()), 0.0)
    assert actions == (SetDesired("n1", "r1", "int4", artifact_of("int4"), 8),)
    assert state.node("n1").previous == OLD


@pytest.mark.parametrize(
    ("on_timeout", "max_failed", "phase", "status"),
    [
        (OnTimeout.FAIL, 0, NodePhase.FAILED, RolloutStatus.FAILED),
        (OnTimeout.FAIL, 1, NodePhase.FAILED, RolloutStatus.SUCCEEDED),
        (OnTimeout.SKIP, 0, NodePhase.SKIPPED, RolloutStatus.SUCCEEDED),
    ],
)
def test_an_offline_node_times_out_instead_of_stalling_the_rollout(
    on_timeout: OnTimeout, max_failed: int, phase: NodePhase, status: RolloutStatus
) -> None:
    fleet = Fleet("n1", "n2")
    fleet.offline("n2")
    state = begin(fleet, spec(waves=("100%",), max_unavailable=2, on_timeout=on_timeout, max_failed=max_failed))
    decision = step(state, fleet.obs, 0.0)
    fleet.carry_out(decision.actions)
    assert decision.wake_at == TIMEOUT  # the controller knows when to look again, even if nothing arrives
    state, _ = bake(fleet, decision.state, "n1", ready_at=10.0)
    assert state.status is RolloutStatus.RUNNING

    just_before = step(state, fleet.obs, TIMEOUT - 0.001)
    assert just_before.actions == ()
    decision = step(state, fleet.obs, TIMEOUT)
    state = decision.state
    assert state.node("n2").phase is phase
    assert state.node("n2").reason == f"did not report generation 5 within {TIMEOUT:g} s"
    assert decision.actions[0] == Rollback("n2", OLD, 6)  # its desired state goes back to what it runs
    assert state.status is status
    if status is RolloutStatus.FAILED:
        assert decision.actions[1:] == (Rollback("n1", OLD, 6), Fail("ro-1", state.reason))
    else:
        assert decision.actions[1:] == (Finish("ro-1"),)
        assert state.node("n1").phase is NodePhase.BAKED


def test_a_node_that_refuses_the_install_fails_with_its_reason() -> None:
    fleet = Fleet("n1", "n2")
    state = begin(fleet, spec(waves=("100%",), max_failed=1))
    state, _ = run(fleet, state, 0.0)
    fleet.refuses("n1", "sha256 mismatch in transformer/model-00001.safetensors")
    state, actions = run(fleet, state, 50.0)
    assert state.node("n1").phase is NodePhase.FAILED
    assert "sha256 mismatch" in state.node("n1").reason
    assert actions == (Rollback("n1", OLD, 6), SetDesired("n2", "r1", "int8", artifact_of("int8"), 5))
    assert state.status is RolloutStatus.RUNNING  # one failure is tolerated


def test_a_node_that_applies_the_generation_but_runs_something_else_fails() -> None:
    fleet = Fleet("n1")
    state = begin(fleet, spec(waves=("100%",)))
    state, _ = run(fleet, state, 0.0)
    fleet.installs("n1", OLD)  # it says it applied generation 5, yet still runs the old artifact
    state, actions = run(fleet, state, 50.0)
    assert state.node("n1").reason.startswith(f"applied generation 5 but did not install: it runs {OLD}")
    assert actions == (Rollback("n1", OLD, 6), Fail("ro-1", state.reason))


def test_a_node_lost_during_its_bake_starts_the_bake_again() -> None:
    fleet = Fleet("n1")
    state = begin(fleet, spec(waves=("100%",)))
    state, _ = run(fleet, state, 0.0)
    fleet.installs("n1", TARGETS["n1"].artifact)
    state, _ = run(fleet, state, 10.0)
    fleet.offline("n1")
    state, _ = run(fleet, state, 60.0)
    assert state.node("n1").phase is NodePhase.INSTALLED
    fleet.obs["n1"] = replace(fleet.obs["n1"], online=True)
    decision = step(state, fleet.obs, 70.0)
    assert decision.state.node("n1").phase is NodePhase.READY
    assert decision.wake_at == 70.0 + BAKE  # the bake counts from its return, not from 10.0


def test_pause_holds_back_new_work_but_keeps_watching_nodes_in_flight() -> None:
    fleet = Fleet("n1", "n2")
    state = begin(fleet, spec())
    state, _ = run(fleet, state, 0.0)
    state = pause(state, 1.0)
    assert pause(state, 2.0) is state
    state, actions = bake(fleet, state, "n1", ready_at=10.0)
    assert state.node("n1").phase is NodePhase.BAKED
    assert actions == ()  # wave 2 waits for resume
    assert state.status is RolloutStatus.PAUSED

    state = resume(state, 500.0)
    state, actions = run(fleet, state, 500.0)
    assert actions == (SetDesired("n2", "r1", "int8", artifact_of("int8"), 5),)


def test_a_gate_broken_while_paused_still_fails_the_rollout() -> None:
    fleet = Fleet("n1", "n2")
    state = begin(fleet, spec())
    state, _ = run(fleet, state, 0.0)
    fleet.installs("n1", TARGETS["n1"].artifact)
    state, _ = run(fleet, state, 10.0)
    state = pause(state, 11.0)
    fleet.sample("n1", at=20.0, p95_ms=9000.0)
    state, actions = run(fleet, state, 20.0)
    assert state.status is RolloutStatus.FAILED
    assert actions == (Rollback("n1", OLD, 6), Fail("ro-1", state.reason))


def test_abort_rolls_back_the_touched_nodes() -> None:
    fleet = Fleet("n1", "n2", "n3")
    state = begin(fleet, spec())
    state, _ = run(fleet, state, 0.0)
    state, _ = bake(fleet, state, "n1", ready_at=10.0)  # n1 baked, n2 told
    decision = abort(state, 300.0)
    assert decision.state.status is RolloutStatus.ABORTED
    assert decision.actions == (Rollback("n1", OLD, 6), Rollback("n2", OLD, 6))
    assert phases(decision.state)["n3"] is NodePhase.PENDING
    with pytest.raises(ValueError, match="aborted"):
        abort(decision.state, 301.0)
    with pytest.raises(ValueError, match="aborted"):
        resume(decision.state, 301.0)


def test_rollout_state_survives_a_json_round_trip_exactly() -> None:
    fleet = Fleet("n1", "n2", "n3", "n4")
    targets: dict[str, Target | NoTarget] = {**TARGETS, "n4": NoTarget("nothing fits")}
    rollout_spec = spec(
        waves=(1, "12.5%", "100%"), gates=Gates(max_p95_ms=1234.5), on_timeout=OnTimeout.SKIP, bake_s=0.1
    )
    state = start("ro-7", rollout_spec, fleet.obs, targets, 1.25)
    state, _ = run(fleet, state, 1.25)
    fleet.installs("n1", TARGETS["n1"].artifact)
    state, _ = run(fleet, state, 1 / 3)
    state = pause(state, 2.0 / 3)
    assert len({node.phase for node in state.nodes}) == 3  # ready, pending, skipped

    data = json.loads(json.dumps(state.to_dict()))
    assert RolloutState.from_dict(data) == state
    with pytest.raises(ValueError, match="version"):
        RolloutState.from_dict({**data, "version": 99})


# Variant choice for three simulated device profiles, with a release of the real model's variants.


def release(*names: str) -> list[ReleaseVariant]:
    """Variants sized like the real model's artifacts (their weights in their storage dtype)."""
    variants = []
    for name in names:
        recipe = VARIANTS[name]
        size = estimate(Z_IMAGE_TURBO, recipe, recipe.storage_dtype, Workload()).total_weights
        variants.append(ReleaseVariant(recipe, artifact_of(name), size))
    return variants


@pytest.mark.parametrize(
    ("profile", "variant"),
    [("jetson-orin-nano-8gb", "int4-te8"), ("t4-16gb", "int4"), ("a10-24gb", "bf16")],
)
def test_choose_variant_picks_the_best_that_fits_each_profile(profile: str, variant: str) -> None:
    facts = PROFILES[profile].facts()
    choice = choose_variant(facts, release("bf16", "int8", "int4", "int4-te8"))
    assert choice.variant == variant
    assert choice.explanation.startswith(f"{variant} with placement")
    assert PROFILES[profile].description in choice.explanation


def test_choose_variant_says_why_nothing_fits() -> None:
    choice = choose_variant(PROFILES["jetson-orin-nano-8gb"].facts(), release("bf16", "int8", "int4"))
    assert choice.variant is None
    assert choice.explanation.startswith("nothing fits Jetson Orin Nano 8 GB")
    assert choose_variant(PROFILES["a10-24gb"].facts(), []).variant is None


def test_a_pinned_variant_wins_over_the_planner() -> None:
    variants = release("bf16", "int8", "int4")
    a10, nano = PROFILES["a10-24gb"].facts(), PROFILES["jetson-orin-nano-8gb"].facts()
    pinned = choose_variant(a10, variants, pinned="int8")
    assert pinned.variant == "int8"
    assert "pinned by the operator; the planner expects it to fit" in pinned.explanation
    tight = choose_variant(nano, variants, pinned="bf16")
    assert tight.variant == "bf16"
    assert "expects it not to fit" in tight.explanation
    missing = choose_variant(a10, variants, pinned="fp8")
    assert missing.variant is None
    assert "not in the release" in missing.explanation
