"""A provider's circuit breaker, as immutable values.

A :class:`Breaker` decides whether a call may go to its provider and learns from the
calls' outcomes. It is pure logic: no I/O, no trio, no clock reads. Every method that
depends on time takes ``now`` (seconds on any monotonic clock; the provider actor passes
``trio.current_time()``), and every transition returns a new value, so the actor that
owns a breaker keeps it in one variable and replaces it::

    breaker, admission = breaker.admit(trio.current_time())
    if admission.verdict is Verdict.REFUSED:
        ...  # skip the provider without a network call (admission.retry_after)
    ...      # run the call, then exactly one of:
    breaker = breaker.record_success(admission)
    breaker = breaker.record_failure(admission, trio.current_time())
    breaker = breaker.release(admission)

States::

         success: consecutive failures = 0
              ┌──────┐
              │      v
          ┌──────────────┐   failure_threshold consecutive   ┌──────────────┐
     ────►│    CLOSED    │ ──── counted failures ───────────►│     OPEN     │
          └──────────────┘                                   └──────────────┘
                 ^                                     now >= open_until │  ^
                 │                                                       v  │ probe
                 │          probe success          ┌──────────────────────┐ │ failure:
                 └─────────────────────────────────│      HALF_OPEN       │─┘ next,
                     (both counts reset)           │ one probe at a time; │   longer
                                                   │ others are refused   │   interval
                                                   └──────────────────────┘
                              release(probe), or the probe's lease expiring,
                              frees the slot for the next caller's probe

The open interval of the n-th consecutive trip is
``open_interval * interval_factor ** (n - 1)``, capped at ``max_open_interval``: with
the defaults 10 s, 20 s, 40 s, 60 s, 60 s, ... Only a probe's success closes the
circuit, and it resets the trips, so a provider that recovers is back in use within a
minute and its next trip starts again at 10 s.

**What counts is the caller's decision.** The breaker counts every failure it is told
about. The caller reports with :meth:`~Breaker.record_failure` only the outcomes that
say the provider is unhealthy (DESIGN section 3: transient errors, silence, server
errors, 401/403/404). Everything else, a 429, a client error, a context-length error,
our own saturation, a cancelled call, ends with :meth:`~Breaker.release`: it counts
nothing, and for the probe it gives the slot back so that the next call may probe.

**Stale outcomes are ignored.** An :class:`Admission` remembers the breaker's *epoch*,
which changes whenever the circuit changes state or its probe slot changes hands. An
outcome whose admission belongs to an earlier epoch, such as a call admitted while
CLOSED that fails after the circuit opened, or one that succeeds after a probe reclosed
it, returns the breaker unchanged: it neither counts nor re-trips, extends, or closes
the circuit. It describes the provider as it was before the last transition, which
the transition has already taken into account; in HALF_OPEN only the probe speaks for
the present. The counts therefore keep the streak that opened the circuit (plus one
per failed probe), which is what a health snapshot should show while it is open.

**The probe's lease.** A probe that never reports back must not wedge the breaker. Once
``probe_lease`` seconds have passed since it was admitted, its slot is considered
abandoned, and the next :meth:`~Breaker.admit` admits a new probe. The old probe then
belongs to an earlier epoch and its outcome, should it come, is ignored. A probe past
its lease that reports before anyone has taken its slot still decides: its answer is
as fresh as any.
"""

from __future__ import annotations

import enum
import math

import attrs

__all__ = [
    "Admission",
    "Breaker",
    "BreakerPolicy",
    "CircuitState",
    "Verdict",
    "describe_transition",
]


class CircuitState(enum.Enum):
    """Where a circuit stands."""

    CLOSED = "closed"  # calls flow, and counted failures are counted
    OPEN = "open"  # nothing is admitted until open_until
    HALF_OPEN = "half_open"  # one probe at a time decides between CLOSED and OPEN


class Verdict(enum.Enum):
    """What :meth:`Breaker.admit` decided about one call."""

    ADMITTED = "admitted"  # a normal call: the circuit is closed
    PROBE = "probe"  # the half-open circuit's one trial call
    REFUSED = "refused"  # no call: the circuit is open, or its probe slot is taken


def _is_number(value: object) -> bool:
    # A bool is an int to Python, but ``True`` seconds is a typo, not a setting.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_seconds(
    instance: BreakerPolicy, attribute: attrs.Attribute, value: object
) -> None:
    if not _is_number(value):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    # An infinite interval or lease would wedge the breaker for good, which is exactly
    # what a breaker must never do.
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{attribute.name} must be a finite number of seconds > 0, got {value!r}"
        )


def _at_least_one_failure(
    instance: BreakerPolicy, attribute: attrs.Attribute, value: object
) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value!r}")


def _not_below_open_interval(
    instance: BreakerPolicy, attribute: attrs.Attribute, value: float
) -> None:
    # attrs runs validators in field order, so open_interval is already valid here.
    if value < instance.open_interval:
        raise ValueError(
            f"{attribute.name} must be >= open_interval ({instance.open_interval!r}),"
            f" got {value!r}"
        )


def _growth_factor(
    instance: BreakerPolicy, attribute: attrs.Attribute, value: object
) -> None:
    if not _is_number(value):
        raise TypeError(f"{attribute.name} must be a number, got {value!r}")
    # A factor below 1 would shorten the interval on each trip of a provider that
    # keeps failing: the opposite of backing off.
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(
            f"{attribute.name} must be a finite number >= 1, got {value!r}"
        )


@attrs.frozen
class BreakerPolicy:
    """How a breaker trips and recovers. Invalid settings raise at construction, with a
    message that names the field.

    Attributes:
        failure_threshold: Consecutive counted failures that open a closed circuit.
        open_interval: Seconds the circuit stays open on its first trip.
        max_open_interval: The cap on the open interval, however many trips.
        interval_factor: How much longer each consecutive trip keeps it open.
        probe_lease: Seconds after which a probe that has not reported back is
            considered abandoned, and its slot given to the next caller.
    """

    failure_threshold: int = attrs.field(default=5, validator=_at_least_one_failure)
    open_interval: float = attrs.field(default=10.0, validator=_positive_seconds)
    max_open_interval: float = attrs.field(
        default=60.0, validator=[_positive_seconds, _not_below_open_interval]
    )
    interval_factor: float = attrs.field(default=2.0, validator=_growth_factor)
    # Longer than any sane per-attempt timeout, so that only a probe whose outcome was
    # truly lost (a bug, a crashed task) loses its slot, never one that is merely slow.
    probe_lease: float = attrs.field(default=120.0, validator=_positive_seconds)

    def open_interval_for_trip(self, trip: int) -> float:
        """Return how many seconds the circuit stays open on its *trip*-th consecutive
        trip (counting from 1): ``open_interval * interval_factor ** (trip - 1)``,
        capped at ``max_open_interval``."""
        try:
            interval = self.open_interval * self.interval_factor ** (trip - 1)
        except OverflowError:
            # A provider that stays down trips about once a minute, for hours on end:
            # 2.0 ** 1024 no longer fits in a float, and is far past any cap anyway.
            return self.max_open_interval
        return min(interval, self.max_open_interval)


@attrs.frozen
class Admission:
    """The breaker's answer to :meth:`Breaker.admit`: a ticket for one call.

    Hand an ADMITTED or PROBE ticket back with the call's outcome, to exactly one of
    :meth:`Breaker.record_success`, :meth:`Breaker.record_failure` or
    :meth:`Breaker.release`.

    Attributes:
        verdict: Whether the call may go ahead, and as what.
        epoch: Which state of the breaker admitted the call; opaque to callers. It lets
            the breaker recognise and ignore stale outcomes.
        retry_after: REFUSED only: seconds until the circuit may admit again, for a
            ``Retry-After``. None while a probe is in flight: the circuit admits again
            as soon as that probe reports, which nothing here can predict, so the
            caller applies its own default.
    """

    verdict: Verdict
    epoch: int
    retry_after: float | None = None


@attrs.frozen
class Breaker:
    """One provider's circuit breaker. ``Breaker(policy)`` is a closed circuit with no
    failures; the methods return new values and never change this one.

    Attributes:
        policy: The thresholds and intervals.
        state: The stored state. An OPEN circuit past its ``open_until`` stays OPEN here
            until the next :meth:`admit` turns it HALF_OPEN; :meth:`state_at` reports it
            as HALF_OPEN at once.
        consecutive_failures: Counted failures since the last success that counted:
            the streak that opened the circuit plus its failed probes, if it is not
            closed.
        consecutive_trips: Trips since the circuit last closed; the next trip opens it
            for :meth:`BreakerPolicy.open_interval_for_trip` of this plus one.
        open_until: OPEN only: when the interval ends and a probe may be admitted.
        probe_since: HALF_OPEN only: when the probe in flight was admitted; None while
            the slot is free.
        epoch: Changes with every transition and every change of hands of the probe
            slot; admissions carry it so that stale outcomes can be told apart.
    """

    policy: BreakerPolicy = attrs.field(factory=BreakerPolicy)
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    consecutive_trips: int = 0
    open_until: float | None = None
    probe_since: float | None = None
    epoch: int = 0

    def state_at(self, now: float) -> CircuitState:
        """Return the state to report at *now*: the stored state, except that an OPEN
        circuit whose interval is over is HALF_OPEN."""
        if self.state is CircuitState.OPEN and now >= self.open_until:
            return CircuitState.HALF_OPEN
        return self.state

    def admit(self, now: float) -> tuple[Breaker, Admission]:
        """Decide whether a call may go to the provider at *now*.

        Returns the new breaker and the call's :class:`Admission`:

        - CLOSED: ADMITTED, and the breaker is unchanged.
        - OPEN before ``open_until``: REFUSED, with ``retry_after = open_until - now``.
        - HALF_OPEN (or OPEN at or past ``open_until``) with its probe slot free, or
          held by a probe past its lease: PROBE, and the new breaker holds the slot.
        - HALF_OPEN with a probe in flight: REFUSED, with ``retry_after`` None.
        """
        if self.state is CircuitState.CLOSED:
            return self, Admission(Verdict.ADMITTED, self.epoch)
        if self.state is CircuitState.OPEN and now < self.open_until:
            return self, Admission(
                Verdict.REFUSED, self.epoch, retry_after=self.open_until - now
            )
        if (
            self.state is CircuitState.HALF_OPEN
            and self.probe_since is not None
            and now < self.probe_since + self.policy.probe_lease
        ):
            return self, Admission(Verdict.REFUSED, self.epoch)
        probing = attrs.evolve(
            self,
            state=CircuitState.HALF_OPEN,
            open_until=None,
            probe_since=now,
            epoch=self.epoch + 1,
        )
        return probing, Admission(Verdict.PROBE, probing.epoch)

    def record_success(self, admission: Admission) -> Breaker:
        """Record that the call admitted by *admission* succeeded, and return the new
        breaker.

        The probe's success closes the circuit and resets the consecutive failures and
        trips. A normal call's success resets the consecutive failures. A stale
        admission changes nothing.

        Raises:
            ValueError: if *admission* was REFUSED: no call was made.
        """
        if not self._is_current(admission):
            return self
        if admission.verdict is Verdict.PROBE:
            return attrs.evolve(
                self,
                state=CircuitState.CLOSED,
                consecutive_failures=0,
                consecutive_trips=0,
                probe_since=None,
                epoch=self.epoch + 1,
            )
        if self.consecutive_failures == 0:
            return self  # the common case, on every success: nothing to change
        return attrs.evolve(self, consecutive_failures=0)

    def record_failure(self, admission: Admission, now: float) -> Breaker:
        """Record that the call admitted by *admission* failed in a way that counts,
        at *now*, and return the new breaker.

        A normal call's failure adds to the consecutive failures, and the one that
        reaches ``failure_threshold`` opens the circuit. The probe's failure opens it
        again at once, for the next, longer interval. A stale admission changes
        nothing.

        Raises:
            ValueError: if *admission* was REFUSED: no call was made.
        """
        if not self._is_current(admission):
            return self
        failures = self.consecutive_failures + 1
        if (
            admission.verdict is Verdict.ADMITTED
            and failures < self.policy.failure_threshold
        ):
            return attrs.evolve(self, consecutive_failures=failures)
        trips = self.consecutive_trips + 1
        return attrs.evolve(
            self,
            state=CircuitState.OPEN,
            consecutive_failures=failures,
            consecutive_trips=trips,
            open_until=now + self.policy.open_interval_for_trip(trips),
            probe_since=None,
            epoch=self.epoch + 1,
        )

    def release(self, admission: Admission) -> Breaker:
        """Record that the call admitted by *admission* ended without an outcome that
        counts (cancelled, rate limited, a client error...), and return the new
        breaker.

        Nothing is counted. The current probe's slot is freed, so that the next call
        may probe; for a normal or a stale admission the breaker is unchanged.

        Raises:
            ValueError: if *admission* was REFUSED: no call was made.
        """
        if not self._is_current(admission) or admission.verdict is Verdict.ADMITTED:
            return self
        return attrs.evolve(self, probe_since=None, epoch=self.epoch + 1)

    def _is_current(self, admission: Admission) -> bool:
        # Every transition and every probe hand-over moves the epoch on, so a ticket
        # from the current epoch was admitted by the very state the breaker is in now.
        if admission.verdict is Verdict.REFUSED:
            raise ValueError(
                "a REFUSED admission has no outcome to record: no call was made"
            )
        return admission.epoch == self.epoch


def describe_transition(before: Breaker, after: Breaker) -> str | None:
    """Describe, for a log line, how the circuit changed from *before* to *after*, two
    successive values of one breaker; return None if it did not change state.

    The descriptions::

        OPENED after 5 consecutive failures, for 10.0s
        HALF_OPEN: admitting one probe
        HALF_OPEN: probe silent for 120.0s, admitting a new one
        REOPENED after a failed probe (trip 2), for 20.0s
        CLOSED after successful probe
    """
    match before.state, after.state:
        case CircuitState.CLOSED, CircuitState.OPEN:
            interval = after.policy.open_interval_for_trip(after.consecutive_trips)
            return (
                f"OPENED after {after.consecutive_failures} consecutive failures,"
                f" for {interval:.1f}s"
            )
        case CircuitState.HALF_OPEN, CircuitState.OPEN:
            interval = after.policy.open_interval_for_trip(after.consecutive_trips)
            return (
                f"REOPENED after a failed probe (trip {after.consecutive_trips}),"
                f" for {interval:.1f}s"
            )
        case CircuitState.OPEN, CircuitState.HALF_OPEN:
            return "HALF_OPEN: admitting one probe"
        case CircuitState.HALF_OPEN, CircuitState.HALF_OPEN if (
            before.probe_since is not None
            and after.probe_since is not None
            and after.probe_since != before.probe_since
        ):
            # Only admit() past the lease hands a held slot straight to a new probe.
            silent_for = after.probe_since - before.probe_since
            return f"HALF_OPEN: probe silent for {silent_for:.1f}s, admitting a new one"
        case CircuitState.HALF_OPEN, CircuitState.CLOSED:
            return "CLOSED after successful probe"
    return None
