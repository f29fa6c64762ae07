--[[
notes.lua: a small notes board, luafcgid's showcase. Sign in with a name, post notes, read
them as a page or as JSON, sign out. Plain HTML with inline CSS: no script, no external
file, font or stylesheet; readable on a phone.

Files: this script (routes, checks, the page) and notes_db.lua beside it (the storage:
SQLite through LuaSQL's C driver, Debian's lua-sql-sqlite3; one connection per Lua state,
opened at its first query, reused by the state's later requests, reconnected once when a
query fails). Runs on Lua 5.4, 5.1 and LuaJIT (the config's `lua`).

Where the notes live: Config.notes_db in the config file (examples/config.lua sets it),
else luafcgid-notes.db in $TMPDIR or /tmp, which the workers can write both when a user
started the server and when root did (the workers then run as the config's `user`, e.g.
nobody). The workers create the file and its table at first use; a file they cannot
write is a 500 whose log line names it and the key to change.

Routes (one script):
    GET  notes.lua               the board: the sign-in form or the note form, then the notes
    GET  notes.lua?format=json   the newest notes as JSON: {"notes": [{id, author, text,
                                 created}, ...]}, newest first
    POST notes.lua               action = signin (name), post (body) or signout; answered
                                 with a 303 back to the board and a one-time (flash)
                                 message kept in the session

Security: every form carries the session's CSRF token in a hidden field; a POST whose
token is missing or differs from the one in the session gets 403 and changes nothing.
Every string a user wrote goes out through con:escape. Signing in and out starts a new
session, so a session key handed out before sign-in is worth nothing after it. The page's
Content-Security-Policy allows no script at all and only its own inline style. Signing in
asks only for a name: this example shows sessions, not passwords.
]]

local db = require("notes_db")

local format, byte, sub, find, gsub = string.format, string.byte, string.sub, string.find,
    string.gsub
local concat = table.concat
local os_date, os_time = os.date, os.time

local MAX_NOTE = 2000  -- characters in a note
local MAX_NAME = 40    -- characters in a name
local SHOWN = 50       -- notes on the page and in the JSON

local config = Config or {}
db.use(config.notes_db or ((os.getenv("TMPDIR") or "/tmp") .. "/luafcgid-notes.db"))
local SITE_NAME = config.site_name or "luafcgid"
local RUNTIME = type(jit) == "table" and jit.version or _VERSION

-- Input ---------------------------------------------------------------------------------

-- A form field as a string (nil when absent or repeated).
local function field(fields, name)
    local value = fields[name]
    return type(value) == "string" and value or nil
end

local function is_space(b)
    return b == 32 or (b >= 9 and b <= 13)
end

-- Linear in the length, whatever the input (a pattern like "^%s*(.-)%s*$" is not).
local function trim(s)
    local first, last = 1, #s
    while first <= last and is_space(byte(s, first)) do
        first = first + 1
    end
    while last >= first and is_space(byte(s, last)) do
        last = last - 1
    end
    return sub(s, first, last)
end

-- The number of characters in s when it is UTF-8 without control characters (newlines
-- and tabs allowed when multiline), else nil. Lua 5.1 has no utf8 library, so by hand.
local function characters(s, multiline)
    local count, i, n = 0, 1, #s
    while i <= n do
        local c = byte(s, i)
        local size
        if c < 0x80 then
            if c == 0x7F or (c < 0x20 and not (multiline and (c == 10 or c == 9))) then
                return nil
            end
            size = 1
        elseif c >= 0xC2 and c <= 0xDF then
            size = 2
        elseif c >= 0xE0 and c <= 0xEF then
            size = 3
        elseif c >= 0xF0 and c <= 0xF4 then
            size = 4
        else
            return nil
        end
        for j = i + 1, i + size - 1 do
            local b = byte(s, j)
            if not b or b < 0x80 or b > 0xBF then
                return nil
            end
        end
        i, count = i + size, count + 1
    end
    return count
end

-- Session: the CSRF token, the signed-in name and the flash message --------------------

-- 128 random bits as hex.
local function new_token()
    local random = io.open("/dev/urandom", "rb")
    if not random then
        error("notes: cannot read /dev/urandom to make a CSRF token", 0)
    end
    local bytes = random:read(16)
    random:close()
    return (gsub(bytes, ".", function(c) return format("%02x", byte(c)) end))
end

-- The session's token; a visitor without one gets a session and a token.
local function csrf_token()
    local token = Session.GetVar("csrf", "token")
    if not token then
        token = new_token()
        Session.SetVar("csrf", "token", token)
    end
    return token
end

-- A message for the next page (after the 303), and the text of a note to give back.
local function flash(kind, text, draft)
    Session.SetVar("flash", "message", {kind = kind, text = text})
    if draft then
        Session.SetVar("flash", "draft", draft)
    end
end

local function take_flash()
    if not Session.HasRealm("flash") then
        return nil, nil
    end
    local message, draft = Session.GetVar("flash", "message"), Session.GetVar("flash", "draft")
    Session.Clear("flash")
    return message, draft
end

-- A fresh session: whatever key the client had before is worth nothing now.
local function new_session()
    Session.Delete()
    Session.SetVar("csrf", "token", new_token())
end

-- Actions (POST) ------------------------------------------------------------------------

local function sign_in(form)
    local name = trim(field(form, "name") or "")
    local length = characters(name, false)
    if not length or length == 0 or length > MAX_NAME then
        return flash("error", format("Choose a name of 1 to %d characters.", MAX_NAME))
    end
    new_session()
    Session.SetVar("auth", "user", name)
    flash("ok", "Welcome, " .. name .. ".")
end

local function post_note(form, user)
    if not user then
        return flash("error", "Sign in to post a note.")
    end
    local body = trim((gsub(field(form, "body") or "", "\r\n?", "\n")))
    if #body > 4 * MAX_NOTE then  -- too long whatever its characters: not worth counting
        return flash("error", format("Your note is longer than %d characters.", MAX_NOTE))
    end
    local length = characters(body, true)
    if not length then
        return flash("error", "Your note has characters that cannot be stored "
            .. "(control characters or invalid UTF-8).")
    elseif length == 0 then
        return flash("error", "Write something first.")
    elseif length > MAX_NOTE then
        return flash("error", format("Your note has %d characters; the limit is %d.",
            length, MAX_NOTE), body)
    end
    db.add(user, body, os_time())
    flash("ok", "Note posted.")
end

local function sign_out()
    new_session()
    flash("ok", "Signed out.")
end

local ACTIONS = {signin = sign_in, post = post_note, signout = sign_out}

-- Pages ---------------------------------------------------------------------------------

local STYLE = [[
:root{--bg:#f4f5f7;--card:#fff;--ink:#1c2230;--muted:#5f6b7c;--line:#e2e6ec;
--accent:#3557d4;--accent-ink:#fff;--ok:#e7f5ec;--ok-ink:#1d6a3a;--err:#fdeceb;
--err-ink:#a3261f;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#111419;--card:#1a1e26;--ink:#e5e8ee;
--muted:#9aa4b4;--line:#2b303b;--accent:#7d9bff;--accent-ink:#0c1122;--ok:#14301f;
--ok-ink:#8fd9a8;--err:#3b1716;--err-ink:#f4a59f}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:42rem;margin:0 auto;padding:2rem 1rem 3rem}
.top{display:flex;flex-wrap:wrap;align-items:center;justify-content:space-between;
gap:.75rem;margin-bottom:1.25rem}
h1{font-size:1.75rem;line-height:1.2;margin:0;letter-spacing:-.01em}
.sub{margin:.1rem 0 0;color:var(--muted);font-size:.9rem}
.who{display:flex;align-items:center;gap:.6rem;color:var(--muted);font-size:.95rem}
.who strong{color:var(--ink)}
.card{background:var(--card);border:1px solid var(--line);border-radius:14px;
padding:1rem 1.15rem;box-shadow:0 1px 2px rgba(16,24,40,.06)}
form.card{margin-bottom:1.5rem}
label{display:block;font-weight:600;margin-bottom:.4rem}
input[type=text],textarea{width:100%;font:inherit;color:inherit;background:var(--bg);
border:1px solid var(--line);border-radius:10px;padding:.6rem .75rem}
textarea{resize:vertical;min-height:6rem}
input:focus,textarea:focus{outline:2px solid var(--accent);outline-offset:1px}
button{font:inherit;font-weight:600;border:0;border-radius:10px;padding:.55rem 1.1rem;
background:var(--accent);color:var(--accent-ink);cursor:pointer}
button.quiet{background:transparent;color:var(--accent);border:1px solid var(--line);
padding:.35rem .8rem;font-size:.9rem}
.row{display:flex;gap:.75rem;align-items:center;justify-content:space-between;margin-top:.6rem}
.row input{flex:1}
.hint{color:var(--muted);font-size:.85rem;margin:.5rem 0 0}
.row .hint{margin:0}
.flash{border-radius:10px;padding:.7rem 1rem;margin:0 0 1.25rem;font-weight:500}
.flash.ok{background:var(--ok);color:var(--ok-ink)}
.flash.error{background:var(--err);color:var(--err-ink)}
.notes{display:grid;gap:.85rem}
.note header{display:flex;justify-content:space-between;gap:1rem;margin-bottom:.35rem;
font-size:.9rem}
.note time{color:var(--muted);white-space:nowrap}
.note p{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.empty{color:var(--muted);text-align:center;padding:2rem 0}
footer{margin-top:2rem;color:var(--muted);font-size:.8rem;text-align:center}
a{color:var(--accent)}
]]

-- No script may run, from anywhere; only this page's own inline style applies.
local POLICY = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    .. "base-uri 'none'; frame-ancestors 'none'"

local function page(con, title, body)
    con:header("Content-Type", "text/html; charset=utf-8")
    con:header("Content-Security-Policy", POLICY)
    con:header("X-Content-Type-Options", "nosniff")
    con:header("Referrer-Policy", "same-origin")
    con:header("Cache-Control", "no-store")  -- the page holds this session's CSRF token
    con:puts('<!doctype html><html lang="en"><head><meta charset="utf-8">'
        .. '<meta name="viewport" content="width=device-width, initial-scale=1">'
        .. "<title>" .. con:escape(title) .. "</title><style>" .. STYLE .. "</style></head>"
        .. "<body><main>" .. body .. "</main></body></html>")
end

local function refuse(con, env, status, title, text)
    con:status(status)
    page(con, title, format('<div class="card"><h1>%s</h1><p>%s</p><p><a href="%s">Back to '
        .. "the notes</a></p></div>", con:escape(title), con:escape(text),
        con:escape(env.SCRIPT_NAME or "notes.lua")))
end

local function hidden(con, token, action)
    return format('<input type="hidden" name="csrf" value="%s">'
        .. '<input type="hidden" name="action" value="%s">', con:escape(token), action)
end

local function header_html(con, user, token)
    local out = {'<header class="top"><div><h1>Notes</h1><p class="sub">',
        con:escape(SITE_NAME), "</p></div>"}
    if user then
        out[#out + 1] = '<form method="post" class="who"><span>Signed in as <strong>'
            .. con:escape(user) .. "</strong></span>" .. hidden(con, token, "signout")
            .. '<button class="quiet">Sign out</button></form>'
    end
    out[#out + 1] = "</header>"
    return concat(out)
end

local function flash_html(con, message)
    if type(message) ~= "table" then
        return ""
    end
    local kind = message.kind == "ok" and "ok" or "error"
    return format('<p class="flash %s" role="status">%s</p>', kind,
        con:escape(message.text or ""))
end

local function form_html(con, user, token, draft)
    if user then
        return '<form method="post" class="card">' .. hidden(con, token, "post")
            .. '<label for="body">New note</label>'
            .. format('<textarea id="body" name="body" rows="4" maxlength="%d" required '
                .. 'placeholder="Write something…">%s</textarea>', MAX_NOTE,
                con:escape(draft or ""))
            .. format('<div class="row"><p class="hint">Up to %d characters of plain text.</p>'
                .. "<button>Post</button></div></form>", MAX_NOTE)
    end
    return '<form method="post" class="card">' .. hidden(con, token, "signin")
        .. '<label for="name">Your name</label>'
        .. format('<div class="row"><input type="text" id="name" name="name" maxlength="%d" '
            .. 'required autocomplete="nickname"><button>Sign in</button></div>', MAX_NAME)
        .. '<p class="hint">Anyone can read the board; sign in with a name to post.</p></form>'
end

local function note_html(con, note)
    return format('<article class="card note" id="note-%d"><header><strong class="author">'
        .. '%s</strong><time datetime="%s">%s</time></header><p>%s</p></article>',
        note.id, con:escape(note.author), os_date("!%Y-%m-%dT%H:%M:%SZ", note.created),
        os_date("!%Y-%m-%d %H:%M UTC", note.created), con:escape(note.body))
end

local function footer_html(con, shown)
    local info = db.info()
    return format('<footer>%d note%s shown · <a href="?format=json">JSON</a> · %s · '
        .. "this Lua state's SQLite connection: opened %s UTC, %d quer%s</footer>",
        shown, shown == 1 and "" or "s", con:escape(RUNTIME),
        os_date("!%H:%M:%S", info.opened), info.queries, info.queries == 1 and "y" or "ies")
end

local function board(con)
    -- Session and database first: the page is written once everything is known.
    local user = Session.GetVar("auth", "user")
    local token = csrf_token()
    local message, draft = take_flash()
    local notes = db.recent(SHOWN)
    local out = {header_html(con, user, token), flash_html(con, message),
        form_html(con, user, token, draft), '<section class="notes" aria-label="Notes">'}
    for _, note in ipairs(notes) do
        out[#out + 1] = note_html(con, note)
    end
    if #notes == 0 then
        out[#out + 1] = '<p class="empty">No notes yet. Be the first.</p>'
    end
    out[#out + 1] = "</section>" .. footer_html(con, #notes)
    page(con, "Notes · " .. SITE_NAME, concat(out))
end

local function notes_json(con)
    local list = {}
    for i, note in ipairs(db.recent(SHOWN)) do
        list[i] = {id = note.id, author = note.author, text = note.body,
            created = os_date("!%Y-%m-%dT%H:%M:%SZ", note.created)}
    end
    con:header("Cache-Control", "no-store")
    if #list == 0 then
        -- con:json writes an empty table as {}; the list is an array.
        con:header("Content-Type", "application/json")
        return con:puts('{"notes":[]}')
    end
    con:json({notes = list})
end

local function handle_post(env, con)
    local form = con:form()
    local expected = Session.GetVar("csrf", "token")
    if not expected or field(form, "csrf") ~= expected then
        return refuse(con, env, 403, "This form has expired",
            "It came from an old page or from another site, so nothing was changed. "
            .. "Go back to the notes and try again.")
    end
    local action = ACTIONS[field(form, "action") or ""]
    if not action then
        return refuse(con, env, 400, "Unknown action", "The form asked for something this "
            .. "board does not do.")
    end
    action(form, Session.GetVar("auth", "user"))
    con:redirect(env.SCRIPT_NAME or "notes.lua", 303)
end

function main(env, con)
    local method = env.REQUEST_METHOD
    if method == "POST" then
        return handle_post(env, con)
    elseif method ~= "GET" and method ~= "HEAD" then
        con:header("Allow", "GET, HEAD, POST")
        return refuse(con, env, 405, "Method not allowed", "Use GET to read and POST to write.")
    end
    if con:query().format == "json" then
        return notes_json(con)
    end
    board(con)
end
