"""The authorization policy: roles (RBAC) granting actions on resources, each grant optionally limited by
attribute conditions (ABAC) over the token's claims and the request (source network, time window), plus per-role
rate limits. The file has the source documents' shape:

    roles:
      - name: model_admin
        policies:
          - resource: "models/*"
            actions: [deploy, update, delete]
      - name: inference_user
        rate_limit_per_minute: 100
        policies:
          - resource: "models/deepseek*"
            actions: [predict]
            conditions:                        # all must hold (ABAC)
              source_networks: [10.0.0.0/8]
              time_window: {start: "06:00", end: "22:00", timezone: UTC, days: [mon, tue, wed, thu, fri]}
              claims: {department: [ml, research]}

Resources are glob patterns over `models/<served model name>`; a request is allowed when any grant of any of
the principal's roles covers its action and resource and that grant's conditions hold. Nothing else is allowed.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepfleet.security.errors import SecurityConfigError
from deepfleet.server.auth.tokens import Principal

ACTIONS = ("predict", "read_logs", "deploy", "update", "delete")
Action = Literal["predict", "read_logs", "deploy", "update", "delete", "*"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class TimeWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: dt.time
    end: dt.time
    timezone: str = "UTC"
    days: list[Day] = Field(default_factory=lambda: list(_DAYS))

    @field_validator("start", "end", mode="before")
    @classmethod
    def _quoted_time(cls, value: Any) -> Any:
        # unquoted 06:00 is a YAML 1.1 sexagesimal integer (360): insist on a "HH:MM" string
        if not isinstance(value, str) or not re.fullmatch(r"\d{2}:\d{2}", value):
            raise ValueError(f'expected a quoted "HH:MM" time, got {value!r}')
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def contains(self, now: dt.datetime) -> bool:
        local = now.astimezone(ZoneInfo(self.timezone))
        t = local.time().replace(tzinfo=None)
        inside = self.start <= t < self.end if self.start <= self.end else (t >= self.start or t < self.end)
        return inside and _DAYS[local.weekday()] in self.days

    def describe(self) -> str:
        return f"time {self.start:%H:%M}-{self.end:%H:%M} {self.timezone} on {','.join(self.days)}"


class Conditions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None
    time_window: TimeWindow | None = None
    claims: dict[str, list[str | int | bool]] | None = Field(
        None, description="claim -> accepted values; a list-valued claim matches when any element is accepted"
    )

    def failed(self, principal: Principal, client_ip: str | None, now: dt.datetime) -> list[str]:
        """The conditions that do not hold, described (empty: all hold)."""
        failed = []
        if self.source_networks is not None:
            addr = _address(client_ip)
            if addr is None or not any(addr in net for net in self.source_networks):
                failed.append(f"source network in {[str(n) for n in self.source_networks]} (request from "
                              f"{client_ip or 'unknown'})")
        if self.time_window is not None and not self.time_window.contains(now):
            failed.append(self.time_window.describe())
        for claim, accepted in (self.claims or {}).items():
            value = principal.claims.get(claim)
            values = value if isinstance(value, list) else [value]
            if not any(v in accepted for v in values if v is not None):
                failed.append(f"claim {claim} in {accepted}")
        return failed


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resource: str = Field(min_length=1)
    actions: list[Action] = Field(min_length=1)
    conditions: Conditions | None = None

    def covers(self, resource: str, action: str) -> bool:
        return ("*" in self.actions or action in self.actions) and fnmatch.fnmatchcase(resource, self.resource)


class Role(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    policies: list[Grant] = Field(default_factory=list)
    rate_limit_per_minute: int | None = Field(None, ge=1)


class PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(min_length=1)

    @field_validator("roles")
    @classmethod
    def _unique_names(cls, roles: list[Role]) -> list[Role]:
        names = [r.name for r in roles]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"role names appear twice: {dupes}")
        return roles


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


class Policy:
    def __init__(self, document: PolicyDocument, source: str) -> None:
        self.roles = {r.name: r for r in document.roles}
        self.source = source

    @classmethod
    def load(cls, path: Path) -> Policy:
        where = f"auth.policy_file {path}"
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise SecurityConfigError(f"{where}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise SecurityConfigError(f"{where}: not valid YAML ({e})") from None
        try:
            return cls(PolicyDocument.model_validate(data), str(path))
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
            raise SecurityConfigError(f"{where}: {loc or 'document'}: {first['msg']}") from None

    def authorize(self, principal: Principal, resource: str, action: str, client_ip: str | None,
                  now: dt.datetime | None = None) -> Decision:
        now = now or dt.datetime.now(dt.timezone.utc)
        unmet: list[str] = []
        for name in sorted(principal.roles & self.roles.keys()):
            for grant in self.roles[name].policies:
                if not grant.covers(resource, action):
                    continue
                failed = grant.conditions.failed(principal, client_ip, now) if grant.conditions else []
                if not failed:
                    return Decision(True, f"role {name} grants {action} on {grant.resource}")
                unmet.append(f"role {name} grants {action} on {grant.resource} only with " + "; ".join(failed))
        if unmet:
            return Decision(False, " | ".join(unmet))
        return Decision(False, f"no role of the principal grants {action} on {resource}")

    def rate_limit(self, roles: frozenset[str], default: int) -> int:
        """The highest per-role limit among the principal's roles, else the server default."""
        limits = [self.roles[r].rate_limit_per_minute for r in roles & self.roles.keys()]
        return max((n for n in limits if n is not None), default=default)

    def summary(self) -> dict[str, Any]:
        return {"roles": sorted(self.roles), "source": self.source}
