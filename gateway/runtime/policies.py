"""The live set of policies: the config file's, overlaid by changes made through the admin API.

Reads are lock-free (a dict swapped whole); an update or a config reload
builds a new dict and swaps it in, so a change applies to the next request and
never tears one in flight. Writers (updates from the admin API's worker threads,
SIGHUP reloads) take one lock for the whole read-merge-validate-persist-publish
step: without it two concurrent updates each merge into the same old policy
and the later write silently drops the earlier one's field, and a reload that
read the stored overrides just before an update would publish them without it.
Admin changes are stored durably (AdminState) and win over the file until the
policy is reset.

Several gateways may share the stored changes (one PostgreSQL database): an
update merges into the policy as stored, not as this process last saw it,
inside the database transaction that writes it under the policy's lock, so
concurrent updates through different gateways lose no field either; the
other gateways take it through `reload_overrides` (their store follower calls
it when told of the change).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from gateway.runtime.admin_state import AdminState
from gateway.runtime.config import Config, ConfigError, Policy, parse_policy

__all__ = ["PolicyRegistry", "policy_to_dict"]


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """A policy as plain JSON-ready values (enums by value)."""
    return {
        key: value.value if isinstance(value, enum.Enum) else value
        for key, value in asdict(policy).items()
    }


class PolicyRegistry:
    """Policies by name, with where each one's current version came from."""

    def __init__(self, config: Config, state: AdminState, constitutions: Iterable[str]) -> None:
        self._state = state
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self._constitutions = frozenset(constitutions)
        self._file: Mapping[str, Policy] = {}
        self._policies: dict[str, Policy] = {}
        self._origins: dict[str, str] = {}
        self.default_name = config.default_policy
        self.load(config)

    def load(self, config: Config) -> None:
        """Take the policies of a (re)loaded config; admin changes stay on top.

        Raises:
            ConfigError: a policy names an unknown constitution.
        """
        self._check_constitutions(config.policies.values())
        with self._lock:  # no update may land between reading the overrides and publishing
            self._publish(config.policies)
            self.default_name = config.default_policy

    def reload_overrides(self) -> list[str]:
        """Re-read the stored admin changes (another gateway may have made some); returns
        the names of the policies that changed here.

        Raises:
            ConfigError: a stored policy is invalid here (an unknown constitution);
                the policies in force stay as they were.
            DatabaseError: the admin state cannot be read; likewise.
        """
        with self._lock:
            before = self._policies
            self._publish(self._file)
            after = self._policies
        return sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))

    def _publish(self, file_policies: Mapping[str, Policy]) -> None:
        """The file's policies under the stored overrides, in force (the caller holds the lock)."""
        overrides = {
            name: parse_policy(name, body) for name, body in self._state.policy_overrides().items()
        }
        self._check_constitutions(overrides.values())
        policies = {**file_policies, **overrides}
        self._origins = {name: "admin" if name in overrides else "config" for name in policies}
        self._file = file_policies
        self._policies = policies

    def get(self, name: str) -> Policy | None:
        """The policy called `name`, or None."""
        return self._policies.get(name)

    def all(self) -> list[Policy]:
        """Every policy, by name."""
        return [self._policies[name] for name in sorted(self._policies)]

    def origin(self, name: str) -> str:
        """ "config" or "admin"."""
        return self._origins.get(name, "config")

    def update(
        self, name: str, changes: Mapping[str, Any], actor: str
    ) -> tuple[Policy | None, Policy]:
        """Apply `changes` to the policy `name` (created from defaults if new), durably.

        Returns:
            (the policy before, the policy after).

        Raises:
            ConfigError: a change is invalid; the message names the field.
        """
        with self._lock:  # read-merge-validate-persist-publish as one step
            merged: dict[str, Policy | None] = {}

            def merge(stored: dict[str, Any] | None) -> dict[str, Any]:
                # Into the policy as stored (another gateway may have changed it since
                # this one loaded it), else the file's; inside the write's transaction.
                before = parse_policy(name, stored) if stored is not None else self._file.get(name)
                body = {**policy_to_dict(before or Policy(name=name)), **changes}
                body.pop("name", None)
                after = parse_policy(name, body)
                self._check_constitutions([after])
                merged["before"], merged["after"] = before, after
                return policy_to_dict(after)

            # Stored first: memory never shows a change that is not durable.
            self._state.update_policy_override(name, merge, actor)
            before, after = merged["before"], merged["after"]
            assert after is not None
            self._policies = {**self._policies, name: after}
            self._origins = {**self._origins, name: "admin"}
        return before, after

    def _check_constitutions(self, policies: Iterable[Policy]) -> None:
        for policy in policies:
            if policy.constitution not in self._constitutions:
                raise ConfigError(
                    f"policies.{policy.name}.constitution: {policy.constitution!r} is not one "
                    f"of {sorted(self._constitutions)}"
                )
