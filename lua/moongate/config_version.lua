-- Config versions: routes.json compiled into what a worker serves (the
-- router, an upstream handle per upstream, per route the flat lists of
-- policies of each phase), each version built from the one before so that
-- a change touches only what changed.
--
--   local builder = config_version.new{ upstream = function(u) ... end }
--   local v, err = builder:build(conf_path, node_text, routes_text)
--   local v, err = builder:build(conf_path, node_text, nil, doc)
--   -- doc: the routes already split, {skeleton =, elements = {routes =
--   -- {texts}, upstreams =, consumers =}} (a worker's, from the control
--   -- process: config_doc.lua); no file is read then. doc.checked: the
--   -- control process validated these entities (a worker's docs): new
--   -- ones get their defaults filled (config.normalize_routes), not
--   -- validated again; the checks across entities still run
--   -- v = {router =, upstreams = {id = handle}, consumers =, routes =,
--   --      stats = {routes =, validated =, compiled =, reused =,
--   --               modules_loaded =, router_ms =, whole =,
--   --               router = "kept" | "updated" | "built"}}
--   builder:commit(v)   -- v is now the version in force (its parts are
--                       -- what the next build reuses). An "updated" router
--                       -- is the previous version's, changed in place
--                       -- here: build v, commit v, then serve v, with
--                       -- nothing matched on the old version in between.
--
-- What is reused, and its key (texts are the exact bytes of the entity in
-- routes.json, as json_split cuts them):
--   - a route's decoded and validated table, and its policies' init(conf)
--     results: the route's text + the identity of each policy module it
--     names (policy_modules.lua gives the same table while the module's
--     source is unchanged);
--   - a route's compiled table (phase lists, flags, upstream handle): the
--     above + the global policies in force + the upstream it names;
--   - an upstream's C handle (its balancer state with it): the upstream's
--     text;
--   - the global policies' init results: the text of "global_policies" +
--     the identities of their modules;
--   - the consumers index: all consumer texts unchanged;
--   - the router: the same route tables in the same order (else it is
--     built anew: router.new);
--   - anything at all only while the node config's text is unchanged.
-- Only the entities whose text is new are decoded and validated (with
-- config.validate_routes, on a routes.json made of just those plus the
-- upstreams they name); the checks across entities (duplicate ids, a
-- route's upstream exists) run over the whole version here, through
-- indexes by text and by id kept from build to build (no table of the
-- size of the config is allocated per build). Whenever that finds an
-- error, or the text cannot be split, the whole text goes through
-- config.load_routes instead, so the errors are exactly those of
-- `moongate check`, and a valid but unsplittable file still loads (with
-- nothing reused).
--
-- Cost of a one-route change at 5,000 routes: ~4 ms (bench/reload.lua);
-- O(routes) table lookups, O(changed routes) decoding, validation, init()
-- and router update. A worker's delta frame skips the O(routes) walk (see
-- "the delta path" below): ~0.3 ms at 10,000 routes, O(changed) work plus
-- O(routes) pointer copies; so does the control process's check of a
-- change of a few entities (check_delta): ~0.6 ms at 5,000 routes.
--
-- A compiled route table is never changed once built: a request in flight
-- keeps the route (and so the policies and upstream) it started with.

local cjson = require("cjson.safe")
local slice_check = require("moongate.slice").check
local binding = require("moongate.ffi")
local config = require("moongate.config")
local config_doc = require("moongate.config_doc")
local router = require("moongate.router")
local consumer_index = require("moongate.consumers")
local json_split = require("moongate.json_split")
local policy_modules = require("moongate.policy_modules")
local sandbox = require("moongate.sandbox")

local C = binding.C
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local setmetatable = setmetatable
local io_open = io.open
local concat = table.concat
local new_tab = require("table.new")

local PHASE_HEADER_FILTER = C.MG_PHASE_HEADER_FILTER
local PHASE_LOG = C.MG_PHASE_LOG
local PHASE_BODY_FILTER = C.MG_PHASE_BODY_FILTER

local PHASES = { "rewrite", "access", "header_filter", "body_filter", "log" }
local SPLIT = { routes = true, upstreams = true, consumers = true }

-- decoders as config.lua's (no NaN/Infinity, depth 64); an element sits
-- two levels down in the whole file, so it may nest two levels less
local null = cjson.null
local json_top = cjson.new()
json_top.decode_invalid_numbers(false)
json_top.decode_max_depth(64)
local json_elem = cjson.new()
json_elem.decode_invalid_numbers(false)
json_elem.decode_max_depth(62)

local _M = {}
local mt = { __index = _M }

local EMPTY = { routes = {}, ups = {}, cons = {}, route_list = {}, modules = {} }
local EMPTY_LIST = {}

-- The index of a kind (routes, upstreams, consumers): its entries by text
-- and by id, kept from build to build. An entry is in the version being
-- built when its `seen` is that build's stamp; the others (removed, or from
-- a build that failed) stay until commit() compacts the index, and may be
-- reused meanwhile: an entry is right for any version with its text.
local function new_index()
  return { texts = {}, ids = {}, added = 0 }
end

-- opts.upstream(u): a C handle for the validated upstream u, or nil and
-- an error (nil opts.upstream: no handles, as for a check).
-- opts.check: validate only (the master's reload check, config_check.lua):
-- build stops once the version is known valid, and runs no policy init(),
-- compiles no route and builds no router; the indexes are kept as for a
-- worker, so a one-route change validates one route.
function _M.new(opts)
  opts = opts or {}
  return setmetatable({
    modules = policy_modules.new(),
    make_upstream = opts.upstream,
    check_only = opts.check or nil,
    current = EMPTY,
    epoch = 0, -- see reuse_check
    index = { routes = new_index(), upstreams = new_index(), consumers = new_index() },
    stamp = 0,
  }, mt)
end

-- The sandboxed policies given as source text, name -> text (what etcd's
-- <prefix>/policies/<name> hold; the etcd loader sets them before a
-- build, after sandbox.load accepted each text). Builds from then on use
-- them: a route naming a changed one is compiled again. Names that a
-- policy file has are not looked up here (config.sandboxed_source).
function _M:set_policy_sources(sources)
  self.sandboxed_sources = sources
end

-- ---- compiling ---------------------------------------------------------------

-- the policies of list (route or global entries) with their init(conf)
local function instances(list, get)
  local out = {}
  for _, p in ipairs(list or {}) do
    if p.enabled ~= false then
      local mod = get(p.name)
      local conf = p.conf or {}
      if mod.init then
        conf = mod.init(conf) or conf
      end
      out[#out + 1] = { name = p.name, mod = mod, conf = conf, priority = mod.priority or 0 }
    end
  end
  return out
end

-- A new compiled route: a copy of the validated route with its phase lists.
-- Higher priority first; equal priorities keep their order (globals, then
-- the route's own, as listed), the same in every version.
local function compile_route(value, pols, globals, handle)
  local route = {}
  for k, v in pairs(value) do
    route[k] = v
  end
  local list, n = {}, 0
  for _, p in ipairs(globals) do
    n = n + 1
    list[n] = p
  end
  for _, p in ipairs(pols) do
    n = n + 1
    list[n] = p
  end
  -- a stable insertion sort: a route has a few policies, and no closure
  -- is made per route
  for i = 2, n do
    local p = list[i]
    local j = i - 1
    while j >= 1 and list[j].priority < p.priority do
      list[j + 1] = list[j]
      j = j - 1
    end
    list[j + 1] = p
  end
  local phases = {}
  for _, ph in ipairs(PHASES) do
    local l
    for i = 1, n do
      local p = list[i]
      if type(p.mod[ph]) == "function" then
        l = l or {}
        l[#l + 1] = p
      end
    end
    phases[ph] = l
  end
  local flags = 0
  if phases.header_filter then
    flags = flags + PHASE_HEADER_FILTER
  end
  if phases.body_filter then
    flags = flags + PHASE_BODY_FILTER
  end
  -- the log entry point also releases the request's ctx, so any route that
  -- keeps one (for header_filter, body_filter) asks for it too
  if phases.log or phases.header_filter or phases.body_filter then
    flags = flags + PHASE_LOG
  end
  route.phases = phases
  route.phase_flags = flags
  route.has_access = phases.rewrite ~= nil or phases.access ~= nil
  route.strip = route.strip_prefix or nil
  route.upstream_handle = handle
  return route
end

-- ---- loading -------------------------------------------------------------------

-- the file's contents, or nil (the caller lets config.lua say why)
local function read_file(path)
  local f = io_open(path, "rb")
  if not f then
    return nil
  end
  local text = f:read("*a")
  f:close()
  return text
end

-- the names of the policies a route or global list names, and their
-- modules now: {name1, mod1, name2, mod2, ...}
local function deps_of(list, get)
  local deps = {}
  for _, p in ipairs(list or {}) do
    deps[#deps + 1] = p.name
    deps[#deps + 1] = get(p.name)
  end
  return deps
end

local function deps_same(deps, get)
  for k = 1, #deps, 2 do
    local mod = get(deps[k])
    if mod == nil or mod ~= deps[k + 1] then
      return false
    end
  end
  return true
end

-- The entries of a kind for texts, in order: the index's for texts seen
-- before (and, with keep, still valid), new ones (decoded, to be
-- validated) for the others. nil: an element does not decode, or a text
-- is given twice (a duplicate the whole-text path names).
local function entries(texts, index, stamp, fresh, keep)
  local known = index.texts
  local list = new_tab(#texts, 0)
  for i, text in ipairs(texts) do
    if i % 256 == 0 then
      -- a reload runs in slices between requests: without checks here,
      -- in register_ids and in load_split's upstream pass, the slice
      -- before the routes loop's first check ran 3-6 ms at 5,000 routes
      slice_check()
    end
    local e = known[text]
    if e and e.seen == stamp then
      return nil
    end
    if not (e and (keep == nil or keep(e))) then
      local value = json_elem.decode(text)
      if type(value) ~= "table" then
        return nil
      end
      e = { text = text, value = value }
      fresh[#fresh + 1] = e
    end
    e.seen = stamp
    list[i] = e
  end
  return list
end

-- Each id once in list: the index's ids map keeps, per id, an entry that
-- had it; a live one other than e is a duplicate. O(entries), no
-- allocation. false on a duplicate (or an id that is not a string).
local function register_ids(list, index, stamp)
  local ids = index.ids
  for i, e in ipairs(list) do
    if i % 256 == 0 then
      slice_check()
    end
    local id = e.value.id
    if type(id) ~= "string" then
      return false
    end
    local holder = ids[id]
    if holder ~= e then
      if holder and holder.seen == stamp then
        return false
      end
      ids[id] = e
    end
  end
  return true
end

-- the live upstream entry named id, or nil
local function live(index, id, stamp)
  local e = index.ids[id]
  if e and e.seen == stamp then
    return e
  end
  return nil
end

local function values(list)
  local out = new_tab(#list, 0)
  for i, e in ipairs(list) do
    out[i] = e.value
  end
  return out
end

local function same_list(a, b)
  if not b or #a ~= #b then
    return false
  end
  for i = 1, #a do
    if a[i] ~= b[i] then
      return false
    end
  end
  return true
end

-- Whether a known entry may be reused: its text is the same, and so are
-- the modules of its policies. Those are checked entry by entry only for
-- entries last checked before a module changed (self.epoch counts the
-- builds that found a module of the version in force changed), so that an
-- entry out of the version in force meanwhile (a route removed, then
-- listed again) is not reused with the modules it had.
local function reuse_check(self, prev, get)
  for name, mod in pairs(prev.modules) do
    if (get(name) or false) ~= mod then
      self.epoch = self.epoch + 1
      break
    end
  end
  local epoch = self.epoch
  return function(e)
    if e.deps == nil or e.epoch == epoch then
      return true
    end
    if deps_same(e.deps, get) then
      e.epoch = epoch
      return true
    end
    return false
  end
end

-- The split path: nil when anything is off (the caller then takes the
-- whole-text path, which names the errors).
-- Validates the entities new in this version (fresh_*: entries) in top
-- (the skeleton, decoded), with the (already valid) upstreams that new
-- routes name, so that their references resolve; then indexes them by
-- text. Returns what config.validate_routes returns (the validated
-- document), or nil when one is invalid (nothing indexed).
local function validate_fresh(self, top, stamp, gen, fresh_ups, fresh_routes, fresh_cons)
  local idx = self.index
  local sub_ups = values(fresh_ups)
  local named = {}
  for _, e in ipairs(fresh_ups) do
    named[e.value.id] = true
  end
  for _, e in ipairs(fresh_routes) do
    local up = e.value.upstream
    if type(up) == "string" and not named[up] then
      named[up] = true
      sub_ups[#sub_ups + 1] = live(idx.upstreams, up, stamp).value
    end
  end
  top.upstreams = sub_ups
  top.routes = values(fresh_routes)
  top.consumers = values(fresh_cons)
  -- a doc the control process checked: defaults only (config.lua), unless
  -- its guard finds something off
  local opts = { policy_loader = gen.loader }
  local valid = self.trusted and config.normalize_routes(top, opts)
                or config.validate_routes(top, opts)
  if not valid then
    return nil
  end
  for _, e in ipairs(fresh_routes) do
    e.deps, e.epoch = deps_of(e.value.policies, gen.get), self.epoch
  end
  for kind, fresh in pairs({ upstreams = fresh_ups, routes = fresh_routes, consumers = fresh_cons }) do
    local index = idx[kind]
    for _, e in ipairs(fresh) do
      index.texts[e.text] = e
    end
    index.added = index.added + #fresh
  end
  return valid
end

-- The route entry e compiled with globals and its upstream entry up (or
-- false), reusing what e holds when neither changed. Second result: true
-- when it compiled.
local function compiled_route(e, globals, up, get)
  if e.compiled and e.c_globals == globals and e.c_up == up then
    return e.compiled, false
  end
  e.pols = e.pols or instances(e.value.policies, get)
  e.compiled = compile_route(e.value, e.pols, globals.list, up and up.handle or nil)
  e.c_globals, e.c_up = globals, up
  return e.compiled, true
end

local function load_split(self, prev, text, given, gen, stamp)
  local old = prev.doc
  local doc = given or json_split.split(text, SPLIT, old and old.spans and old)
  if not doc then
    return nil
  end
  local top = json_top.decode(doc.skeleton)
  if type(top) ~= "table" then
    return nil
  end
  local get = gen.get
  local keep = reuse_check(self, prev, get)
  local idx = self.index
  local fresh_ups, fresh_routes, fresh_cons = {}, {}, {}
  local ups = entries(doc.elements.upstreams or {}, idx.upstreams, stamp, fresh_ups)
  local routes = ups and entries(doc.elements.routes or {}, idx.routes, stamp, fresh_routes, keep)
  local cons = routes and entries(doc.elements.consumers or {}, idx.consumers, stamp, fresh_cons)
  -- the checks across entities that validating the new ones alone cannot
  -- make: ids once per kind, every route's upstream exists
  if not (cons and register_ids(ups, idx.upstreams, stamp)
          and register_ids(routes, idx.routes, stamp)
          and register_ids(cons, idx.consumers, stamp)) then
    return nil
  end
  for i, e in ipairs(routes) do
    if i % 256 == 0 then
      slice_check()
    end
    local up = e.value.upstream
    if up ~= nil and up ~= null and not live(idx.upstreams, up, stamp) then
      return nil
    end
  end

  local valid = validate_fresh(self, top, stamp, gen, fresh_ups, fresh_routes, fresh_cons)
  if not valid then
    return nil
  end
  return {
    doc = doc, ups = ups, routes = routes, cons = cons,
    upstream = function(id) return live(idx.upstreams, id, stamp) end,
    -- what global_policies' reuse is keyed on: the skeleton holds it and
    -- every other member that is not split (a change to one of those
    -- recompiles the globals: rare, and cheap)
    globals_text = doc.skeleton,
    globals = valid.global_policies or {},
    validated = #fresh_routes,
  }
end

-- The whole-text path: config.load_routes' errors, or (a valid file that
-- json_split does not take) entries without texts, so nothing is reused.
local function load_whole(path, text, gen)
  local tbl, errs = config.load_routes(path, { policy_loader = gen.loader }, text)
  if not tbl then
    return nil, concat(errs, "; ")
  end
  local function wrap(list)
    local out = {}
    for i, v in ipairs(list or {}) do
      out[i] = { value = v }
    end
    return out
  end
  local loaded = {
    ups = wrap(tbl.upstreams), routes = wrap(tbl.routes), cons = wrap(tbl.consumers),
    globals = tbl.global_policies or {}, validated = #(tbl.routes or {}),
  }
  for _, e in ipairs(loaded.routes) do
    e.deps = deps_of(e.value.policies, gen.get)
  end
  local by_id = {}
  for _, e in ipairs(loaded.ups) do
    by_id[e.value.id] = e
  end
  loaded.upstream = function(id) return by_id[id] end
  return loaded
end

-- ---- the delta path -------------------------------------------------------------
--
-- A doc that config_doc.apply made from the doc of the version in force
-- (doc.delta = {base = that doc, splice = {kind = {at, del, ins}}}) is
-- built from that version's parts and the splices alone: only the
-- inserted entities are looked up, decoded, validated and compiled, and
-- the checks across entities are answered by the indexes as the version
-- in force left them, less the entities the splice removes:
--   - an entry is live in the version in force when its seen is that
--     version's stamp (commit() marks a delta's removed entries 0 and its
--     inserted ones with the stamp, so the stamp does not change);
--   - an inserted id is a duplicate when its holder in ids is live and not
--     removed, or another inserted entity has it (likewise a text);
--   - an inserted route's upstream is a live upstream (the upstreams did
--     not change on this path).
-- The route list and the entry list are copied with the splice (O(n)
-- pointer copies, ~20 us at 10,000 routes); the router is changed by
-- router.plan_splice (O(changed)). Anything else takes the full walk
-- (load_split, then load_whole for the errors): a snapshot, several
-- frames taken at once, a failed or uncommitted build since the version
-- in force, a changed node config, skeleton (global_policies), upstream or
-- policy module, an id or text given twice, an element that does not
-- decode or validate. The errors are then the full walk's.

-- list with each hunk's list[at .. at+del-1] replaced by its
-- hunk[field] (hunks ascending, not overlapping): a new table, O(n)
-- pointer copies
local function spliced(list, hunks, field)
  local size = #list
  for _, h in ipairs(hunks) do
    size = size - h.del + #h[field]
  end
  local out = new_tab(size, 0)
  local k, from = 0, 1
  for _, h in ipairs(hunks) do
    for i = from, h.at - 1 do
      k = k + 1
      out[k] = list[i]
    end
    local ins = h[field]
    for i = 1, #ins do
      k = k + 1
      out[k] = ins[i]
    end
    from = h.at + h.del
  end
  for i = from, #list do
    k = k + 1
    out[k] = list[i]
  end
  return out
end

-- The entries the hunks ({at, del, ins = {texts}}, ascending) insert
-- into list (the kind's entries in the version in force, stamp its
-- stamp): {hunks = {{at, del, added = {entries}}}, removed = {entry =
-- true}, added = {entries, all hunks'}}, fresh ones (decoded, to be
-- validated) appended to fresh; nil when the full walk must decide (a
-- duplicate, an element that does not decode, an id that is not a
-- string). O(removed + inserted).
local function splice_entries(hunks, list, index, stamp, fresh, keep)
  local removed = {}
  for _, h in ipairs(hunks) do
    for i = h.at, h.at + h.del - 1 do
      removed[list[i]] = true
    end
  end
  local texts, ids = index.texts, index.ids
  local added, added_ids, added_texts = {}, {}, {}
  local out = new_tab(#hunks, 0)
  for k, h in ipairs(hunks) do
    local ins = h.ins
    local here = new_tab(#ins, 0)
    out[k] = { at = h.at, del = h.del, added = here }
    for i = 1, #ins do
      if #added % 128 == 127 then
        slice_check() -- a splice made of several frames may span many entities
      end
      local text = ins[i]
      if type(text) ~= "string" or added_texts[text] then
        return nil
      end
      added_texts[text] = true
      local e = texts[text]
      if e and e.seen == stamp and not removed[e] then
        return nil -- the same text live elsewhere
      end
      -- an entry seen in an older version is reused only while its
      -- policies' modules are the ones it was validated with
      if not (e and keep(e)) then
        local value = json_elem.decode(text)
        if type(value) ~= "table" then
          return nil
        end
        e = { text = text, value = value }
        fresh[#fresh + 1] = e
      end
      local id = e.value.id
      if type(id) ~= "string" or added_ids[id] then
        return nil
      end
      local holder = ids[id]
      if holder and holder.seen == stamp and not removed[holder] then
        return nil
      end
      added_ids[id] = true
      here[i] = e
      added[#added + 1] = e
    end
  end
  return { hunks = out, removed = removed, added = added }
end

-- The hunks that lead from base (the doc of the version in force) to
-- doc, kind -> {{at, del, ins}, ...}: those of doc's own delta when doc
-- comes from base, else the splices of the chain of deltas back to base
-- (config_doc.apply) made into one: the first P and last S elements that
-- no step touched are kept, the rest is replaced by doc's (O(chain + the
-- range between)). nil when the chain does not reach base.
local function splices_since(doc, base)
  local d = doc.delta
  if d and d.base == base then
    return d.hunks
  end
  local steps = {}
  while d and d.base ~= base do
    steps[#steps + 1] = d
    d = d.prior
  end
  if not d then
    return nil
  end
  steps[#steps + 1] = d
  local out = {}
  for kind, final in pairs(doc.elements) do
    local p, s
    local work = 0 -- the entities the steps themselves touch
    for _, step in ipairs(steps) do
      local sp = step.splice[kind]
      if sp then
        work = work + sp.del + #sp.ins
        local n = #step.base.elements[kind]
        local keep_end = n - (sp.at + sp.del - 1)
        p = (p == nil or sp.at - 1 < p) and sp.at - 1 or p
        s = (s == nil or keep_end < s) and keep_end or s
      end
    end
    if p then
      local n0, nf = #base.elements[kind], #final
      if p + s > n0 or p + s > nf then
        return nil -- not splices of these lists
      end
      if (n0 - p - s) + (nf - p - s) > 4 * work + 64 then
        -- changes far apart (a route edited near the top, another added
        -- at the end): the range between them would be looked up entity
        -- by entity, and the router merged whole; the full walk is
        -- cheaper then (5.6 ms against 1.3 ms at 5,000 routes)
        return nil
      end
      local ins = new_tab(nf - p - s, 0)
      for i = p + 1, nf - s do
        ins[i - p] = final[i]
      end
      out[kind] = { { at = p + 1, del = n0 - p - s, ins = ins } }
    end
  end
  return out
end

-- The version doc makes from the version in force (prev) by its delta, or
-- nil: the full walk decides (see above). Raises as build does (a
-- policy's init()).
local function build_delta(self, prev, doc, gen, loads)
  local old = prev.doc
  if not (old and prev.stamp == self.stamp and prev.handles
          and doc.node == prev.node_text and doc.skeleton == old.skeleton) then
    return nil
  end
  local sp = splices_since(doc, old)
  if not sp or sp.upstreams then
    return nil
  end
  local get = gen.get
  for name, mod in pairs(prev.modules) do
    if (get(name) or false) ~= mod then
      return nil
    end
  end
  local keep = reuse_check(self, prev, get) -- no module changed: no new epoch
  local globals = prev.globals
  if not (globals and globals.text == doc.skeleton and deps_same(globals.deps, get)) then
    return nil
  end
  -- checks between the steps below, not only in their loops: a step of
  -- a one-route change is 0.02-0.2 ms, but a GC sweep or a CPU shared with
  -- other processes makes each several times that, and without them the
  -- whole build was one slice (3-4 ms seen under bench/reload.lua)
  slice_check()
  local idx, stamp = self.index, prev.stamp
  local fresh_routes, fresh_cons = {}, {}
  local rd, cd
  if sp.routes then
    rd = splice_entries(sp.routes, prev.routes, idx.routes, stamp, fresh_routes, keep)
    if not rd then
      return nil
    end
    for _, e in ipairs(rd.added) do
      local up = e.value.upstream
      if up ~= nil and up ~= null and not live(idx.upstreams, up, stamp) then
        return nil
      end
    end
  end
  if sp.consumers then
    cd = splice_entries(sp.consumers, prev.cons, idx.consumers, stamp, fresh_cons, keep)
    if not cd then
      return nil
    end
  end

  slice_check()
  -- validate the new entities (no upstream changed: none is new)
  local top = json_top.decode(doc.skeleton)
  if type(top) ~= "table"
     or not validate_fresh(self, top, stamp, gen, {}, fresh_routes, fresh_cons) then
    return nil
  end

  slice_check()
  -- the inserted routes compiled (or their compiled tables reused), and
  -- the router's change planned
  local routes, route_list = prev.routes, prev.route_list
  local compiled = 0
  local rt, router_plan, router_how, router_ms = prev.router, nil, "kept", 0
  if rd then
    local n = 0
    for _, h in ipairs(rd.hunks) do
      local list = new_tab(#h.added, 0)
      for i, e in ipairs(h.added) do
        n = n + 1
        if n % 128 == 0 then
          slice_check()
        end
        local name = e.value.upstream
        local up = name and live(idx.upstreams, name, stamp) or false
        local c, fresh = compiled_route(e, globals, up, get)
        if fresh then
          compiled = compiled + 1
        end
        list[i] = c
      end
      h.ins = list -- the compiled routes, for the route list and the router
    end
    slice_check()
    routes = spliced(prev.routes, rd.hunks, "added")
    local old_list = route_list
    route_list = spliced(old_list, rd.hunks, "ins")
    slice_check()
    local t0 = C.mg_time_now()
    router_plan = router.plan_hunks(rt, old_list, rd.hunks)
                  or router.plan(rt, old_list, route_list)
    if router_plan then
      router_how = "updated"
    else
      rt = router.new(route_list)
      router_how = "built"
    end
    router_ms = (C.mg_time_now() - t0) * 1000
  end

  local cons, consumers = prev.cons, prev.consumer_index
  if cd then
    cons = spliced(prev.cons, cd.hunks, "added")
    consumers = consumer_index.new(values(cons))
  end

  local handles = prev.handles -- the upstreams did not change
  return {
    router = rt,
    router_plan = router_plan,
    upstreams = handles,
    consumers = consumers,
    routes = route_list,
    stats = {
      routes = #route_list,
      validated = #fresh_routes,
      compiled = compiled,
      reused = #route_list - compiled,
      modules_loaded = self.modules:load_count() - loads,
      router_ms = router_ms,
      router = router_how,
      whole = false,
      delta = true,
    },
    parts = {
      node_text = prev.node_text, doc = doc, modules = gen.seen(),
      ups = prev.ups, routes = routes, cons = cons,
      consumer_index = consumers, globals = globals, route_list = route_list, router = rt,
      handles = handles, stamp = stamp, marks = { routes = rd, consumers = cd },
    },
  }
end

-- The hunks turning list a into list b (config_doc.hunks), nil when none:
-- false when they replace many entities (a reordering, a file rewritten):
-- looking those up one by one would cost more than the full walk.
local function short_hunks(a, b)
  local hunks = config_doc.hunks(a, b)
  if #hunks == 0 then
    return nil
  end
  local work = 0
  for _, h in ipairs(hunks) do
    work = work + h.del + #h.ins
  end
  return work <= 64 and hunks
end

-- The check (opts.check: the control process's, config_check.lua) of a
-- version whose upstreams, skeleton, node config and policy modules are
-- those of the version in force (prev), and whose routes and consumers
-- differ from it in a few entities (short_hunks): only the new entities
-- are decoded and validated, and duplicates and upstream references are
-- answered by the indexes, as build_delta does for a worker. It replaces
-- the full walk's O(routes) lookups (entries, register_ids, the upstream
-- pass: ~4 ms of the control's CPU per change at 5,000 routes) with
-- O(changed) work and O(routes) pointer comparisons and copies. nil: the
-- full walk decides (and names the errors).
local function check_delta(self, prev, doc, gen, loads)
  local old = prev.doc
  if not (old and old.elements and prev.stamp == self.stamp and doc.skeleton == old.skeleton) then
    return nil
  end
  local get = gen.get
  for name, mod in pairs(prev.modules) do
    if (get(name) or false) ~= mod then
      return nil
    end
  end
  local oe, ne = old.elements, doc.elements
  if short_hunks(oe.upstreams or EMPTY_LIST, ne.upstreams or EMPTY_LIST) ~= nil then
    return nil
  end
  local sr = short_hunks(oe.routes or EMPTY_LIST, ne.routes or EMPTY_LIST)
  local sc = short_hunks(oe.consumers or EMPTY_LIST, ne.consumers or EMPTY_LIST)
  if sr == false or sc == false then
    return nil
  end
  local keep = reuse_check(self, prev, get) -- no module changed: no new epoch
  local idx, stamp = self.index, prev.stamp
  local fresh_routes, fresh_cons = {}, {}
  local rd, cd
  if sr then
    rd = splice_entries(sr, prev.routes, idx.routes, stamp, fresh_routes, keep)
    if not rd then
      return nil
    end
    for _, e in ipairs(rd.added) do
      local up = e.value.upstream
      if up ~= nil and up ~= null and not live(idx.upstreams, up, stamp) then
        return nil
      end
    end
  end
  if sc then
    cd = splice_entries(sc, prev.cons, idx.consumers, stamp, fresh_cons, keep)
    if not cd then
      return nil
    end
  end
  if #fresh_routes + #fresh_cons > 0 then
    local top = json_top.decode(doc.skeleton)
    if type(top) ~= "table"
       or not validate_fresh(self, top, stamp, gen, {}, fresh_routes, fresh_cons) then
      return nil
    end
  end
  local routes = rd and spliced(prev.routes, rd.hunks, "added") or prev.routes
  local cons = cd and spliced(prev.cons, cd.hunks, "added") or prev.cons
  return {
    stats = { routes = #routes, validated = #fresh_routes, whole = false, delta = true,
              modules_loaded = self.modules:load_count() - loads },
    parts = { node_text = prev.node_text, doc = doc, modules = gen.seen(),
              ups = prev.ups, routes = routes, cons = cons, stamp = stamp,
              marks = { routes = rd, consumers = cd } },
  }
end

-- Builds the next version from the node config at conf_path (node_text:
-- its contents, when the caller read them) and its routes file
-- (routes_text likewise). Returns the version, or nil and the errors
-- ("; "-joined). Raises only on a policy's init() error or a bug; the
-- caller pcalls. The version in force is left as it is.
function _M:build(conf_path, node_text, routes_text, given_doc)
  if node_text == nil then
    -- read here (not by load_node) to compare it with the last one
    node_text = read_file(conf_path)
  end
  -- the node config parsed once per text (it changes rarely; parsing and
  -- validating it was ~0.1 ms, a third of a worker's one-route delta build)
  local node = self.node_cache
  if not (node and self.node_cache_text == node_text and self.node_cache_path == conf_path) then
    local errs
    node, errs = config.load_node(conf_path, node_text)
    if not node then
      return nil, concat(errs, "; ")
    end
    self.node_cache, self.node_cache_text, self.node_cache_path = node, node_text, conf_path
  end
  -- policies may read node settings (lua_path, redis...) in init(): a
  -- changed node config rebuilds everything
  local prev = self.current
  if node_text ~= prev.node_text then
    prev = EMPTY
    self.index = { routes = new_index(), upstreams = new_index(), consumers = new_index() }
  end
  local src = node.config_source
  local text
  if given_doc then
    -- joined only when the split path fails, for the whole-text errors
    text = nil
  elseif src.type ~= "file" then
    return nil, "config_source " .. tostring(src.type) .. " is not supported yet"
  else
    -- unreadable: load_whole has config.load_routes say why
    text = routes_text or read_file(src.path)
  end
  sandbox.configure(node.sandbox)
  local gen = self.modules:generation(node.lua_path, {
    dir = node.sandbox.policies_dir, sources = self.sandboxed_sources,
  })
  local loads = self.modules:load_count()
  self.trusted = given_doc and given_doc.checked and not self.check_only or nil
  slice_check()
  if given_doc and not self.check_only then
    local v = build_delta(self, prev, given_doc, gen, loads)
    if v then
      return v
    end
  end
  local split_doc -- check mode: text split once, for check_delta and load_split
  if self.check_only and text and prev.doc and prev.doc.spans then
    split_doc = json_split.split(text, SPLIT, prev.doc)
    local v = split_doc and check_delta(self, prev, split_doc, gen, loads)
    if v then
      return v
    end
  end
  self.stamp = self.stamp + 1

  local loaded = (text or given_doc)
                 and load_split(self, prev, text, given_doc or split_doc, gen, self.stamp)
  local keyed = loaded ~= nil
  if not loaded then
    local err
    if given_doc then
      text, err = json_split.join(given_doc.skeleton, given_doc.elements)
      if not text then
        return nil, "the routes do not join: " .. tostring(err)
      end
    end
    loaded, err = load_whole(src.path or "routes", text, gen)
    if not loaded then
      return nil, err
    end
  end
  local uerrs = config.unsupported(node, { upstreams = values(loaded.ups) })
  if #uerrs > 0 then
    return nil, concat(uerrs, "; ")
  end
  if self.check_only then
    return {
      stats = { routes = #loaded.routes, validated = loaded.validated, whole = not keyed,
                modules_loaded = self.modules:load_count() - loads },
      parts = { node_text = node_text, doc = loaded.doc, modules = gen.seen(),
                ups = loaded.ups, routes = loaded.routes, cons = loaded.cons,
                stamp = keyed and self.stamp or nil },
    }
  end

  local get = gen.get

  -- upstream handles: one per upstream text
  local handles = {}
  for _, e in ipairs(loaded.ups) do
    if e.handle == nil and self.make_upstream then
      local h, err = self.make_upstream(e.value)
      if not h then
        return nil, err
      end
      e.handle = h
    end
    handles[e.value.id] = e.handle
  end

  -- global policies
  local globals = prev.globals
  if not (keyed and globals and globals.text == loaded.globals_text
          and deps_same(globals.deps, get)) then
    globals = {
      text = keyed and loaded.globals_text or nil,
      deps = deps_of(loaded.globals, get),
      list = instances(loaded.globals, get),
    }
  end

  -- routes
  local route_list = new_tab(#loaded.routes, 0)
  local compiled = 0
  local upstream = loaded.upstream
  for i, e in ipairs(loaded.routes) do
    if i % 128 == 0 then
      slice_check() -- a reload runs in slices between requests
    end
    local name = e.value.upstream
    local up = name and upstream(name) or false
    local c, fresh = compiled_route(e, globals, up, get)
    if fresh then
      compiled = compiled + 1
    end
    route_list[i] = c
  end

  -- consumers
  local consumers = prev.consumer_index
  if not (keyed and consumers and same_list(loaded.cons, prev.cons)) then
    consumers = consumer_index.new(values(loaded.cons))
  end

  -- the router: kept when the route list is the same; else updated in
  -- place when the change allows (router.plan now, router.apply at
  -- commit: the version in force keeps its router until then); else
  -- built anew
  local rt = prev.router
  local router_ms, router_plan, router_how = 0, nil, "kept"
  if not (rt and same_list(route_list, prev.route_list)) then
    local t0 = C.mg_time_now()
    router_plan = rt and router.plan(rt, prev.route_list, route_list)
    if router_plan then
      router_how = "updated"
    else
      rt = router.new(route_list)
      router_how = "built"
    end
    router_ms = (C.mg_time_now() - t0) * 1000
  end

  return {
    router = rt,
    router_plan = router_plan,
    upstreams = handles,
    consumers = consumers,
    routes = route_list,
    stats = {
      routes = #route_list,
      validated = loaded.validated,
      compiled = compiled,
      reused = #route_list - compiled,
      modules_loaded = self.modules:load_count() - loads,
      router_ms = router_ms,
      router = router_how,
      whole = not keyed,
    },
    -- what the next build reuses
    parts = {
      node_text = node_text, doc = loaded.doc, modules = gen.seen(),
      ups = loaded.ups, routes = loaded.routes, cons = loaded.cons,
      consumer_index = consumers, globals = globals, route_list = route_list, router = rt,
      handles = handles, stamp = keyed and self.stamp or nil,
    },
  }
end

-- Drops from index the entries that are not in list (the version in force)
-- once as many were added as list holds: O(1) a change, amortized.
local function compact(index, list)
  if index.added <= #list + 64 then
    return
  end
  local texts, ids = {}, {}
  for _, e in ipairs(list) do
    if e.text then
      texts[e.text] = e
      ids[e.value.id] = e
    end
  end
  index.texts, index.ids, index.added = texts, ids, 0
end

-- Makes v (from build) the version the next build starts from.
function _M:commit(v)
  if v.router_plan then
    -- the router of the version in force becomes this one's, in place
    router.apply(v.router, v.router_plan)
    v.router_plan = nil
  end
  local parts = v.parts
  self.current = parts
  v.parts = nil
  -- the deltas that led to this version are not needed any more (nor
  -- the versions they keep alive)
  if parts.doc then
    parts.doc.delta = nil
  end
  local marks = parts.marks
  if marks then
    -- a delta's version: its removed entries leave, its inserted ones
    -- join, under the same stamp (see build_delta)
    parts.marks = nil
    for kind, d in pairs(marks) do
      local ids = self.index[kind].ids
      for e in pairs(d.removed) do
        e.seen = 0
      end
      for _, e in ipairs(d.added) do
        e.seen = parts.stamp
        ids[e.value.id] = e
      end
    end
  end
  compact(self.index.routes, parts.routes)
  compact(self.index.upstreams, parts.ups)
  compact(self.index.consumers, parts.cons)
end

return _M
