/* Lua speed-ups built for the Lua 5.1 C API: see speedups.c. */
#define LUAFCGID_LUA_ABI 501
#include "speedups.c"
