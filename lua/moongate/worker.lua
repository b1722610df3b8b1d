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

local function policy_failed(ctx, r, v, route, p, err)
  log_failure(route, p, nil, err, v)
  answer(ctx, r, v, 500, { error = "internal error", request_id = ffi_string(v.request_id,
                                                                              v.request_id_len) })
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

local function run_phase(list, ctx, r, v, route)
  for i = 1, #list do
    local p = list[i]
    local fn = p.mod[ctx.phase]
    local ok, status, body = pcall(fn, p.conf, ctx)
    if not ok then
      policy_failed(ctx, r, v, route, p, status)
      return true
    end
    if status then
      answer(ctx, r, v, status, body)
      return true
    end
  end
  return false
end

function _M.access(rp)
  local r = ffi_cast(req_ptr, rp)
  local v = ffi_cast(view_ptr, rp)
  local cfg = current
  local route, entry, params = router.match(cfg.router, v, request_host, r)
  if not route then
    respond(r, 404, { error = "no route matched", request_id = ffi_string(v.request_id,
                                                                           v.request_id_len) })
    return
  end
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
    context.set(r)
    local ctx = {
      req = request.new_req(r, v),
      resp = request.new_resp(r, v),
      route = route,
      params = params or {},
      vars = {},
      request_id = ffi_string(v.request_id, v.request_id_len),
      consumers = cfg.consumers,
    }
    -- before rewrite/access run: a request they end still gets its log
    -- phase (a logging policy sees the 401s and 500s too)
    if route.phase_flags ~= 0 then
      ctxs[rp] = ctx
      C.mg_req_set_phases(r, route.phase_flags)
    end
    local phases = route.phases
    if phases.rewrite then
      ctx.phase = "rewrite"
      if run_phase(phases.rewrite, ctx, r, v, route) then
        return
      end
    end
    if phases.access then
      ctx.phase = "access"
      if run_phase(phases.access, ctx, r, v, route) then
        return
      end
    end
    if ctx.upstream then -- a policy chose another upstream
      local h = cfg.upstreams[ctx.upstream]
      if not h then
        answer(ctx, r, v, 502, { error = "unknown upstream " .. tostring(ctx.upstream) })
        return
      end
      C.mg_req_set_upstream(r, h)
      return
    end
  end
  local u = route.upstream_handle
  if u then
    C.mg_req_set_upstream(r, u)
  end
end

function _M.header_filter(rp)
  local ctx = ctxs[rp]
  if not ctx then
    return
  end
  context.set(ffi_cast(req_ptr, rp))
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

function _M.log(rp)
  local ctx = ctxs[rp]
  ctxs[rp] = nil
  if not ctx then
    return
  end
  local list = ctx.route.phases.log
  if not list then
    return
  end
  context.set(ffi_cast(req_ptr, rp))
  ctx.phase = "log"
  for i = 1, #list do
    local p = list[i]
    local ok, err = pcall(p.mod.log, p.conf, ctx)
    if not ok then
      mg.log.err("route ", ctx.route.id, " policy ", p.name, " log failed: ", err)
    end
  end
end

function _M.worker_id()
  return worker_id
end

return _M
