"""The Lua side of luafcgid: Lua states (one script each) and the per-worker state cache."""

from luafcgid.lua.cache import StateCache
from luafcgid.lua.state import ScriptError, State

__all__ = ["ScriptError", "State", "StateCache"]
