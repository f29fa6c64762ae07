"""The optional compiled speed-ups (docs/design.rst, "Compiled speed-ups").

Everything else is in setup.cfg. Each speed-up is an Extension with ``optional=True``:
on a machine without a C compiler ``pip install .`` still succeeds, and luafcgid runs
the pure paths instead (its start log line says which it runs).
"""

from setuptools import Extension, setup

# string.format for PUC Lua, one build per C API (LuaJIT's own format is fast already).
LUA_APIS = ("51", "53", "54")

setup(ext_modules=[
    # PARAMS decoding for luafcgid/protocol.py
    Extension("luafcgid._speedups", ["luafcgid/_speedups.c"], optional=True),
] + [
    Extension(f"luafcgid.lua._fastformat{api}", [f"luafcgid/lua/fastformat{api}.c"],
              depends=["luafcgid/lua/fastformat.c"], extra_compile_args=["-O2"],
              optional=True)
    for api in LUA_APIS
])
