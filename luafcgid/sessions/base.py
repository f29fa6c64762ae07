"""What every session store is and does (see the package docstring)."""

from __future__ import annotations

import secrets
from typing import Iterable, NamedTuple, Optional, Tuple

# luafcgid2's key alphabet.
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"

# One variable: realm, name, encoded value.
Variable = Tuple[bytes, bytes, bytes]


class StoreError(Exception):
    """The store could not be reached or refused the operation; says which store."""


class Identity(NamedTuple):
    """Who uses a session: REMOTE_ADDR, HTTP_USER_AGENT, HTTP_ACCEPT_LANGUAGE ("" if absent)."""

    address: bytes
    agent: bytes
    language: bytes


class Weights(NamedTuple):
    """luafcgid2's anti-hijack score: each matching part of the identity adds its weight;
    a session is given only to a client scoring at least ``target`` (always when
    ``target`` <= 0)."""

    target: int
    address: int
    agent: int
    language: int

    @classmethod
    def from_settings(cls, session: dict) -> Weights:
        return cls(session["SessionTargetScore"], session["SessionIpScore"],
                   session["SessionUserAgentScore"], session["SessionLanguageScore"])

    def accepts(self, stored: Identity, current: Identity) -> bool:
        if self.target <= 0:
            return True
        score = ((self.address if stored.address == current.address else 0)
                 + (self.agent if stored.agent == current.agent else 0)
                 + (self.language if stored.language == current.language else 0))
        return score >= self.target


def new_key(length: int) -> str:
    """A fresh session key: ``length`` characters from a CSPRNG."""
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(length))


class Store:
    """What every session store does. ``lifetime`` is ``SessionTime`` in seconds.

    All methods may raise :class:`StoreError`; all are safe to call from several
    threads at once, and from several processes sharing the store.
    """

    name = "store"  # for log lines: which store failed

    def __init__(self, lifetime: int, weights: Weights, key_length: int) -> None:
        self.lifetime = lifetime
        self.weights = weights
        self.key_length = key_length

    def open(self, key: str, identity: Identity) -> Optional[Iterable[Variable]]:
        """The variables of session ``key`` when it exists, has not expired and
        ``identity`` scores enough against the stored one; else None. An accepted
        session gets the new identity and a fresh expiry."""
        raise NotImplementedError

    def create(self, identity: Identity) -> str:
        """A new empty session for ``identity``; returns its key."""
        raise NotImplementedError

    def set(self, key: str, realm: bytes, name: bytes, value: Optional[bytes]) -> bool:
        """Store one variable (None removes it) and refresh the expiry. False when the
        session no longer exists (deleted or expired meanwhile): nothing was stored."""
        raise NotImplementedError

    def clear(self, key: str, realm: Optional[bytes]) -> None:
        """Remove the variables of ``realm`` (every realm when None)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove the session and its variables."""
        raise NotImplementedError

    def sweep(self) -> int:
        """Remove expired sessions; returns how many (0 where the store expires keys itself)."""
        return 0

    def close(self) -> None:
        """Release connections (the worker is exiting)."""
