/* string.format speed-up built for the Lua 5.4 C API: see fastformat.c. */
#define LUAFCGID_LUA_ABI 504
#include "fastformat.c"
