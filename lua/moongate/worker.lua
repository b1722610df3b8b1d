-- The gateway's entry points, called by the C runtime (lua.c) in a pooled
-- coroutine per request phase: init, access, header_filter, log, reload.
--
-- A worker's config comes from the control process (control.lua): numbered
-- versions, as frames on the channel (runtime/src/channel.c, frames in
-- config_doc.lua). reload("frame") pulls the frames queued, applies them
-- to the document it keeps (the control's latest), builds that version
-- and answers {applied = N} or {refused = N, error = ...}.
--
-- A config version is compiled once into: the router, one C upstream
-- handle per upstream, and per route the flat lists of policies for each
-- phase, so a phase no policy of the route uses costs nothing
-- (config_version.lua, which reuses the parts of the previous version that
-- did not change).

local ffi = require("ffi")
local binding = require("moongate.ffi")
local config = require("moongate.config")
local config_doc = require("moongate.config_doc")
local config_version = require("moongate.config_version")
local json_split = require("moongate.json_split")
local router = require("moongate.router")
local request = require("moongate.request")
local context = require("moongate.context")
local slice = require("moongate.slice")
local slice_check = slice.check
local gc_hold = require("moongate.gc_hold")
local mg = require("moongate")

local C = binding.C
local ffi_cast = ffi.cast
local ffi_gc = ffi.gc
local ffi_string = ffi.string
local type = type
local pcall = pcall
local rawset = rawset
local clear = require("table.clear")
local new_tab = require("table.new")
local setmetatable = setmetatable
local ipairs = ipairs
local tostring = tostring
local lower = string.lower
local match = string.match
local sub = string.sub
local json_encode = mg.json.encode

local view_ptr = ffi.typeof("mg_req_view_t *")
local req_ptr = ffi.typeof("mg_req_t *")
local frame_data = ffi.new("const char *[1]")
local frame_len = ffi.new("size_t[1]")

local SET = C.MG_HDR_SET
local char_ptr = ffi.typeof("const char *")

local _M = {}

-- what a worker's first build may allocate before the collector runs
-- (10,000 routes: ~60 MB)
local FIRST_BUILD_GC_MB = 128

local conf_path, worker_id
local current -- the config version in force: {router, upstreams, version}
local received -- the control's document as of its last frame (config_doc.lua)
local ctxs = {} -- request handle -> ctx, for requests with later phases

-- ---- answering at the gateway ------------------------------------------

-- A table body is JSON; a string body is text/plain unless a policy set
-- the Content-Type (static-response); no body, no Content-Type. Returns
-- the body as a string.
local function body_of(r, body)
  local ct
  if type(body) == "table" then
    body = json_encode(body)
    ct = "application/json"
  elseif body == nil or body == "" then
    body = ""
  else
    body = tostring(body)
    if not request.header_of(C.mg_resp_header, r, "Content-Type") then
      ct = "text/plain; charset=utf-8"
    end
  end
  if ct then
    C.mg_resp_set_header(r, "Content-Type", 12, ct, #ct, SET)
  end
  return body
end

local function respond(r, status, body)
  body = body_of(r, body)
  C.mg_resp_send(r, status, body, #body)
end

local function internal_error(r, v)
  respond(r, 500, { error = "internal error", request_id = ffi_string(v.request_id,
                                                                      v.request_id_len) })
end

local function log_failure(route, p, phase, err, v)
  mg.log.err("route ", route.id, " policy ", p.name, phase and (" " .. phase) or "", " failed: ",
             err, " (request ", ffi_string(v.request_id, v.request_id_len), ")")
end

-- one piece of a body through the route's body_filter policies; nil and
-- the error when one raises (it is logged)
local function filter_piece(list, ctx, chunk, eof, v)
  for i = 1, #list do
    local p = list[i]
    local ok, res = pcall(p.mod.body_filter, p.conf, ctx, chunk, eof)
    if not ok then
      log_failure(ctx.route, p, "body_filter", res, v)
      return nil
    end
    if res ~= nil then
      chunk = tostring(res)
    end
  end
  return chunk
end

-- An answer made at the gateway for a routed request: a policy's `return
-- status, body`, the 500 of a policy that raised, the 502 of an unknown
-- ctx.upstream. The route's header_filter policies run on it, then its
-- body_filter ones over the whole body (one piece, then the end), as on a
-- proxied response (README "Phases"); they may change the status, the
-- headers and the body (sent with its length). A filter that raises turns
-- it into a 500, which no filter sees (nothing loops).
local function answer(ctx, r, v, status, body)
  local phases = ctx.route.phases
  local hf, bf = phases.header_filter, phases.body_filter
  if not (hf or bf) or ctx.answered then
    respond(r, status, body)
    return
  end
  ctx.answered = true
  body = body_of(r, body)
  v.status = status -- ctx.resp.status
  if hf then
    ctx.phase = "header_filter"
    for i = 1, #hf do
      local p = hf[i]
      local ok, err = pcall(p.mod.header_filter, p.conf, ctx)
      if not ok then
        log_failure(ctx.route, p, "header_filter", err, v)
        internal_error(r, v)
        return
      end
    end
  end
  if bf then
    ctx.phase = "body_filter"
    local head = filter_piece(bf, ctx, body, false, v)
    local tail = head and filter_piece(bf, ctx, "", true, v)
    if not tail then
      internal_error(r, v)
      return
    end
    body = head .. tail
  end
  C.mg_resp_send(r, status, body, #body) -- a status set by a filter wins (C)
end

-- ---- building config versions -----------------------------------------------

-- A C upstream handle for the validated upstream u (config_version.lua
-- keeps it while u's text is unchanged: its balancer state with it; the
-- keep-alive pools are per target, so they outlive handles anyway).
local function new_upstream(u)
  local t = u.timeouts or {}
  local ka = u.keepalive or {}
  local h = C.mg_upstream_new(u.id, #u.id, t.connect_ms or 5000, t.send_ms or 60000,
                              t.read_ms or 60000, ka.size or 64, ka.idle_timeout_ms or 60000,
                              ka.requests or 1000)
  if h == nil then
    return nil, "out of memory creating upstream " .. u.id
  end
  h = ffi_gc(h, C.mg_upstream_release)
  for i, tg in ipairs(u.targets or {}) do
    local rc = C.mg_upstream_add_target(h, tg.host, #tg.host, tg.port, tg.weight or 1)
    if rc ~= 0 then
      return nil, ("upstreams.%s.targets[%d]: cannot use %s:%d"):format(u.id, i - 1,
                                                                      tg.host, tg.port)
    end
  end
  return h
end

local builder = config_version.new({ upstream = new_upstream })

-- MOONGATE_RELOAD_TIMING=1: each reload logs what it took (bench/reload.lua)
local timing = os.getenv("MOONGATE_RELOAD_TIMING")
timing = timing ~= nil and timing ~= "" and timing ~= "0"

-- Builds and swaps in the version doc (config_doc.lua) holds. The version
-- in force changes only when the new one is complete.
local function load(doc)
  local t0, cpu0 = mg.now(), os.clock()
  -- etcd's sandboxed policies (<prefix>/policies/<name>), by name; a route
  -- naming one whose source changed is compiled again
  builder:set_policy_sources(doc.policies)
  local ok, v, err = pcall(builder.build, builder, conf_path, doc.node, nil, doc)
  if not ok then
    return nil, tostring(v)
  end
  if not v then
    return nil, err
  end
  slice_check() -- the swap in a slice of its own (router.apply, the indexes' marks)
  builder:commit(v)
  v.version = doc.version
  current = v
  if timing then
    local s = v.stats
    mg.log.info(("reloaded configuration version %d in %.2f ms (changed routes: %d, "
                 .. "reused: %d, validated: %d, policy modules loaded: %d, router: %.2f ms %s%s; "
                 .. "CPU %.2f ms)")
                :format(v.version, (mg.now() - t0) * 1000, s.compiled, s.reused, s.validated,
                        s.modules_loaded, s.router_ms, s.router, s.whole and ", whole file" or "",
                        (os.clock() - cpu0) * 1000))
  end
  return v
end

-- ---- entry points ----------------------------------------------------------

-- The files' contents as a document, for a worker without a control
-- process (from_files: the fuzzer). nil and why when unreadable.
local function doc_from_files()
  local f = io.open(conf_path, "rb")
  local node_text = f and f:read("*a")
  if f then
    f:close()
  end
  local node, errs = config.load_node(conf_path, node_text)
  if not node then
    return nil, table.concat(errs, "; ")
  end
  f = io.open(node.config_source.path, "rb")
  local routes_text = f and f:read("*a")
  if f then
    f:close()
  end
  local split, err = json_split.split(routes_text or "", config_doc.SPLIT)
  if not split then
    return nil, node.config_source.path .. ": " .. tostring(err)
  end
  local doc = config_doc.from_split(node_text, split)
  doc.version = 1
  return doc
end

-- nworkers: unused here. from_files: no control process (the fuzzer):
-- the config is read from the files now; else it comes as frames, and
-- the worker accepts connections once the first is in force (lua.c).
function _M.init(path, wid, _, from_files)
  conf_path, worker_id = path, wid
  -- MOONGATE_JITV=<file>: LuaJIT's trace log (what compiles, what aborts),
  -- to check the request path stays compiled (bench/, STYLE.md)
  local jitv = os.getenv("MOONGATE_JITV")
  if jitv and jitv ~= "" then
    require("jit.v").start(jitv .. "." .. tostring(wid))
  end
  -- MOONGATE_JITP=<file>: LuaJIT's sampling profiler (jit.p) over the
  -- worker's life, written when it stops gracefully; MOONGATE_JITP_MODE
  -- its options (default "vl": VM state, then line: how much of the Lua
  -- time runs interpreted, compiled, in the GC)
  local jitp = os.getenv("MOONGATE_JITP")
  if jitp and jitp ~= "" then
    require("jit.p").start(os.getenv("MOONGATE_JITP_MODE") or "vl", jitp .. "." .. tostring(wid))
  end
  local jitdump = os.getenv("MOONGATE_JITDUMP")
  if jitdump and jitdump ~= "" then
    require("jit.dump").start("tbim", jitdump .. "." .. tostring(wid))
  end
  -- A request's trace (router, pipeline, policies) is long, and a worker
  -- serves many routes and policies: LuaJIT's defaults (1000 traces,
  -- 4000 IR instructions recorded, 512 KiB of machine code) would abort
  -- the longest and flush everything when full. OpenResty raises the same.
  jit.opt.start("maxtrace=8000", "maxrecord=16000", "maxmcode=40960")
  if from_files then
    local doc, err = doc_from_files()
    local v
    if doc then
      v, err = load(doc)
    end
    if not v then
      return nil, err
    end
  end
  return true
end

-- an answer to the control process (channel.c keeps the last one, and
-- sends it again after a reconnect). A refusal's error text is cut to
-- MAX_ERROR bytes: channel.c refuses an answer over 64 KiB, and even
-- escaped six times over the cut text stays below it.
local MAX_ERROR = 8192
local function tell_control(msg)
  local err = msg.error
  if type(err) == "string" and #err > MAX_ERROR then
    msg.error = sub(err, 1, MAX_ERROR) .. " ... (cut at " .. MAX_ERROR .. " bytes)"
  end
  local text = json_encode(msg)
  C.mg_cfg_send(text, #text)
end

-- The frames queued by the channel, applied in order to the document
-- received so far; nil when one cannot be applied (the control is then
-- asked for a snapshot, which follows the frames already queued).
local function take_frames()
  local doc = received
  local n = 0
  while C.mg_cfg_next(frame_data, frame_len) == 0 do
    n = n + 1
    local frame, err = config_doc.decode(ffi_string(frame_data[0], frame_len[0]))
    local next_doc
    if frame then
      slice_check() -- a delta is ~300 bytes (decoded in ~0.03 ms); a snapshot is the whole config
      next_doc, err = config_doc.apply(doc, frame)
      slice_check()
    end
    if not next_doc then
      mg.log.warn("config frame not applied (", err, "); asking the control process for a "
                  .. "snapshot")
      tell_control({ resync = true })
      while C.mg_cfg_next(frame_data, frame_len) == 0 do -- stale: a snapshot follows them
      end
      return nil
    end
    doc = next_doc
  end
  if n == 0 then
    return nil
  end
  received = doc
  return doc
end

-- Between requests (lua.c), when frames came: builds the latest version
-- they make, reusing what did not change; the old one stays when it
-- fails. Several frames queued meanwhile make one build (the latest wins).
-- Runs in a coroutine that C resumes once per loop turn (lua.c): the
-- rebuild yields every millisecond or so (moongate.slice), requests are
-- served in between on the version in force, and the new version replaces
-- it only when complete.
function _M.reload()
  -- the frames' decode and apply are sliced too (a check after each).
  -- 0.5 ms a slice: the requests served in the same loop turn add their
  -- own time (~0.1 ms each under wrk), and a slice ends at the first check
  -- past the budget (the steps between checks are ~0.02-0.2 ms), so a
  -- turn stays near 1 ms of CPU; a one-route change is one slice anyway
  slice.begin(0.5)
  local doc = take_frames()
  if not doc then
    slice.finish()
    return true, "nothing to apply"
  end
  -- the control process validated what it sends, but for a last-known-good
  -- copy (config_doc.lua): the build fills defaults, checks nothing twice
  doc.checked = not doc.unchecked
  if current and current.version == doc.version then
    -- a snapshot of the version in force (a new connection to the control)
    slice.finish()
    tell_control({ applied = doc.version })
    return true, "unchanged"
  end
  -- the first version: nothing is served yet, and the collector walking
  -- the growing heap was a third of the build (gc_hold.lua)
  local gc = current == nil and gc_hold.hold(FIRST_BUILD_GC_MB)
  local v, err = load(doc)
  slice.finish()
  if gc then
    gc_hold.release(gc)
  end
  if not v then
    tell_control({ refused = doc.version, error = err })
    return nil, err
  end
  tell_control({ applied = doc.version })
  return true
end

local function request_host(r)
  local h = request.header_of(C.mg_req_header, r, "host")
  if not h then
    return nil
  end
  h = lower(h)
  return match(h, "^%[[^%]]*%]") or match(h, "^[^:]+") or h
end

-- The policy each access coroutine is running and its ctx (weak keys:
-- C drops a coroutine that raised or was left waiting): access_error
-- (below) names the policy when one raised. By coroutine, not request
-- handle: C reuses a handle whose coroutine was left waiting.
local running = setmetatable({}, { __mode = "k" })
local running_ctx = setmetatable({}, { __mode = "k" })

-- One policy's phase function. No pcall per policy: LuaJIT cannot compile
-- a trace that starts in a policy (a side exit) and returns through a
-- pcall frame ("NYI: return to lower frame"), so an error ends the
-- coroutine instead and C hands it to access_error.
local function call(p, phase, ctx, co)
  running[co] = p
  return p.mod[phase](p.conf, ctx)
end

-- The phase functions of list in order until one answers (returns a
-- status): that status and body. Unrolled for the first four: a `for`
-- over a route's one to three policies is an inner loop entered per
-- request and left after a turn or two, which LuaJIT gives up on (and
-- with it the trace of the whole request).
local function pipeline(list, phase, ctx, co)
  local n = #list
  local status, body = call(list[1], phase, ctx, co)
  if status or n == 1 then
    return status, body
  end
  status, body = call(list[2], phase, ctx, co)
  if status or n == 2 then
    return status, body
  end
  status, body = call(list[3], phase, ctx, co)
  if status or n == 3 then
    return status, body
  end
  status, body = call(list[4], phase, ctx, co)
  if status or n == 4 then
    return status, body
  end
  for i = 5, n do
    status, body = call(list[i], phase, ctx, co)
    if status then
      return status, body
    end
  end
  return nil
end

-- ctx fields made on their first read: most requests never read them
local ctx_lazy = {
  -- the route's parameters (routed), made from the path on the first read
  params = function(ctx)
    local req = ctx.req
    local entry = req._pentry
    return entry and router.params(entry, req._v, req._pcaps) or {}
  end,
  vars = function() return {} end,
  request_id = function(ctx)
    local v = ctx.req._v
    return ffi_string(v.request_id, v.request_id_len)
  end,
}

local ctx_mt = {
  __index = function(ctx, k)
    local make = ctx_lazy[k]
    if make then
      local val = make(ctx)
      rawset(ctx, k, val)
      return val
    end
  end,
}

-- Per request handle: its two cdata views, and the ctx, ctx.req and
-- ctx.resp tables, emptied and reused by the next request on that handle
-- (C pools its requests, so handles repeat). C reuses a handle only once
-- its request is over (its log phase run, a coroutine still waiting
-- dropped), so nothing of that request runs any more; what it left in
-- them goes with the emptying (a policy must not keep ctx past its
-- request). A request that makes no table leaves the GC nothing to
-- collect, and collecting was the largest part of its Lua cost. A ctx
-- has eight hash slots: what the gateway sets and an auth policy's
-- consumer and tenant; params, vars and request_id are made on their
-- first read (ctx_mt).
local slots, nslots = {}, 0
-- a handle C freed may come back at a new address (req.c keeps 4096
-- free ones): past this many, the map starts again
local MAX_SLOTS = 8192

-- The request's Lua work is over: what it left in the tables goes now
-- (a body read, a policy's vars), not when the handle serves again.
local function release(slot)
  clear(slot.ctx)
  clear(slot.req)
  clear(slot.resp)
end

local function new_slot(rp)
  if nslots >= MAX_SLOTS then
    slots, nslots = {}, 0
  end
  local r, v = ffi_cast(req_ptr, rp), ffi_cast(view_ptr, rp)
  local slot = { r = r, v = v, req = request.new_req(r, v), resp = request.new_resp(r, v),
                 ctx = setmetatable(new_tab(0, 8), ctx_mt), caps = {} }
  slots[rp] = slot
  nslots = nslots + 1
  return slot
end

-- A request of route (router.match's route and entry), from the
-- route's path rewriting to the upstream chosen. Its own function: when
-- the router's walk was a Lua loop, a trace starting before it aborted
-- ("inner loop in root trace"), and this one started after it.
local function routed(rp, co, slot, cfg, route, entry)
  local r, v = slot.r, slot.v
  local id = route.id
  C.mg_req_set_route(r, id, #id)
  -- strip_prefix drops the route's prefix; rewrite replaces the path (and
  -- with strip_prefix on a prefix route, the rest is appended to it)
  local rewrite = route.rewrite
  if (route.strip and entry.kind == "prefix") or rewrite then
    local up_path
    if route.strip and entry.kind == "prefix" then
      local rest = sub(ffi_string(v.path, v.path_len), entry.len + 1)
      if rewrite then
        up_path = (sub(rewrite, -1) == "/" and sub(rest, 1, 1) == "/") and rewrite .. sub(rest, 2)
                  or rewrite .. rest
      else
        up_path = rest == "" and "/" or rest
      end
    else
      up_path = rewrite
    end
    C.mg_req_set_uri(r, up_path, #up_path, nil, 0)
  end
  if route.has_access or route.phase_flags ~= 0 then
    context.set(r, co)
    -- the handle's tables, emptied of the last request's fields (slots)
    local req, resp, ctx = slot.req, slot.resp, slot.ctx
    clear(req)
    req._r, req._v = r, v
    clear(resp)
    resp._r, resp._v = r, v
    clear(ctx)
    ctx.req, ctx.resp, ctx.route = req, resp, route
    if entry.names then
      -- where the route's parameters are in the path, for ctx.params
      req._pentry, req._pcaps = entry, router.capture(entry, slot.caps)
    end
    ctx.consumers, ctx.phase = cfg.consumers, "access"
    -- for access_error while the access policies run; and until the log
    -- phase when a later phase needs it, from before they run: a request
    -- they end still gets its log phase (a logging policy sees the 401s
    -- and 500s too)
    running_ctx[co] = ctx
    if route.phase_flags ~= 0 then
      ctxs[rp] = ctx
      C.mg_req_set_phases(r, route.phase_flags)
    end
    local phases = route.phases
    local status, body
    if phases.rewrite then
      ctx.phase = "rewrite"
      status, body = pipeline(phases.rewrite, "rewrite", ctx, co)
    end
    if not status and phases.access then
      ctx.phase = "access"
      status, body = pipeline(phases.access, "access", ctx, co)
    end
    running[co], running_ctx[co] = nil, nil
    local up = ctx.upstream -- a policy chose another upstream
    if status then
      answer(ctx, r, v, status, body)
    elseif up then
      local h = cfg.upstreams[up]
      if h then
        C.mg_req_set_upstream(r, h)
      else
        answer(ctx, r, v, 502, { error = "unknown upstream " .. tostring(up) })
      end
    else
      local u = route.upstream_handle
      if u then
        C.mg_req_set_upstream(r, u)
      end
    end
    if route.phase_flags == 0 then
      release(slot)
    end
    return
  end
  local u = route.upstream_handle
  if u then
    C.mg_req_set_upstream(r, u)
  end
end

-- co: the coroutine C resumes (lua.c), for moongate.context. The router's
-- lookup is one FFI call (route.c): nothing here stops LuaJIT compiling
-- from the request's start to the upstream. (A match cache by path was
-- here while the walk was a Lua loop; with the walk in C it saved 193
-- instructions a request when every request had the same path and cost
-- 1,082 when none did: bench/ir-per-request, 2026-11-29.)
function _M.access(rp, co)
  co = co or coroutine.running() -- C passes it (lua.c)
  local slot = slots[rp] or new_slot(rp)
  local r, v = slot.r, slot.v
  local cfg = current
  local route, entry = router.match(cfg.router, v, request_host, r)
  if not route then
    respond(r, 404, { error = "no route matched", request_id = ffi_string(v.request_id,
                                                                           v.request_id_len) })
    return
  end
  return routed(rp, co, slot, cfg, route, entry)
end

-- C calls this in a fresh coroutine when the access coroutine raised
-- (lua.c): a policy's error is logged with the route, the policy and the
-- request id, and answered with a 500 carrying the id (through the
-- route's header_filter and body_filter policies). An error outside the
-- policies is raised again: C logs it and answers its own 500.
function _M.access_error(rp, err, failed, co)
  local ctx, p = running_ctx[failed], running[failed]
  if not p then
    error(err, 0)
  end
  running[failed], running_ctx[failed] = nil, nil
  local r = ffi_cast(req_ptr, rp)
  local v = ffi_cast(view_ptr, rp)
  context.set(r, co)
  log_failure(ctx.route, p, nil, err, v)
  answer(ctx, r, v, 500, { error = "internal error", request_id = ctx.request_id })
  local slot = slots[rp]
  if ctx.route.phase_flags == 0 and slot and slot.ctx == ctx then
    release(slot)
  end
end

function _M.header_filter(rp, co)
  local ctx = ctxs[rp]
  if not ctx then
    return
  end
  context.set(ffi_cast(req_ptr, rp), co)
  local list = ctx.route.phases.header_filter
  if not list then
    return
  end
  ctx.phase = "header_filter"
  for i = 1, #list do
    local p = list[i]
    local ok, err = pcall(p.mod.header_filter, p.conf, ctx)
    if not ok then
      -- Nothing is sent yet: raising makes C answer the 500 of a failed
      -- policy with the request id (and log this with it).
      error("route " .. ctx.route.id .. " policy " .. p.name .. " header_filter failed: "
            .. tostring(err), 0)
    end
  end
end

-- Each piece of a proxied response body, in order, then the end (eof, an
-- empty piece). A filter returns the new piece (nil keeps it; "" drops it).
-- It cannot yield; an error cuts the response (the head is already out).
function _M.body_filter(rp, ptr, len, eof)
  local ctx = ctxs[rp]
  local list = ctx and ctx.route.phases.body_filter
  if not list then
    return nil
  end
  local chunk = len > 0 and ffi_string(ffi_cast(char_ptr, ptr), len) or ""
  ctx.phase = "body_filter"
  for i = 1, #list do
    local p = list[i]
    local ok, res = pcall(p.mod.body_filter, p.conf, ctx, chunk, eof)
    if not ok then
      mg.log.err("route ", ctx.route.id, " policy ", p.name, " body_filter failed: ", res)
      error(res, 0)
    end
    if res ~= nil then
      chunk = tostring(res)
    end
  end
  return chunk
end

function _M.log(rp, co)
  local ctx = ctxs[rp]
  ctxs[rp] = nil
  if not ctx then
    return
  end
  local list = ctx.route.phases.log
  if list then
    context.set(ffi_cast(req_ptr, rp), co)
    ctx.phase = "log"
    for i = 1, #list do
      local p = list[i]
      local ok, err = pcall(p.mod.log, p.conf, ctx)
      if not ok then
        mg.log.err("route ", ctx.route.id, " policy ", p.name, " log failed: ", err)
      end
    end
  end
  local slot = slots[rp]
  if slot and slot.ctx == ctx then
    release(slot)
  end
end

function _M.worker_id()
  return worker_id
end

return _M
