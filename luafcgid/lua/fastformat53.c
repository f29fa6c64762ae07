/* string.format speed-up built for the Lua 5.3 C API: see fastformat.c. */
#define LUAFCGID_LUA_ABI 503
#include "fastformat.c"
