"""The mock provider's mutable state: one profile, generator and tally per personality.

A ``MockState`` outlives the apps that serve it (a quart app survives one serving
lifespan; a test may serve the same state twice), and tests hold it to configure faults
and read statistics directly. It is only touched from the trio thread, between
checkpoints, so it needs no lock.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from .faults import PERSONALITIES, FaultKind, FaultProfile, targets

__all__ = ["OUTCOMES", "MockState", "PersonalityState", "Stats"]

#: Every outcome a model request can have, as counted in ``/stats``.
OUTCOMES = ("ok", "invalid_request", *(kind.value for kind in FaultKind))


@attrs.define
class Stats:
    """What one personality received and what it answered.

    ``requests`` counts model requests whose body was read; each gets exactly one
    outcome as it is decided, so ``sum(outcomes.values()) == requests``. ``disconnects``
    counts responses abandoned before they completed (the client went away, or the
    server was shutting down), whatever their outcome.
    """

    requests: int = 0
    outcomes: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(OUTCOMES, 0))
    disconnects: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "disconnects": self.disconnects,
        }


@attrs.define
class PersonalityState:
    profile: FaultProfile
    rng: random.Random
    stats: Stats = attrs.Factory(Stats)
    #: Serial number of the last response id handed out.
    served: int = 0

    def next_response_serial(self) -> int:
        self.served += 1
        return self.served


@attrs.define
class MockState:
    """Profiles, generators and statistics of both personalities.

    ``latency_ms`` is the server-wide latency (the CLI's ``--latency-ms``) added to every
    model response on top of the profile's own ``latency_ms``; profile resets keep it.
    """

    personalities: dict[str, PersonalityState]
    latency_ms: float = 0.0

    @classmethod
    def create(cls, *, seed: int | None = None, latency_ms: float = 0.0) -> MockState:
        """Healthy profiles; each personality's generator seeded with ``seed``.

        ``seed`` None seeds from the operating system: fault sequences then differ
        from run to run.
        """
        return cls(
            {name: PersonalityState(FaultProfile(), random.Random(seed)) for name in PERSONALITIES},
            latency_ms,
        )

    def __getitem__(self, name: str) -> PersonalityState:
        return self.personalities[name]

    def configure(self, profile: FaultProfile, provider: str = "openai") -> None:
        """Replace a profile as ``POST /config/failures`` does.

        ``provider`` is ``"openai"``, ``"anthropic"`` or ``"all"``. A profile with a seed
        reseeds the generators it replaces.
        """
        for name in targets(provider):
            personality = self.personalities[name]
            personality.profile = profile
            if profile.seed is not None:
                personality.rng.seed(profile.seed)

    def profiles_json(self) -> dict[str, Any]:
        return {name: state.profile.to_json() for name, state in self.personalities.items()}

    def stats_json(self) -> dict[str, Any]:
        return {name: state.stats.to_json() for name, state in self.personalities.items()}

    def reset_stats(self) -> None:
        for state in self.personalities.values():
            state.stats = Stats()
