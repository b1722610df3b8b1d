-- The control process (one per node, issue 5), called by the C runtime
-- (lua.c, control.c): it owns the config source, checks each change,
-- numbers the versions and hands them to the workers over the channel
-- (runtime/src/channel.c; frames: config_doc.lua); it keeps the version
-- each worker applied, writes the last-known-good copy, and answers the
-- status listener. Entry points:
--
--   init(conf_path, id, nworkers)  at start: the first version, from the
--       source, else from the last-known-good copy; nil, why when there is
--       neither (the process then exits 78 and the master stops the node).
--       etcd mode: starts the etcd driver and returns with no version yet
--       (the first comes with the first read: source_event)
--   reload(reason)  "signal" (SIGHUP, `moongate reload`) or "watch" (a
--       watched file changed): re-read, check, hand out. A signal always
--       makes a new version (the workers then re-read changed policy
--       modules too); a file change only when a text changed. etcd mode:
--       re-reads the node config and the whole prefix
--   source_event(ev, data)  etcd mode: what the driver (runtime/src/etcd.c,
--       through control_etcd.c) saw; answers as etcd.h's sink
--   peer(id, message)  a worker's frame (nil: its connection closed)
--   access(rp)  a request on the status listener (GET /status/live,
--       /status/ready, /metrics) or the admin listener (moongate.admin,
--       over the version in force)
--
-- File mode: the node config and the routes file are read whole and split
-- into entity texts (json_split, through the checker's builder); the diff
-- against the version in force is a few hunks per kind, so a one-route
-- change is one small frame.
--
-- etcd mode: one driver (one TCP connection) per node reads the prefix at
-- one revision, then watches from the next; etcd_source.lua checks each
-- key's value (a refused one is logged with its key, the previous value
-- stays). A version is made only when an accepted entity (or the node
-- config) changed, and is numbered by the etcd revision of that change
-- (DESIGN: the revision a worker applied is its config version): a watch
-- event's mod_revision, a read's header revision.

local ffi = require("ffi")
local binding = require("moongate.ffi")
local config = require("moongate.config")
local config_check = require("moongate.config_check")
local config_doc = require("moongate.config_doc")
local admin = require("moongate.admin")
local etcd_source = require("moongate.etcd_source")
local slice = require("moongate.slice")
local gc_hold = require("moongate.gc_hold")
local mg = require("moongate")

local C = binding.C
local ffi_cast = ffi.cast
local ffi_string = ffi.string
local type = type
local pcall = pcall
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local concat = table.concat
local format = string.format
local math_max = math.max
local next = next
local json_encode = mg.json.encode
local json_decode = mg.json.decode

local SET = C.MG_HDR_SET
local LISTENER_ADMIN = 1 -- the master hands over status (0), then admin (1)

local view_ptr = ffi.typeof("mg_req_view_t *")
local req_ptr = ffi.typeof("mg_req_t *")

local _M = {}

local conf_path, nworkers
local started_at    -- mg.now() when init ran (the start's stages are logged from it)
local lkg_path
local current       -- the doc in force (config_doc.lua), with .node_conf
local snapshot_text -- its snapshot frame, encoded once per version
local admin_api     -- the Admin API over `current` (made again when the node config changes)
local peers = {}    -- channel peer id -> worker id
local workers = {}  -- worker id -> {peer =, applied =, refused =, error =}

-- etcd mode (nil in file mode)
local etcd        -- {src = etcd_source, node_text =, node =, lkg = the copy read at
                  --  start (until the first read), from_lkg = current came from it,
                  --  resync = a signal asked for a re-read}

local read_file = config.read_text

-- ---- the source ------------------------------------------------------------------

-- Reads and checks the node config and its routes file. Returns the doc
-- (version not set) and the normalized node, or nil and a list of errors.
local node_cache = {} -- {text =, node =}: the node config parsed once per text
local function load_source()
  local node_text = read_file(conf_path)
  local node, errs = node_cache.node, nil
  if not (node and node_cache.text == node_text) then
    node, errs = config.load_node(conf_path, node_text)
    node_cache.text, node_cache.node = node_text, node
  end
  if not node then
    for i, e in ipairs(errs) do
      errs[i] = conf_path .. ": " .. e
    end
    return nil, errs
  end
  if node.config_source.type ~= "file" then
    return nil, { conf_path .. ": config_source.type: the node was started with a file source; "
                  .. "changing it to " .. tostring(node.config_source.type) .. " needs a restart" }
  end
  local routes_path = node.config_source.path
  local routes_text = read_file(routes_path)
  local parts
  errs, parts = config_check.check(conf_path, node_text, routes_text)
  if #errs > 0 then
    return nil, errs
  end
  if not (parts and parts.doc) then
    -- valid, yet json_split did not take it (a member name written with
    -- an escape, a list given twice): the workers need entity texts
    return nil, { routes_path .. ": cannot be split into entities (write each of upstreams, "
                  .. "routes, consumers once, without escapes in member names)" }
  end
  local doc = config_doc.from_split(node_text, parts.doc)
  return doc, node
end

-- The settings a running node keeps until restarted (they belong to the
-- master and to the workers' C side): the names of those that differ.
local function same(x, y)
  if type(x) ~= "table" or type(y) ~= "table" then
    return x == y
  end
  for k, v in pairs(x) do
    if not same(v, y[k]) then
      return false
    end
  end
  for k in pairs(y) do
    if x[k] == nil then
      return false
    end
  end
  return true
end

local function restart_needed(a, b)
  local out = {}
  local function check(name, x, y)
    if not same(x, y) then
      out[#out + 1] = name
    end
  end
  local function listeners(n)
    local l = {}
    for i, x in ipairs(n.listen) do
      l[i] = x.address .. (x.tls and "+tls" or "")
    end
    return l
  end
  check("listen", listeners(a), listeners(b))
  check("workers", a.workers, b.workers)
  check("status.listen", a.status.listen, b.status.listen)
  check("admin.listen", a.admin.listen, b.admin.listen)
  check("limits", a.limits, b.limits)
  check("log", a.log, b.log)
  check("pid_file", a.pid_file, b.pid_file)
  check("shutdown_timeout_ms", a.shutdown_timeout_ms, b.shutdown_timeout_ms)
  -- zones are mapped once, before the workers fork
  check("shm", a.shm, b.shm)
  check("redis", a.redis, b.redis)
  check("config_source", { a.config_source.type, a.config_source.path, a.config_source.watch },
        { b.config_source.type, b.config_source.path, b.config_source.watch })
  return out
end

-- ---- handing versions out ------------------------------------------------------

local function send(peer, text)
  C.mg_ctl_send(peer, text, #text)
end

local function snapshot()
  if not snapshot_text then
    snapshot_text = config_doc.encode(config_doc.snapshot(current))
  end
  return snapshot_text
end

local function save(doc)
  if not lkg_path then
    return
  end
  local ok, err = config_doc.lkg_write(lkg_path, doc)
  if not ok then
    mg.log.warn("cannot write the last-known-good copy ", lkg_path, ": ", tostring(err))
  end
end

-- Makes doc (numbered) the version in force and sends frame (its delta
-- from the previous one) to every worker connected. Nothing here yields:
-- a worker that says hello afterwards gets this version's snapshot.
local function publish(doc, node, frame)
  if node and not (current and current.node == doc.node and admin_api) then
    admin_api = admin.from_node(node, function() return current end)
  end
  current = doc
  current.node_conf = node
  snapshot_text = nil
  C.mg_ctl_version_set(doc.version)
  if frame then
    local text = config_doc.encode(frame)
    for peer in pairs(peers) do
      send(peer, text)
    end
  end
  save(doc)
end

local init_etcd, reload_etcd -- etcd mode (below)

local function next_version()
  return math_max(C.mg_ctl_version_get(), current and current.version or 0) + 1
end

-- ---- the etcd source ---------------------------------------------------------------

-- what the first read's check may allocate before the collector runs
-- (10,000 routes: ~50 MB)
local FIRST_READ_GC_MB = 128

-- etcd.h's sink events and answers (mirrored: etcd.h is internal to C)
local EV_AUTH, EV_RANGE, EV_WATCH, EV_LOST, EV_BACK, EV_START_TIMEOUT = 1, 2, 3, 4, 5, 6
local ETCD_OK, ETCD_FAIL, ETCD_RERANGE = 0, -1, -2

-- The accepted entities as a doc (version not set). O(entities).
local function etcd_doc()
  local d = etcd.src:doc()
  return { node = etcd.node_text, skeleton = d.skeleton, elements = d.elements,
           policies = next(d.policies) and d.policies or nil, revision = d.revision }
end

-- The same config, whatever the skeleton's white space: for a doc from the
-- last-known-good copy (its skeleton went through a join and a split).
-- O(bytes): at start, and on the first read after starting from the copy.
local function same_config(a, b)
  return config_doc.same_text(a.node, b.node) and config_doc.same_policies(a.policies, b.policies)
         and config_doc.routes_text(a) == config_doc.routes_text(b)
end

-- The number of a version made at revision rev: rev, unless etcd's
-- history went back (a restored or new cluster): a worker must never see
-- one number for two configs.
local function etcd_version(rev)
  local v = current and current.version or 0
  if rev > v then
    return rev
  end
  mg.log.warn("etcd: revision ", rev, " is not above config version ", v, " (etcd's history went "
              .. "back: a restored or new cluster?); numbering the new version ", v + 1)
  return v + 1
end

local function etcd_publish(doc, why)
  local first = current == nil
  local frame = first and config_doc.snapshot(doc) or config_doc.diff(current, doc)
  publish(doc, etcd.node, frame)
  etcd.from_lkg = false
  mg.log.info("config version ", doc.version, " (etcd ", why, "): ",
              first and (#doc.elements.routes .. " routes") or config_doc.summary(frame))
end

-- A whole read of the prefix at revision rev: a body of `bytes` that came
-- at t0 and was checked in took_ms (cpu_ms of this process's CPU).
local function etcd_read(rev, t0, took_ms, cpu_ms, bytes)
  local doc = etcd_doc()
  local forced = etcd.resync
  etcd.resync = false
  if current == nil then
    -- the same config as the copy: its number (a respawned control process
    -- does not make the workers rebuild)
    local copy = etcd.lkg
    etcd.lkg = nil
    doc.version = (copy and same_config(copy, doc)) and copy.version or rev
    -- the start's stages (bench/etcd.lua prints this line): etcd's answer
    -- came that long after this process started, then the check
    etcd_publish(doc, format("read at revision %d: %d KB %.0f ms after the control process "
                                .. "started, checked in %.0f ms (CPU %.0f ms)", rev,
                             math.floor(bytes / 1024), (t0 - started_at) * 1000, took_ms, cpu_ms))
    return
  end
  if etcd.from_lkg and same_config(current, doc) then
    -- the copy served meanwhile is what etcd holds: the workers have it
    doc.version = current.version
    current = doc
    current.node_conf = etcd.node
    snapshot_text = nil
    etcd.from_lkg = false
    mg.log.info("etcd: read at revision ", rev, ": the last-known-good copy in force (version ",
                doc.version, ") is up to date")
    return
  end
  doc.version = rev > current.version and rev or current.version + 1
  local _, changed = config_doc.diff(current, doc)
  if changed or (forced and rev > current.version) then
    doc.version = etcd_version(rev)
    etcd_publish(doc, forced and "re-read on reload" or "read")
  else
    current.revision = rev
    if forced then
      mg.log.info("reload: etcd holds the config in force (version ", current.version,
                  ", revision ", rev, ")")
    end
  end
end

-- Events of the watch at revision rev (the highest in the piece).
local function etcd_change(rev, changed)
  if current == nil then
    return -- a watch follows a read: cannot happen
  end
  if not changed then
    current.revision = rev -- seen (refused, or no entity changed): the Admin API's view
    return
  end
  local doc = etcd_doc()
  doc.version = rev > current.version and rev or current.version + 1
  local _, differs = config_doc.diff(current, doc)
  if not differs then
    current.revision = rev
    return
  end
  doc.version = etcd_version(rev)
  etcd_publish(doc, "watch")
end

-- No read succeeded within timeout_ms of the start: the copy, or stop.
local function etcd_start_timeout(why)
  if current then
    return ETCD_OK
  end
  local copy = etcd.lkg
  if copy then
    etcd.lkg = nil
    -- this node's settings (the copy may come from another source)
    copy.node = etcd.node_text
    publish(copy, etcd.node, config_doc.snapshot(copy))
    etcd.from_lkg = true
    mg.log.warn("etcd: unreachable at start (", why, "); serving the last-known-good copy ",
                lkg_path, " (config version ", copy.version, ", ", #copy.elements.routes,
                " routes) and retrying")
    return ETCD_OK
  end
  mg.log.err("etcd: unreachable at start (", why, ") and no last-known-good copy in ", lkg_path,
             ": refusing to start")
  return ETCD_FAIL
end

-- What the etcd driver saw (control_etcd.c calls this from the loop, on
-- the main state: nothing here may yield). Answers as etcd.h's sink.
function _M.source_event(ev, data)
  if etcd == nil then
    return ETCD_FAIL
  end
  if ev == EV_WATCH then
    local rev, changed, err = etcd.src:watch(data)
    if rev == "rerange" then
      mg.log.warn("etcd: the watch was cancelled (history compacted past revision ",
                  tostring(etcd.src.revision), "?); reading everything again")
      return ETCD_RERANGE
    elseif err then
      mg.log.err("etcd: ", err)
      return ETCD_FAIL
    end
    if rev then
      etcd_change(rev, changed)
      return rev
    end
    return ETCD_OK
  elseif ev == EV_RANGE then
    local t0, cpu0 = mg.now(), os.clock()
    -- the first read: the collector waits for its check (gc_hold.lua)
    local gc = current == nil and gc_hold.hold(FIRST_READ_GC_MB)
    local ok, rev, err = pcall(etcd.src.range, etcd.src, data)
    if gc then
      gc_hold.release(gc)
    end
    if not ok then
      rev, err = nil, tostring(rev)
    end
    if not rev then
      mg.log.err("etcd: ", err)
      return ETCD_FAIL
    end
    etcd_read(rev, t0, (mg.now() - t0) * 1000, (os.clock() - cpu0) * 1000, #data)
    return rev
  elseif ev == EV_AUTH then
    local r = json_decode(data)
    local token = type(r) == "table" and r.token
    if type(token) ~= "string" or token == "" then
      mg.log.err("etcd: authentication answered no token")
      return ETCD_FAIL
    end
    return ETCD_OK, token
  elseif ev == EV_LOST then
    mg.log.warn("etcd: connection lost (", data, "); serving config version ",
                current and current.version or "none", ", retrying")
  elseif ev == EV_BACK then
    mg.log.info("etcd: connected again to ", data)
  elseif ev == EV_START_TIMEOUT then
    return etcd_start_timeout(data)
  end
  return ETCD_OK
end

-- etcd mode's init: the driver starts; the first version comes with its
-- first read (or the copy, when etcd does not answer within timeout_ms).
init_etcd = function(node_text, node)
  local cs = node.config_source
  lkg_path = cs.cache
  local copy, lkg_err = config_doc.lkg_read(lkg_path)
  if lkg_err then
    mg.log.warn(lkg_err)
  end
  etcd = {
    src = etcd_source.new({ prefix = cs.prefix, lua_path = node.lua_path, sandbox = node.sandbox }),
    node_text = node_text, node = node, lkg = copy, from_lkg = false, resync = false,
  }
  local auth = cs.user and json_encode({ name = cs.user, password = cs.password or "" }) or ""
  local eps = concat(cs.endpoints, "\n")
  local src = etcd.src
  -- once per process (start): the strings stay referenced by cs meanwhile
  local tls, t = nil, cs.tls
  if t then
    tls = ffi.new("mg_tls_opts_t")
    tls.ca, tls.ca_len = t.ca, t.ca and #t.ca or 0
    tls.cert, tls.cert_len = t.cert, t.cert and #t.cert or 0
    tls.key, tls.key_len = t.key, t.key and #t.key or 0
    tls.server_name, tls.server_name_len = t.server_name, t.server_name and #t.server_name or 0
    tls.verify = t.verify == false and 0 or 1
  end
  local errbuf = ffi.new("char[512]")
  local rc = C.mg_ctl_etcd_start(eps, #eps, src.key_b64, #src.key_b64, src.end_b64, #src.end_b64,
                                 auth, #auth, cs.timeout_ms, tls, errbuf, 512)
  if rc ~= 0 then
    local why = ffi_string(errbuf)
    return nil, "cannot start the etcd client for " .. concat(cs.endpoints, ", ") .. ": "
                .. (why ~= "" and why or ("error " .. tostring(rc)))
  end
  local https = eps:find("https://", 1, true) ~= nil
  if https and t and t.verify == false then
    mg.log.warn("config_source.tls.verify is false: etcd's certificate is not checked")
  end
  mg.log.info("config source: etcd ", concat(cs.endpoints, ", "), " prefix ", cs.prefix,
              cs.user and (" as " .. cs.user) or "",
              https and ((t and t.cert) and " over TLS with a client certificate" or " over TLS")
              or "", "; reading it")
  return true
end

-- The settings of an etcd node that only a restart changes (the driver,
-- the checker's policy paths), beside restart_needed's.
local function etcd_restart_needed(a, b)
  local out = {}
  local x, y = a.config_source, b.config_source
  if not same({ x.endpoints, x.prefix, x.user, x.password, x.timeout_ms, x.cache, x.tls or false },
              { y.endpoints, y.prefix, y.user, y.password, y.timeout_ms, y.cache, y.tls or false }) then
    out[1] = "config_source"
  end
  if not same(a.lua_path, b.lua_path) or not same(a.sandbox, b.sandbox) then
    out[#out + 1] = "lua_path/sandbox (policy checks of the etcd source)"
  end
  return out
end

-- SIGHUP in etcd mode: the node config again, then the whole prefix (a
-- version is made when something changed, or when etcd's revision moved:
-- the workers then re-read changed policy files too).
reload_etcd = function(reason)
  local text = read_file(conf_path)
  local node, errs = config.load_node(conf_path, text)
  if not node then
    for _, e in ipairs(errs) do
      mg.log.err("reload: ", conf_path, ": ", e)
    end
    mg.log.err("reload: the node config is invalid; keeping the one in force")
  elseif node.config_source.type ~= "etcd" then
    mg.log.warn("reload: config_source.type: changing the source from etcd needs a restart")
  elseif text ~= etcd.node_text then
    local names = restart_needed(etcd.node, node)
    for _, name in ipairs(etcd_restart_needed(etcd.node, node)) do
      names[#names + 1] = name
    end
    if #names > 0 then
      mg.log.warn("reload: changes to ", concat(names, ", "),
                  " need a restart (moongate stop, then start)")
    end
    etcd.node_text, etcd.node = text, node
  end
  if reason == "signal" then
    etcd.resync = true
  end
  C.mg_ctl_etcd_rerange()
  mg.log.info("reload (", reason, "): reading etcd again")
  return true, "reading"
end

-- ---- entry points ----------------------------------------------------------------

function _M.init(path, _, n)
  started_at = mg.now()
  conf_path = config.resolve_path(path)
  nworkers = tonumber(n) or 1
  local node_text = read_file(conf_path)
  local enode = node_text and config.load_node(conf_path, node_text)
  if enode and enode.config_source.type == "etcd" then
    return init_etcd(node_text, enode)
  end
  local doc, node_or_errs = load_source()
  local node = doc and node_or_errs
  -- the cache path is the node config's; with an unreadable node config,
  -- the default one beside it
  if node then
    lkg_path = node.config_source.cache
  else
    local dir = conf_path:match("^(.*)/[^/]*$") or "."
    lkg_path = dir .. "/moongate.lkg.json"
  end
  local lkg, lkg_err = config_doc.lkg_read(lkg_path)
  if lkg_err then
    mg.log.warn(lkg_err)
  end

  if doc then
    -- the same config as the copy: the same version (a respawned control
    -- process does not make the workers rebuild)
    if lkg and config_doc.same_text(lkg.node, doc.node) and lkg.version >= C.mg_ctl_version_get()
       and config_doc.routes_text(lkg) == config_doc.routes_text(doc) then
      doc.version = lkg.version
    else
      doc.version = math_max(C.mg_ctl_version_get(), lkg and lkg.version or 0) + 1
    end
    publish(doc, node)
    mg.log.info("config version ", doc.version, " from ", conf_path, " (",
                #doc.elements.routes, " routes)")
    return true
  end

  local errs = node_or_errs
  for _, e in ipairs(errs) do
    mg.log.err(e)
  end
  if lkg then
    local lnode = config.load_node(conf_path, lkg.node)
    mg.log.warn("the config source is invalid; starting from the last-known-good copy ",
                lkg_path, " (version ", lkg.version, ")")
    publish(lkg, lnode)
    return true
  end
  return nil, "no valid configuration (" .. tostring(errs[1]) .. (#errs > 1 and ", ..." or "")
              .. ") and no last-known-good copy in " .. lkg_path
end

function _M.reload(reason)
  if etcd then
    return reload_etcd(reason)
  end
  slice.begin(1)
  local doc, node_or_errs = load_source()
  slice.finish()
  if not doc then
    for _, e in ipairs(node_or_errs) do
      mg.log.err("reload: ", e)
    end
    mg.log.err("reload: ", #node_or_errs, " error(s); the running configuration stays (version ",
               current.version, ")")
    return true, "refused"
  end
  local node = node_or_errs
  doc.version = next_version()
  local frame, changed = config_doc.diff(current, doc)
  if not changed and reason ~= "signal" then
    return true, "unchanged"
  end
  if frame.node and current.node_conf then
    local names = restart_needed(current.node_conf, node)
    if #names > 0 then
      mg.log.warn("reload: changes to ", concat(names, ", "),
                  " need a restart (moongate stop, then start)")
    end
  end
  publish(doc, node, frame)
  mg.log.info("config version ", doc.version, " (", reason, "): ", config_doc.summary(frame))
  return true, "published"
end

local function worker_state(w)
  local st = workers[w]
  if not st then
    st = {}
    workers[w] = st
  end
  return st
end

function _M.peer(id, text)
  if text == nil then
    local w = peers[id]
    peers[id] = nil
    if w and workers[w] and workers[w].peer == id then
      workers[w].peer = nil
    end
    return
  end
  local m = config_doc.decode(text)
  if not m then
    mg.log.warn("channel: an undecodable message from peer ", id)
    return
  end
  if m.hello ~= nil then
    local w = tonumber(m.hello)
    if not w then
      return
    end
    peers[id] = w
    worker_state(w).peer = id
    if current then -- else the first version goes to every peer when it comes
      send(id, snapshot())
    end
    return
  end
  local w = peers[id]
  if w == nil then
    return
  end
  local st = worker_state(w)
  if m.applied then
    st.applied = tonumber(m.applied)
    st.refused, st.error = nil, nil
  elseif m.refused then
    st.refused, st.error = tonumber(m.refused), tostring(m.error)
    mg.log.warn("worker ", w, " refused config version ", tostring(m.refused), ": ",
                tostring(m.error))
  elseif m.resync and current then
    send(id, snapshot())
  end
end

-- ---- the status listener -----------------------------------------------------------

local function answer(r, status, body, ctype)
  if type(body) == "table" then
    body = json_encode(body)
    ctype = "application/json"
  end
  C.mg_resp_set_header(r, "Content-Type", 12, ctype, #ctype, SET)
  C.mg_resp_send(r, status, body, #body)
end

-- the workers not on the version in force: {{worker =, applied =, error =}}
local function laggards()
  local out = {}
  for w = 0, nworkers - 1 do
    local st = workers[w] or {}
    if st.applied ~= current.version then
      out[#out + 1] = { worker = w, applied = st.applied or 0, connected = st.peer ~= nil,
                        error = st.refused == current.version and st.error or nil }
    end
  end
  return out
end

local function metrics()
  local lines = {
    "# HELP gateway_config_version The config version each worker has in force (0: none yet).",
    "# TYPE gateway_config_version gauge",
  }
  for w = 0, nworkers - 1 do
    local st = workers[w]
    lines[#lines + 1] = format('gateway_config_version{worker="%d"} %d', w,
                               st and st.applied or 0)
  end
  lines[#lines + 1] = ""
  return concat(lines, "\n")
end

function _M.access(rp)
  local r = ffi_cast(req_ptr, rp)
  local v = ffi_cast(view_ptr, rp)
  if C.mg_req_listener(r) == LISTENER_ADMIN then
    if admin_api then
      return admin_api:serve(rp)
    end
    answer(r, 503, { error = "no node config in force" })
    return
  end
  local method = ffi_string(v.method, v.method_len)
  local path = ffi_string(v.path, v.path_len)
  if path ~= "/status/live" and path ~= "/status/ready" and path ~= "/metrics" then
    answer(r, 404, { error = "not found" })
    return
  end
  if method ~= "GET" and method ~= "HEAD" then
    C.mg_resp_set_header(r, "Allow", 5, "GET, HEAD", 9, SET)
    answer(r, 405, { error = "method not allowed" })
    return
  end
  if path == "/status/live" then
    answer(r, 200, { status = "ok" })
  elseif path == "/status/ready" then
    if current == nil then
      answer(r, 503, { status = "not ready", version = 0,
                       error = "no config version yet (waiting for the config source)" })
      return
    end
    local late = laggards()
    if #late == 0 then
      answer(r, 200, { status = "ready", version = current.version })
    else
      answer(r, 503, { status = "not ready", version = current.version, workers = late })
    end
  else
    answer(r, 200, metrics(), "text/plain; version=0.0.4; charset=utf-8")
  end
end

-- for specs and tools: what the control process keeps
function _M.state()
  return { version = current and current.version, workers = workers, lkg_path = lkg_path }
end

return _M
