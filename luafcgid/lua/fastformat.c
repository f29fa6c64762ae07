/*
 * A faster string.format for PUC Lua (5.1, 5.3, 5.4), loaded into each state of a worker
 * process (prelude.lua, "compiled speed-ups" in docs/design.rst).
 *
 * PUC Lua formats every %d and %f through snprintf, and every %s through luaL_tolstring (a
 * metatable look-up per argument): on a page built with string.format that is most of the
 * page's CPU. Here the common conversions are done directly:
 *
 *   %%, %s of a string, %d of an integer (5.3+: an integer subtype; 5.1: an integral
 *   double within +-2^53), and %e %E %f %g %G of a number with at most the flags, width
 *   and precision Lua itself accepts ([-+ #0]* then at most two digits, "." and two).
 *
 * Anything else in the format, or an argument of another type, and the whole call is
 * made by Lua's own string.format (an upvalue) with the same arguments, so every other
 * conversion, every conversion of a string or a table with __tostring, and every error
 * is Lua's own. Such an error is raised from this C function, not from the caller's
 * line: it is re-raised with the caller's position and 'format' as the function's name,
 * which is what Lua says for a direct call.
 *
 * No Lua header is needed: the few API functions used are declared below for each ABI,
 * so one source builds for every version without lua5.x-dev installed. The symbols
 * resolve against the runtime the worker made global (lua/runtime.py).
 *
 * Build macro LUAFCGID_LUA_ABI: 501, 503 or 504.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef LUAFCGID_LUA_ABI
#error "LUAFCGID_LUA_ABI must be 501, 503 or 504"
#endif

typedef struct lua_State lua_State;
typedef double lua_Number;
typedef int (*lua_CFunction)(lua_State *L);

#define LUA_TSTRING 4
#define LUA_TNUMBER 3

extern int lua_gettop(lua_State *L);
extern void lua_settop(lua_State *L, int idx);
extern int lua_type(lua_State *L, int idx);
extern const char *lua_tolstring(lua_State *L, int idx, size_t *len);
extern void lua_pushvalue(lua_State *L, int idx);
extern void lua_pushcclosure(lua_State *L, lua_CFunction fn, int n);
extern int lua_error(lua_State *L);
extern void luaL_where(lua_State *L, int lvl);
extern void lua_concat(lua_State *L, int n);

#if LUAFCGID_LUA_ABI == 501
typedef ptrdiff_t lua_Integer;
#define lua_upvalueindex(i) (-10002 - (i))
extern lua_Number lua_tonumber(lua_State *L, int idx);
extern void lua_pushlstring(lua_State *L, const char *s, size_t len);
extern void lua_insert(lua_State *L, int idx);
extern int lua_pcall(lua_State *L, int nargs, int nresults, int errfunc);
#else
typedef long long lua_Integer;
typedef intptr_t lua_KContext;
typedef int (*lua_KFunction)(lua_State *L, int status, lua_KContext ctx);
#define lua_upvalueindex(i) (-1001000 - (i))
extern lua_Number lua_tonumberx(lua_State *L, int idx, int *isnum);
extern lua_Integer lua_tointegerx(lua_State *L, int idx, int *isnum);
extern int lua_isinteger(lua_State *L, int idx);
extern const char *lua_pushlstring(lua_State *L, const char *s, size_t len);
extern void lua_rotate(lua_State *L, int idx, int n);
extern int lua_pcallk(lua_State *L, int nargs, int nresults, int errfunc, lua_KContext ctx,
                      lua_KFunction k);
#define lua_tonumber(L, i) lua_tonumberx(L, (i), NULL)
#define lua_insert(L, idx) lua_rotate(L, (idx), 1)
#define lua_pcall(L, n, r, f) lua_pcallk(L, (n), (r), (f), 0, NULL)
#endif

#define LUA_OK 0

/* An output buffer: on the C stack up to its size, then on the heap. */
typedef struct {
    char *data;
    size_t length, size;
    char local[4096];
} Buffer;

static int reserve(Buffer *b, size_t more) {
    if (b->length + more <= b->size)
        return 1;
    size_t size = b->size * 2;
    while (size < b->length + more)
        size *= 2;
    char *data = b->data == b->local ? malloc(size) : realloc(b->data, size);
    if (data == NULL)
        return 0;
    if (b->data == b->local)
        memcpy(data, b->local, b->length);
    b->data = data;
    b->size = size;
    return 1;
}

static int add(Buffer *b, const char *s, size_t n) {
    if (!reserve(b, n))
        return 0;
    memcpy(b->data + b->length, s, n);
    b->length += n;
    return 1;
}

static int add_integer(Buffer *b, lua_Integer value) {
    char digits[24];
    char *end = digits + sizeof digits, *p = end;
    unsigned long long n = value < 0 ? 0ULL - (unsigned long long)value
                                     : (unsigned long long)value;
    do {
        *--p = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    if (value < 0)
        *--p = '-';
    return add(b, p, (size_t)(end - p));
}

/* The integer a %d argument stands for; 0 when Lua's own format must decide. */
static int integer_argument(lua_State *L, int arg, lua_Integer *value) {
    if (lua_type(L, arg) != LUA_TNUMBER)
        return 0;
#if LUAFCGID_LUA_ABI == 501
    lua_Number number = lua_tonumber(L, arg);
    if (!(number >= -9007199254740992.0 && number <= 9007199254740992.0))
        return 0;
    *value = (lua_Integer)number;
    return (lua_Number)*value == number;
#else
    if (!lua_isinteger(L, arg))
        return 0;
    *value = lua_tointegerx(L, arg, NULL);
    return 1;
#endif
}

/* A float conversion as Lua accepts it: [-+ #0]*, up to 2 digits, optionally "." and up
 * to 2 digits, then one of eEfgG. Returns the spec's length (from '%') or 0. */
static size_t float_spec(const char *spec, const char *end) {
    const char *p = spec + 1;
    while (p < end && strchr("-+ #0", *p) != NULL && *p != '\0')
        p++;
    if (p - spec > 6)
        return 0;
    for (int i = 0; i < 2 && p < end && *p >= '0' && *p <= '9'; i++)
        p++;
    if (p < end && *p == '.') {
        p++;
        for (int i = 0; i < 2 && p < end && *p >= '0' && *p <= '9'; i++)
            p++;
    }
    if (p < end && *p != '\0' && strchr("eEfgG", *p) != NULL)
        return (size_t)(p - spec + 1);
    return 0;
}

enum { DONE, FALLBACK, NO_MEMORY };

static int format_into(lua_State *L, Buffer *b) {
    size_t length;
    const char *p = lua_tolstring(L, 1, &length);
    const char *end = p + length;
    int top = lua_gettop(L), arg = 1;
    while (p < end) {
        const char *percent = memchr(p, '%', (size_t)(end - p));
        if (percent == NULL)
            return add(b, p, (size_t)(end - p)) ? DONE : NO_MEMORY;
        if (!add(b, p, (size_t)(percent - p)))
            return NO_MEMORY;
        if (percent + 1 >= end)
            return FALLBACK;
        char conversion = percent[1];
        p = percent + 2;
        if (conversion == '%') {
            if (!add(b, "%", 1))
                return NO_MEMORY;
            continue;
        }
        if (++arg > top)
            return FALLBACK;
        if (conversion == 's') {
            size_t n;
            if (lua_type(L, arg) != LUA_TSTRING)
                return FALLBACK;
            const char *s = lua_tolstring(L, arg, &n);
            if (memchr(s, '\0', n) != NULL)  /* 5.1 cuts short strings at a zero */
                return FALLBACK;
            if (!add(b, s, n))
                return NO_MEMORY;
        } else if (conversion == 'd') {
            lua_Integer value;
            if (!integer_argument(L, arg, &value))
                return FALLBACK;
            if (!add_integer(b, value))
                return NO_MEMORY;
        } else {
            size_t spec_length = float_spec(percent, end);
            char spec[16], out[512];
            if (spec_length == 0 || lua_type(L, arg) != LUA_TNUMBER)
                return FALLBACK;
            memcpy(spec, percent, spec_length);
            spec[spec_length] = '\0';
            int n = snprintf(out, sizeof out, spec, (double)lua_tonumber(L, arg));
            if (n < 0 || (size_t)n >= sizeof out)
                return FALLBACK;
            if (!add(b, out, (size_t)n))
                return NO_MEMORY;
            p = percent + spec_length;
        }
    }
    return DONE;
}

/* Lua's own string.format with the same arguments; its error as a direct call gives it. */
static int lua_format(lua_State *L) {
    int top = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    if (lua_pcall(L, top, 1, 0) == LUA_OK)
        return 1;
    if (lua_type(L, -1) == LUA_TSTRING) {
        size_t n;
        const char *message = lua_tolstring(L, -1, &n);
        const char *unnamed = strstr(message, " to '?'");
        luaL_where(L, 1);
        if (unnamed != NULL) {
            lua_pushlstring(L, message, (size_t)(unnamed - message));
            lua_pushlstring(L, " to 'format'", 12);
            lua_pushlstring(L, unnamed + 7, n - (size_t)(unnamed + 7 - message));
            lua_concat(L, 4);
        } else {
            lua_pushvalue(L, -2);
            lua_concat(L, 2);
        }
    }
    return lua_error(L);
}

static int fast_format(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        return lua_format(L);
    Buffer b;
    b.data = b.local;
    b.length = 0;
    b.size = sizeof b.local;
    int outcome = format_into(L, &b);
    if (outcome == DONE)
        lua_pushlstring(L, b.data, b.length);
    if (b.data != b.local)
        free(b.data);
    if (outcome == DONE)
        return 1;
    /* FALLBACK, and out of memory: Lua's format then raises Lua's own memory error. */
    return lua_format(L);
}

/* require-less entry point: called with Lua's string.format, returns the fast one. */
int luaopen_luafcgid_fastformat(lua_State *L) {
    lua_settop(L, 1);
    lua_pushcclosure(L, fast_format, 1);
    return 1;
}
