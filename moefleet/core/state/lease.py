"""The leader lease and its fencing tokens."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moefleet.core.state.base import StoreBase, _check_positive


class LeaseRecord(BaseModel):
    """The leader lease as stored under ``ns:lease``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holder: str = Field(description="Id of the lease holder (a controller instance).")
    expires_at: float = Field(description="`now` + ttl when the lease lapses (the store's clock unless a `now` was given).")
    token: int = Field(default=0, description="Fencing token of this holding; larger than every earlier holding's.")



class LeaseOps(StoreBase):
    """Leader lease operations of ``StateStore``."""

    def _lease_args(self, holder: str, ttl_s: float, now: float | None) -> list[Any]:
        if not holder:
            raise ValueError("holder: must be a non-empty id")
        ttl_s = _check_positive("ttl_s", ttl_s)
        now = self._now(now)
        return [holder, repr(float(now)), repr(float(now) + ttl_s), max(1, math.ceil(ttl_s * 1000))]

    def try_acquire_lease(self, holder: str, ttl_s: float, now: float | None = None) -> int:
        """Take the lease for ``ttl_s`` if it is free, lapsed by ``now``, or already ``holder``'s.

        Redis expires the key after ``ttl_s`` (PX), so a dead holder's lease
        lapses without anyone writing. Returns the holding's fencing token
        (> 0, truthy) if ``holder`` now holds it, else 0. ``now=None``: the
        store's clock.
        """
        args = self._lease_args(holder, ttl_s, now)
        with self._redis("try_acquire_lease") as r:
            candidate = int(self._server_time(r) * 1e6)
            return int(self._acquire_script(keys=[self.keys.lease, self.keys.lease_token], args=[*args, candidate], client=r))

    def renew_lease(self, holder: str, ttl_s: float, now: float | None = None, *, token: int | None = None) -> int:
        """Extend ``holder``'s lease to ``now + ttl_s``; 0 if it is not (or no longer, by ``now``) the holder.

        With ``token``, renews only the holding that token was handed out for.
        Returns the holding's fencing token (truthy) on success. A holder that
        gets 0 has lost leadership and must stop acting as leader (it may try
        to acquire again, under a new token).
        """
        args = self._lease_args(holder, ttl_s, now)
        with self._redis("renew_lease") as r:
            return int(self._renew_script(keys=[self.keys.lease], args=[*args, "" if token is None else str(int(token))], client=r))

    def lease(self) -> LeaseRecord | None:
        """The lease record as stored (None when no one holds it)."""
        with self._redis("lease") as r:
            raw = r.get(self.keys.lease)
        return None if raw is None else LeaseRecord.model_validate_json(raw)

    def release_lease(self, holder: str) -> bool:
        """Give the lease up; False (and nothing changes) if ``holder`` does not hold it."""
        with self._redis("release_lease") as r:
            return bool(self._release_script(keys=[self.keys.lease], args=[holder], client=r))

    def lease_holder(self, now: float | None = None) -> str | None:
        """Who holds the lease: None if the key lapsed in Redis, or (given ``now``) if it lapsed by ``now``."""
        with self._redis("lease_holder") as r:
            raw = r.get(self.keys.lease)
        if raw is None:
            return None
        record = LeaseRecord.model_validate_json(raw)
        if now is not None and record.expires_at <= now:
            return None
        return record.holder

