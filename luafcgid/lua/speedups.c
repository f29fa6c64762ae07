/*
 * Lua speed-ups loaded into each state of a worker process (prelude.lua; "compiled
 * speed-ups" in docs/design.rst): a faster string.format for PUC Lua (5.1, 5.3, 5.4), and
 * the request's PARAMS decoded straight into its env table (every Lua, LuaJIT too).
 *
 * string.format (luaopen_luafcgid_fastformat).
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
 * PARAMS (luaopen_luafcgid_params). The FastCGI name-value pairs as the web server sent
 * them, decoded into a new table: a Python dict converted by lupa costs a Python call per
 * key and value. Python has decoded the same bytes already (protocol.py), so they are
 * well-formed; should they not be, the function raises.
 *
 * No Lua header is needed: the few API functions used are declared below for each ABI,
 * so one source builds for every version without lua5.x-dev installed. The symbols
 * resolve against the runtime the worker made global (lua/runtime.py).
 *
 * Build macro LUAFCGID_LUA_ABI: 501 (Lua 5.1 and LuaJIT), 503 or 504.
 */

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
extern void lua_createtable(lua_State *L, int narr, int nrec);
extern void lua_rawset(lua_State *L, int idx);

typedef struct lua_Debug lua_Debug;
typedef void (*lua_Hook)(lua_State *L, lua_Debug *ar);
#define LUA_MASKCOUNT (1 << 3)
extern void lua_setfield(lua_State *L, int idx, const char *k);

#if LUAFCGID_LUA_ABI == 501
typedef ptrdiff_t lua_Integer;
#define LUA_REGISTRYINDEX (-10000)
#define lua_upvalueindex(i) (-10002 - (i))
extern void lua_getfield(lua_State *L, int idx, const char *k);
extern void lua_call(lua_State *L, int nargs, int nresults);
extern int lua_sethook(lua_State *L, lua_Hook func, int mask, int count);
extern lua_Number lua_tonumber(lua_State *L, int idx);
extern void lua_pushlstring(lua_State *L, const char *s, size_t len);
extern void lua_insert(lua_State *L, int idx);
extern int lua_pcall(lua_State *L, int nargs, int nresults, int errfunc);
#else
typedef long long lua_Integer;
typedef intptr_t lua_KContext;
typedef int (*lua_KFunction)(lua_State *L, int status, lua_KContext ctx);
#define LUA_REGISTRYINDEX (-1001000)
#define lua_upvalueindex(i) (LUA_REGISTRYINDEX - (i))
extern int lua_getfield(lua_State *L, int idx, const char *k);
extern void lua_callk(lua_State *L, int nargs, int nresults, lua_KContext ctx, lua_KFunction k);
extern void lua_sethook(lua_State *L, lua_Hook func, int mask, int count);
#define lua_call(L, n, r) lua_callk(L, (n), (r), 0, NULL)
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

/* Entry point (package.loadlib): called with Lua's string.format, returns the fast one. */
int luaopen_luafcgid_fastformat(lua_State *L) {
    lua_settop(L, 1);
    lua_pushcclosure(L, fast_format, 1);
    return 1;
}

/* A pair length: 1 byte below 128, else 4 bytes big-endian with the high bit set. */
static int pair_length(const unsigned char *s, size_t *pos, size_t end, size_t *length) {
    size_t p = *pos;
    if (p >= end)
        return 0;
    if (s[p] < 128) {
        *length = s[p];
        *pos = p + 1;
        return 1;
    }
    if (end - p < 4)
        return 0;
    *length = ((size_t)(s[p] & 0x7F) << 24) | ((size_t)s[p + 1] << 16)
              | ((size_t)s[p + 2] << 8) | (size_t)s[p + 3];
    *pos = p + 4;
    return 1;
}

/* decode(pairs) -> table: FastCGI name-value pairs; a repeated name keeps its last value. */
static int decode_params(lua_State *L) {
    size_t end, pos = 0;
    const unsigned char *s = (const unsigned char *)lua_tolstring(L, 1, &end);
    if (s == NULL || lua_type(L, 1) != LUA_TSTRING) {
        lua_pushlstring(L, "PARAMS must be a string", 23);
        return lua_error(L);
    }
    lua_createtable(L, 0, 32);
    while (pos < end) {
        size_t name_length, value_length;
        if (!pair_length(s, &pos, end, &name_length) || !pair_length(s, &pos, end, &value_length)
                || name_length > end - pos || value_length > end - pos - name_length) {
            lua_pushlstring(L, "truncated FastCGI name-value pair", 33);
            return lua_error(L);
        }
        lua_pushlstring(L, (const char *)s + pos, name_length);
        lua_pushlstring(L, (const char *)s + pos + name_length, value_length);
        lua_rawset(L, -3);
        pos += name_length + value_length;
    }
    return 1;
}

/* Entry point (package.loadlib): returns the PARAMS decoder. */
int luaopen_luafcgid_params(lua_State *L) {
    lua_pushcclosure(L, decode_params, 0);
    return 1;
}


/*
 * The watchdog (luaopen_luafcgid_watchdog): no hook while a handler runs, until a deadline.
 *
 * Lua 5.3 and 5.4 run every instruction through the hook dispatcher while any hook is set,
 * whatever its count: CPU-bound Lua runs 2-2.6x slower under the count-hook watchdog.
 * Here a request's main thread runs with no hook at all. arm(seconds) notes, for the OS
 * thread running it, the state and the moment it must be looked at (the timeout or the
 * slow-log threshold); a timer thread, one per worker process, sends that OS thread a
 * signal once the moment has passed, and the signal handler sets a count hook of 1 on the
 * state. That is how lua.c stops a script on Ctrl-C: lua_sethook is made to be called
 * from a signal handler on the running thread, and the hook then runs at the state's next
 * instruction. The hook calls the prelude's watchdog function (stored in the registry),
 * which decides as the count hook's did. disarm() ends the watch as the handler returns.
 *
 * Coroutines keep the count hook (the prelude sets it as each starts): only the state's
 * main thread is known here. A thread with no free slot gets false from arm() and the
 * count hook.
 */

#define WATCHDOG_KEY "luafcgid.watchdog"
#define MAX_SLOTS 256
#define TIMER_TICK 0.05   /* s: how late a newly armed moment may be noticed at most */
#define TIMER_REST 1.0    /* s without an armed slot before the timer waits unbounded */
#define WATCHDOG_SIGNAL (SIGRTMIN + 3)

typedef struct {
    pthread_t thread;     /* set once, when the OS thread first arms */
    lua_State *L;         /* the state's main thread while armed */
    double due;           /* CLOCK_MONOTONIC seconds */
    int armed;            /* atomic */
    int signalled;
} Slot;

static Slot slots[MAX_SLOTS];
static int slot_count;    /* atomic: slots handed out */
static __thread int my_slot = -1;
static pthread_mutex_t timer_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t timer_wake;
static int timer_resting; /* atomic: the timer waits for an arm() without a time limit */
static pthread_once_t timer_once = PTHREAD_ONCE_INIT;
static pthread_once_t signal_once = PTHREAD_ONCE_INIT;
static int timer_running, signal_installed;

static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static void watchdog_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_getfield(L, LUA_REGISTRYINDEX, WATCHDOG_KEY);
    lua_call(L, 0, 0);
}

static void on_signal(int signum) {
    (void)signum;
    int saved = errno;
    pthread_t self = pthread_self();
    int count = __atomic_load_n(&slot_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < count; i++) {
        Slot *slot = &slots[i];
        if (pthread_equal(slot->thread, self)) {
            if (__atomic_load_n(&slot->armed, __ATOMIC_ACQUIRE))
                lua_sethook(slot->L, watchdog_hook, LUA_MASKCOUNT, 1);
            break;
        }
    }
    errno = saved;
}

/* Signals the threads whose moment passed; 1 when any slot is armed. */
static int look(double now, double *earliest) {
    int any = 0, count = __atomic_load_n(&slot_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < count; i++) {
        Slot *slot = &slots[i];
        if (!__atomic_load_n(&slot->armed, __ATOMIC_SEQ_CST))
            continue;
        any = 1;
        if (slot->due <= now) {
            if (!slot->signalled) {
                slot->signalled = 1;
                pthread_kill(slot->thread, WATCHDOG_SIGNAL);
            }
        } else if (slot->due < *earliest) {
            *earliest = slot->due;
        }
    }
    return any;
}

static void *timer_main(void *unused) {
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);  /* Python's signals go to its own threads */
    pthread_mutex_lock(&timer_lock);
    double last_armed = monotonic();
    for (;;) {
        double now = monotonic(), earliest = now + TIMER_TICK;
        if (look(now, &earliest)) {
            last_armed = now;
        } else if (now - last_armed > TIMER_REST) {
            /* An idle worker costs no wake-ups: arm() wakes the timer (Dekker-style with
             * timer_resting; both sides are sequentially consistent). */
            __atomic_store_n(&timer_resting, 1, __ATOMIC_SEQ_CST);
            if (!look(now, &earliest))
                pthread_cond_wait(&timer_wake, &timer_lock);
            __atomic_store_n(&timer_resting, 0, __ATOMIC_SEQ_CST);
            last_armed = monotonic();
            continue;
        }
        struct timespec until;
        until.tv_sec = (time_t)earliest;
        until.tv_nsec = (long)((earliest - (double)until.tv_sec) * 1e9);
        pthread_cond_timedwait(&timer_wake, &timer_lock, &until);
    }
    return NULL;
}

static void start_timer(void) {
    pthread_condattr_t attributes;
    pthread_t timer;
    pthread_attr_t thread_attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&timer_wake, &attributes);
    pthread_attr_init(&thread_attributes);
    pthread_attr_setdetachstate(&thread_attributes, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&thread_attributes, 64 * 1024);
    timer_running = pthread_create(&timer, &thread_attributes, timer_main, NULL) == 0;
}

static void install_signal(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    signal_installed = sigaction(WATCHDOG_SIGNAL, &action, NULL) == 0;
}

static Slot *own_slot(void) {
    if (my_slot >= 0)
        return &slots[my_slot];
    pthread_mutex_lock(&timer_lock);
    int index = slot_count < MAX_SLOTS ? slot_count : -1;
    if (index >= 0) {
        slots[index].thread = pthread_self();
        __atomic_store_n(&slot_count, index + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&timer_lock);
    my_slot = index;
    return index >= 0 ? &slots[index] : NULL;
}

/* arm(seconds) -> true: the watch is on; false: use the count hook. */
static int watchdog_arm(lua_State *L) {
    double seconds = (double)lua_tonumber(L, 1);
    pthread_once(&timer_once, start_timer);
    Slot *slot = timer_running && signal_installed ? own_slot() : NULL;
    if (slot == NULL)
        return 0;  /* nil: the caller sets the count hook instead */
    slot->L = L;
    slot->due = monotonic() + (seconds > 0 ? seconds : 0);
    slot->signalled = 0;
    __atomic_store_n(&slot->armed, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&timer_resting, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&timer_lock);
        pthread_cond_signal(&timer_wake);
        pthread_mutex_unlock(&timer_lock);
    }
    lua_pushvalue(L, 1);  /* a number, true to Lua */
    return 1;
}

static int watchdog_disarm(lua_State *L) {
    (void)L;
    if (my_slot >= 0)
        __atomic_store_n(&slots[my_slot].armed, 0, __ATOMIC_SEQ_CST);
    return 0;
}

/* Entry point (package.loadlib): called with the prelude's watchdog function, returns
 * arm and disarm. */
int luaopen_luafcgid_watchdog(lua_State *L) {
    lua_settop(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, WATCHDOG_KEY);
    pthread_once(&signal_once, install_signal);
    lua_pushcclosure(L, watchdog_arm, 0);
    lua_pushcclosure(L, watchdog_disarm, 0);
    return 2;
}
