/* string.format speed-up built for the Lua 5.1 C API: see fastformat.c. */
#define LUAFCGID_LUA_ABI 501
#include "fastformat.c"
