/* Lua speed-ups built for the Lua 5.4 C API: see speedups.c. */
#define LUAFCGID_LUA_ABI 504
#include "speedups.c"
