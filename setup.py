"""The optional compiled speed-ups (docs/design.rst, "Compiled speed-ups").

Everything else is in setup.cfg. Each speed-up is an Extension with ``optional=True``:
on a machine without a C compiler ``pip install .`` still succeeds, and luafcgid runs
the pure paths instead (its start log line says which it runs).
"""

from setuptools import Extension, setup

# Lua speed-ups (string.format, PARAMS into a table), one build per Lua C API: 51 serves
# Lua 5.1 and LuaJIT.
LUA_APIS = ("51", "53", "54")

setup(ext_modules=[
    # PARAMS decoding for luafcgid/protocol.py
    Extension("luafcgid._speedups", ["luafcgid/_speedups.c"], optional=True),
] + [
    Extension(f"luafcgid.lua._speedups{api}", [f"luafcgid/lua/speedups{api}.c"],
              depends=["luafcgid/lua/speedups.c"], extra_compile_args=["-O2"],
              optional=True)
    for api in LUA_APIS
])
