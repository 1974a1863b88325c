"""The circuit breaker's state machine, with exact times.

Example tests walk every transition; a hypothesis state machine then drives admissions
and outcomes in any order against an account of the specification kept by the test
itself, never read back from the breaker.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from providers.breaker import (
    Admission,
    Breaker,
    BreakerPolicy,
    CircuitState,
    Verdict,
    describe_transition,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

# An arbitrary start: the breaker must not assume a clock that starts at zero.
T = 1000.0


def admit(breaker: Breaker, now: float, expected: Verdict) -> tuple[Breaker, Admission]:
    breaker, admission = breaker.admit(now)
    assert admission.verdict is expected, (now, admission)
    return breaker, admission


def fail_once(breaker: Breaker, now: float) -> Breaker:
    breaker, admission = admit(breaker, now, Verdict.ADMITTED)
    return breaker.record_failure(admission, now)


def tripped(policy: BreakerPolicy = BreakerPolicy(), at: float = T) -> Breaker:
    """A breaker that opened at *at* after ``failure_threshold`` failures."""
    breaker = Breaker(policy)
    for _ in range(policy.failure_threshold):
        breaker = fail_once(breaker, at)
    assert breaker.state is OPEN
    return breaker


def probing(breaker: Breaker, now: float) -> tuple[Breaker, Admission]:
    return admit(breaker, now, Verdict.PROBE)


# --- policy ---------------------------------------------------------------------------


def test_default_policy_follows_the_design() -> None:
    policy = BreakerPolicy()
    assert policy.failure_threshold == 5
    intervals = [policy.open_interval_for_trip(trip) for trip in range(1, 7)]
    assert intervals == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_interval_stays_capped_for_a_provider_down_for_days() -> None:
    # 2.0 ** 1024 overflows a float: thousands of trips must still give the cap.
    assert BreakerPolicy().open_interval_for_trip(5000) == 60.0
    assert BreakerPolicy(interval_factor=1.0).open_interval_for_trip(5000) == 10.0

    breaker = attrs.evolve(tripped(), consecutive_trips=5000)
    breaker, probe = probing(breaker, T + 10)
    breaker = breaker.record_failure(probe, T + 10)
    assert breaker.open_until == T + 70


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("failure_threshold", 0, ValueError),
        ("failure_threshold", -3, ValueError),
        ("failure_threshold", 2.5, TypeError),
        ("failure_threshold", True, TypeError),
        ("open_interval", 0, ValueError),
        ("open_interval", -1.0, ValueError),
        ("open_interval", float("inf"), ValueError),
        ("open_interval", float("nan"), ValueError),
        ("open_interval", "10", TypeError),
        ("max_open_interval", 0.0, ValueError),
        ("max_open_interval", 9.5, ValueError),  # below open_interval (10.0)
        ("max_open_interval", float("inf"), ValueError),
        ("interval_factor", 0.5, ValueError),
        ("interval_factor", 0.0, ValueError),
        ("interval_factor", float("nan"), ValueError),
        ("interval_factor", None, TypeError),
        ("probe_lease", 0.0, ValueError),
        ("probe_lease", -120.0, ValueError),
        ("probe_lease", float("inf"), ValueError),
    ],
)
def test_policy_rejects_nonsense_naming_the_field(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=rf"^{field} must be .*, got {value!r}$"):
        BreakerPolicy(**{field: value})


def test_policy_accepts_its_boundaries() -> None:
    policy = BreakerPolicy(
        failure_threshold=1, open_interval=5, max_open_interval=5, interval_factor=1
    )
    assert [policy.open_interval_for_trip(trip) for trip in (1, 2, 3)] == [5, 5, 5]


# --- CLOSED ---------------------------------------------------------------------------


def test_opens_at_exactly_the_failure_threshold() -> None:
    breaker = Breaker()
    for failures in range(1, 5):
        breaker = fail_once(breaker, T)
        assert (breaker.state, breaker.consecutive_failures) == (CLOSED, failures)
    breaker = fail_once(breaker, T)
    assert breaker.state is OPEN
    assert breaker.consecutive_failures == 5
    assert breaker.consecutive_trips == 1
    assert breaker.open_until == T + 10


def test_threshold_of_one_opens_on_the_first_failure() -> None:
    breaker = fail_once(Breaker(BreakerPolicy(failure_threshold=1)), T)
    assert (breaker.state, breaker.open_until) == (OPEN, T + 10)


def test_success_in_closed_resets_the_count() -> None:
    breaker = Breaker()
    for _ in range(4):
        breaker = fail_once(breaker, T)
    breaker, admission = admit(breaker, T, Verdict.ADMITTED)
    breaker = breaker.record_success(admission)
    assert (breaker.state, breaker.consecutive_failures) == (CLOSED, 0)
    for _ in range(4):
        breaker = fail_once(breaker, T + 1)
    assert (breaker.state, breaker.consecutive_failures) == (CLOSED, 4)
    assert fail_once(breaker, T + 1).state is OPEN


def test_a_success_with_nothing_to_reset_keeps_the_breaker() -> None:
    # Every successful call records one: with no failures to reset, the actor keeps
    # the same breaker object and so skips building a new one and comparing states.
    breaker, admission = admit(Breaker(), T, Verdict.ADMITTED)
    assert breaker.record_success(admission) is breaker


def test_release_of_a_normal_call_counts_nothing() -> None:
    breaker = Breaker()
    for _ in range(4):
        breaker = fail_once(breaker, T)
    after_four = breaker
    breaker, admission = admit(breaker, T, Verdict.ADMITTED)
    assert breaker.release(admission) == after_four  # the streak is not reset either


def test_closed_admits_without_changing() -> None:
    breaker = Breaker()
    after, admission = breaker.admit(T)
    assert after is breaker
    assert admission.retry_after is None


# --- OPEN and HALF_OPEN ---------------------------------------------------------------


def test_open_refuses_until_its_interval_ends_then_admits_one_probe() -> None:
    breaker = tripped()

    refused_at_once = admit(breaker, T, Verdict.REFUSED)[1]
    assert refused_at_once.retry_after == 10.0
    before_end, refused_late = admit(breaker, T + 9.999, Verdict.REFUSED)
    assert refused_late.retry_after == pytest.approx(0.001)
    assert before_end is breaker
    assert breaker.state_at(T + 9.999) is OPEN

    assert breaker.state_at(T + 10) is HALF_OPEN  # for display, before anyone asks
    assert breaker.state is OPEN
    breaker, probe = probing(breaker, T + 10)
    assert breaker.state is HALF_OPEN
    assert probe.retry_after is None


def test_half_open_refuses_everyone_else_while_the_probe_is_in_flight() -> None:
    breaker, _probe = probing(tripped(), T + 10)
    for now in (T + 10, T + 11, T + 129.999):
        after, refused = admit(breaker, now, Verdict.REFUSED)
        assert after is breaker
        # It admits again when the probe reports, which nobody can predict.
        assert refused.retry_after is None


def test_failed_probes_reopen_for_ever_longer_intervals_up_to_the_cap() -> None:
    breaker = tripped()
    opened_at = T
    for trip, interval in enumerate([20.0, 40.0, 60.0, 60.0, 60.0], start=2):
        ends = breaker.open_until
        admit(breaker, ends - 0.001, Verdict.REFUSED)
        breaker, probe = probing(breaker, ends)
        opened_at = ends + 0.5
        breaker = breaker.record_failure(probe, opened_at)
        assert breaker.state is OPEN
        assert breaker.consecutive_trips == trip
        assert breaker.open_until == opened_at + interval
    assert breaker.consecutive_failures == 5 + 5  # the streak, plus each failed probe


def test_successful_probe_closes_and_the_next_trip_opens_for_ten_seconds() -> None:
    breaker = tripped()
    breaker, probe = probing(breaker, T + 10)
    breaker = breaker.record_failure(probe, T + 10)  # open for 20 s
    breaker, probe = probing(breaker, T + 30)
    breaker = breaker.record_success(probe)
    assert breaker.state is CLOSED
    assert (breaker.consecutive_failures, breaker.consecutive_trips) == (0, 0)
    assert breaker.open_until is None
    assert admit(breaker, T + 30, Verdict.ADMITTED)[0] is breaker

    breaker = tripped(breaker.policy, at=T + 31)
    assert breaker.open_until == T + 41


def test_a_custom_policy_sets_threshold_and_intervals() -> None:
    policy = BreakerPolicy(
        failure_threshold=2, open_interval=1.5, max_open_interval=4.0, interval_factor=3
    )
    breaker = tripped(policy)
    assert breaker.open_until == T + 1.5
    breaker, probe = probing(breaker, T + 1.5)
    breaker = breaker.record_failure(probe, T + 2)
    assert breaker.open_until == T + 2 + 4.0  # 4.5, capped


def test_release_gives_the_probe_slot_back() -> None:
    breaker, abandoned = probing(tripped(), T + 10)
    breaker = breaker.release(abandoned)
    assert breaker.state is HALF_OPEN
    assert breaker.probe_since is None
    # Released, it has given up its say, even while the slot is still free.
    assert breaker.record_success(abandoned) == breaker

    breaker, probe = probing(breaker, T + 10.5)
    # The released call must not decide for the new probe, whatever it reports.
    for late in (
        breaker.record_success(abandoned),
        breaker.record_failure(abandoned, T + 11),
        breaker.release(abandoned),
    ):
        assert late == breaker
    admit(breaker, T + 11, Verdict.REFUSED)
    assert breaker.record_success(probe).state is CLOSED


def test_a_probe_that_never_reports_loses_its_slot_after_the_lease() -> None:
    breaker, silent = probing(tripped(), T + 10)
    admit(breaker, T + 10 + 119.999, Verdict.REFUSED)
    breaker, probe = probing(breaker, T + 130)
    admit(breaker, T + 130, Verdict.REFUSED)  # and the new probe has the slot to itself

    # The abandoned probe, reporting at last, is stale.
    assert breaker.record_success(silent) == breaker
    assert breaker.record_failure(silent, T + 131) == breaker

    breaker = breaker.record_failure(probe, T + 131)
    assert (breaker.state, breaker.open_until) == (OPEN, T + 131 + 20)


def test_a_probe_past_its_lease_still_decides_if_nobody_took_its_slot() -> None:
    breaker, slow = probing(tripped(), T + 10)
    assert breaker.record_success(slow).state is CLOSED
    breaker = breaker.record_failure(slow, T + 500)
    assert (breaker.state, breaker.open_until) == (OPEN, T + 520)


def test_a_probe_whose_outcome_does_not_count_is_released() -> None:
    # e.g. the probe got a 429: the caller releases it, the next call probes at once.
    breaker, rate_limited = probing(tripped(), T + 10)
    breaker = breaker.release(rate_limited)
    assert breaker.consecutive_failures == 5
    assert breaker.consecutive_trips == 1
    probing(breaker, T + 10)


# --- stale outcomes -------------------------------------------------------------------


def admitted_while_closed(count: int) -> tuple[Breaker, list[Admission]]:
    breaker, admissions = Breaker(), []
    for _ in range(count):
        breaker, admission = admit(breaker, T, Verdict.ADMITTED)
        admissions.append(admission)
    return breaker, admissions


def outcomes(admission: Admission, now: float):
    """Each way a call can report back, as a function of the breaker."""
    return {
        "success": lambda breaker: breaker.record_success(admission),
        "failure": lambda breaker: breaker.record_failure(admission, now),
        "release": lambda breaker: breaker.release(admission),
    }


@pytest.mark.parametrize("outcome", ["success", "failure", "release"])
def test_stale_outcomes_do_not_touch_an_open_circuit(outcome: str) -> None:
    breaker, (*tripping, straggler) = admitted_while_closed(6)
    for admission in tripping:
        breaker = breaker.record_failure(admission, T)
    assert breaker.open_until == T + 10

    after = outcomes(straggler, T + 5)[outcome](breaker)
    assert after == breaker  # no re-trip, no longer interval, no close, no count


@pytest.mark.parametrize("outcome", ["success", "failure", "release"])
def test_stale_outcomes_do_not_decide_for_the_probe(outcome: str) -> None:
    breaker, (*tripping, straggler) = admitted_while_closed(6)
    for admission in tripping:
        breaker = breaker.record_failure(admission, T)
    breaker, probe = probing(breaker, T + 10)

    after = outcomes(straggler, T + 11)[outcome](breaker)
    assert after == breaker
    admit(after, T + 11, Verdict.REFUSED)  # the probe still holds the slot
    assert after.record_success(probe).state is CLOSED


def test_a_failure_from_before_the_trip_does_not_count_once_reclosed() -> None:
    breaker, (*tripping, straggler) = admitted_while_closed(6)
    for admission in tripping:
        breaker = breaker.record_failure(admission, T)
    breaker, probe = probing(breaker, T + 10)
    closed = breaker.record_success(probe)

    assert closed.record_failure(straggler, T + 11) == closed
    assert closed.record_success(probe) == closed  # nor does a repeated report


@pytest.mark.parametrize("outcome", ["success", "failure", "release"])
def test_a_refused_call_has_no_outcome_to_record(outcome: str) -> None:
    breaker = tripped()
    breaker, refused = admit(breaker, T + 1, Verdict.REFUSED)
    with pytest.raises(ValueError, match="REFUSED"):
        outcomes(refused, T + 2)[outcome](breaker)


# --- logging transitions --------------------------------------------------------------


def test_transitions_are_described_for_the_log() -> None:
    log = []

    def step(before: Breaker, after: Breaker) -> Breaker:
        log.append(describe_transition(before, after))
        return after

    breaker = Breaker()
    for _ in range(5):
        breaker, admission = breaker.admit(T)
        breaker = step(breaker, breaker.record_failure(admission, T))
    breaker = step(breaker, breaker.admit(T + 5)[0])  # refused: no change
    before = breaker
    breaker, probe = breaker.admit(T + 10)
    breaker = step(before, breaker)
    breaker = step(breaker, breaker.admit(T + 11)[0])  # probe in flight: no change
    breaker = step(breaker, breaker.record_failure(probe, T + 12))
    before = breaker
    breaker, _silent = breaker.admit(T + 32)
    breaker = step(before, breaker)
    before = breaker
    breaker, probe = breaker.admit(T + 152.5)
    breaker = step(before, breaker)
    breaker = step(breaker, breaker.release(probe))  # slot freed: still HALF_OPEN
    before = breaker
    breaker, probe = breaker.admit(T + 153)
    breaker = step(before, breaker)
    step(breaker, breaker.record_success(probe))

    assert log == [
        None,
        None,
        None,
        None,
        "OPENED after 5 consecutive failures, for 10.0s",
        None,
        "HALF_OPEN: admitting one probe",
        None,
        "REOPENED after a failed probe (trip 2), for 20.0s",
        "HALF_OPEN: admitting one probe",
        "HALF_OPEN: probe silent for 120.5s, admitting a new one",
        None,
        None,
        "CLOSED after successful probe",
    ]


# --- any order of events --------------------------------------------------------------


# Times and intervals are multiples of 1/8, so the test's sums are exact and its
# expectations can be compared with ==.
EIGHTHS = 1 / 8


@st.composite
def policies(draw: st.DrawFn) -> BreakerPolicy:
    open_interval = draw(st.sampled_from([0.5, 1.0, 10.0]))
    return BreakerPolicy(
        failure_threshold=draw(st.integers(1, 3)),
        open_interval=open_interval,
        max_open_interval=open_interval * draw(st.sampled_from([1, 4, 8, 16])),
        interval_factor=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        probe_lease=draw(st.sampled_from([0.5, 2.0, 30.0])),
    )


@attrs.frozen
class Ticket:
    admission: Admission
    admitted_at: float
    closed_period: int  # which spell of CLOSED admitted it (normal calls)


class BreakerMachine(RuleBasedStateMachine):
    """Calls are admitted and report back in any order, against the test's own account
    of what the specification says the circuit must be doing."""

    tickets = Bundle("tickets")  # of calls admitted and not reported yet

    @initialize(policy=policies(), start=st.integers(0, 8 * 10**6))
    def start(self, policy: BreakerPolicy, start: int) -> None:
        self.policy = policy
        self.now = start * EIGHTHS
        self.breaker = Breaker(policy)
        # The test's account, kept from what the specification says happens:
        self.closed_period = 0  # moves on each time the circuit leaves CLOSED
        self.counted_failures = 0  # since the last success that counted
        self.trips = 0  # consecutive, since the circuit last closed
        self.interval: float | None = None  # of the latest trip
        self.open_until: float | None = None  # of the latest trip; None while CLOSED
        self.probe: Ticket | None = None  # the probe holding the half-open slot

    # -- the clock --

    @rule(eighths=st.integers(0, 8 * 150))
    def wait(self, eighths: int) -> None:
        self.now += eighths * EIGHTHS

    @rule(deadline=st.sampled_from(["interval", "lease"]), early=st.booleans())
    def wait_until(self, deadline: str, early: bool) -> None:
        """Jump to, or to just before, the instant a decision turns on: the end of the
        open interval or of the probe's lease, if there is one."""
        if deadline == "interval":
            ends = self.open_until
        elif self.probe is not None:
            ends = self.probe.admitted_at + self.policy.probe_lease
        else:
            ends = None
        if ends is not None:
            self.now = max(self.now, ends - (EIGHTHS if early else 0))

    # -- calls --

    @rule(target=tickets)
    def admit(self) -> Ticket | MultipleResults:
        before = self.breaker
        shown = before.state_at(self.now)
        self.breaker, admission = before.admit(self.now)
        verdict = admission.verdict

        if self.open_until is None:
            assert shown is CLOSED
            assert verdict is Verdict.ADMITTED
            assert self.breaker is before
        elif self.now < self.open_until:
            # OPEN never admits before its interval ends, and says when it will.
            assert shown is OPEN
            assert verdict is Verdict.REFUSED
            assert admission.retry_after == self.open_until - self.now
            assert self.breaker is before
        else:
            assert shown is HALF_OPEN
            probe_in_flight = (
                self.probe is not None
                and self.now < self.probe.admitted_at + self.policy.probe_lease
            )
            if probe_in_flight:
                # Never two probes at once ...
                assert verdict is Verdict.REFUSED
                assert admission.retry_after is None
                assert self.breaker is before
            else:
                # ... nor a wedged slot: free, or held past its lease, it is taken.
                assert verdict is Verdict.PROBE
                replaced = self.probe is not None
                described = describe_transition(before, self.breaker)
                assert (described is not None) == (before.state is OPEN or replaced)

        if verdict is Verdict.REFUSED:
            return multiple()  # no call, nothing to report
        ticket = Ticket(admission, self.now, self.closed_period)
        if verdict is Verdict.PROBE:
            self.probe = ticket
        return ticket

    # Failures are drawn more often than the other outcomes: the interesting states lie
    # past the failure threshold, and a success anywhere before it resets the count.
    @rule(
        ticket=consumes(tickets),
        outcome=st.sampled_from(["failure", "failure", "success", "release"]),
    )
    def complete(self, ticket: Ticket, outcome: str) -> None:
        before = self.breaker
        self.breaker = outcomes(ticket.admission, self.now)[outcome](before)

        if ticket.admission.verdict is Verdict.PROBE:
            current = ticket == self.probe
        else:
            current = (
                self.open_until is None and ticket.closed_period == self.closed_period
            )
        if not current:
            assert self.breaker == before, "a stale outcome changed the breaker"
        elif outcome == "success":
            self._succeeded(probe=ticket == self.probe)
        elif outcome == "failure":
            self._failed(probe=ticket == self.probe)
        elif ticket == self.probe:
            self.probe = None  # released: the next call may probe
        else:
            assert self.breaker == before, "releasing a normal call changed the breaker"

        changed = before.state is not self.breaker.state
        assert (describe_transition(before, self.breaker) is not None) == changed

    def _succeeded(self, *, probe: bool) -> None:
        # A success that counts resets the failures; the probe's closes the circuit.
        self.counted_failures = 0
        if probe:
            self.trips, self.interval, self.open_until, self.probe = 0, None, None, None
        assert self.breaker.consecutive_failures == 0
        assert self.breaker.state_at(self.now) is CLOSED

    def _failed(self, *, probe: bool) -> None:
        self.counted_failures += 1
        if not probe and self.counted_failures < self.policy.failure_threshold:
            assert self.breaker.state is CLOSED
            return
        # A trip: the first opens for open_interval, each consecutive one for
        # interval_factor times longer than the last, never longer than the cap.
        self.trips += 1
        if self.trips == 1:
            self.interval = self.policy.open_interval
        else:
            self.interval = min(
                self.interval * self.policy.interval_factor,
                self.policy.max_open_interval,
            )
        self.open_until = self.now + self.interval
        self.closed_period += 1
        self.probe = None
        assert self.breaker.state_at(self.now) is OPEN
        assert self.breaker.open_until == self.open_until

    # -- what holds after every step --

    @invariant()
    def counts_follow_the_specification(self) -> None:
        assert self.breaker.consecutive_failures == self.counted_failures
        assert self.breaker.consecutive_trips == self.trips

    @invariant()
    def opens_only_after_threshold_consecutive_failures(self) -> None:
        if self.open_until is None:
            assert self.breaker.state is CLOSED
            assert self.counted_failures < self.policy.failure_threshold
        else:
            assert self.breaker.state is not CLOSED
            assert self.counted_failures >= self.policy.failure_threshold


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
