/* Lua speed-ups built for the Lua 5.3 C API: see speedups.c. */
#define LUAFCGID_LUA_ABI 503
#include "speedups.c"
