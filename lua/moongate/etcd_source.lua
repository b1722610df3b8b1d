-- The etcd config source's Lua side (issue 5), in the control process: it
-- reads what the C driver (runtime/src/etcd.c) hands it -- the body of a
-- /v3/kv/range, pieces of the endless /v3/watch stream -- keeps the
-- entities accepted so far, and checks every new value before it is
-- accepted:
--
--   local src = etcd_source.new{ prefix = "/moongate", lua_path = {dirs},
--                                sandbox = {max_instructions =, policies_dir =},
--                                log = function(level, msg) end }
--   src.key_b64, src.end_b64        -- the range [prefix/, prefix0) for the driver
--   local rev, changed = src:range(body)   -- everything, at one revision
--   local rev, changed = src:watch(piece)  -- rev: highest revision applied
--                                          -- (nil: none in this piece);
--                                          -- "rerange": compacted, read again
--   src:doc()  -- {elements = {upstreams, routes, consumers = {texts}},
--              --  skeleton = '{"global_policies":[...]}', policies = {name = text}}
--
-- Keys: <prefix>/<kind>/<id>, kind one of upstreams, routes, consumers,
-- global_policies (each a JSON object: an entity of routes.json; for
-- global_policies, one {name, conf} entry keyed by its policy name) and
-- policies/<name> (Lua source, loaded in moongate.sandbox). Entities are
-- listed in key order (etcd's byte order), which is also the order of
-- routes that tie. A value without "id" (a global policy without "name")
-- gets the key's (it is written into the text); one whose id differs from
-- its key is refused. certificates, other kinds and malformed keys are
-- logged once per key and ignored.
--
-- Checks, per key (a value written by another tool is refused with a log
-- naming the key and the error, and the previous value of that key stays):
-- config_check.entity / policy_source, the Admin API's own check, so both
-- refuse the same value with the same error at the same path
-- ("etcd: <key>: refused: routes.r1.paths[0]: ..."): the entity's schema
-- and its references -- a route's upstream and policies, a global
-- policy's -- against what is accepted; a DELETE of an
-- upstream or policy still named by a route is refused the same way. A
-- batch (the events of one piece of the stream, or a whole range) is
-- collapsed to the last event per key, then applied by dependency:
-- policies, upstreams and consumers written; then routes and global
-- policies; then upstreams, consumers and policies deleted. So an upstream
-- and the route naming it, written together, are both accepted, whatever
-- their order. A value refused only for a missing reference (an unknown
-- upstream or policy), and a refused DELETE (the key is gone from etcd),
-- are tried again when a later batch changes anything.
--
-- A re-read (range) is a batch too: a PUT for each key whose text is not
-- the one last seen, a DELETE for each key that is gone. So an invalid
-- value met on a re-read does not drop the previous valid one either.
--
-- Costs: decoding base64 goes through OpenSSL (mg_base64_decode) into one
-- buffer reused; a range of N keys is one cjson decode of the body plus N
-- small decodes and N validations (config.check_routes on that entity and
-- the upstream it names: O(entity)). doc() builds the lists: O(N).

local ffi = require("ffi")
local cjson = require("cjson.safe")
local binding = require("moongate.ffi")
local config = require("moongate.config")
local config_check = require("moongate.config_check")
local etcd_kv = require("moongate.etcd_kv")

local C = binding.C
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local find = string.find
local sub = string.sub
local format = string.format
local concat = table.concat
local insert = table.insert
local remove = table.remove
local ffi_string = ffi.string
local ffi_cast = ffi.cast
local byte = string.byte
local char_ptr = ffi.typeof("const char *")

local _M = {}
local mt = { __index = _M }

local KINDS = { upstreams = true, routes = true, consumers = true, global_policies = true,
                policies = true }
local LISTED = { "upstreams", "routes", "consumers" } -- doc().elements

local json = cjson.new()
json.decode_invalid_numbers(false)
json.decode_max_depth(62) -- as config_version's per-entity decoder
local json_top = cjson.new() -- a range body nests entities one level deeper... as strings
json_top.decode_invalid_numbers(false)

-- ---- base64 ----------------------------------------------------------------------

-- encoding: for the prefix only (once), etcd_kv's (the Admin API's writes)
local b64_encode = etcd_kv.b64
_M.b64_encode = b64_encode

local b64_cap = 65536
local b64_buf = ffi.new("unsigned char[?]", b64_cap)
local b64_len = ffi.new("size_t[1]")

-- the n bytes of base64 at p (a string, or a pointer into one) decoded;
-- nil when they are not base64
local function b64_decode_at(p, n)
  if n == 0 then
    return ""
  end
  local need = n / 4 * 3 + 3
  if need > b64_cap then
    while b64_cap < need do
      b64_cap = b64_cap * 2
    end
    b64_buf = ffi.new("unsigned char[?]", b64_cap)
  end
  if C.mg_base64_decode(p, n, b64_buf, b64_len) ~= 0 then
    return nil
  end
  return ffi_string(b64_buf, b64_len[0])
end

-- nil when s is not base64
local function b64_decode(s)
  return b64_decode_at(s, #s)
end
_M.b64_decode = b64_decode

-- ---- the source --------------------------------------------------------------------

local function new_kind()
  return { ids = {}, text = {} } -- ids: sorted list; text: id -> accepted text
end

-- opts: prefix (no trailing "/"), lua_path (dirs), sandbox ({max_instructions,
-- policies_dir}), log(level, msg) (default: moongate's log).
function _M.new(opts)
  local prefix = opts.prefix or "/moongate"
  local key = prefix .. "/"
  local range_end = etcd_kv.prefix_end(key)
  local log = opts.log
  if not log then
    local mg = require("moongate")
    log = function(level, msg)
      mg.log[level](msg)
    end
  end
  local sb = opts.sandbox or {}
  return setmetatable({
    prefix = prefix,
    key = key,
    key_b64 = b64_encode(key),
    end_b64 = b64_encode(range_end),
    lua_path = opts.lua_path or {},
    sandboxed = { dir = sb.policies_dir, max_instructions = sb.max_instructions },
    log = log,
    kinds = { upstreams = new_kind(), routes = new_kind(), consumers = new_kind(),
              global_policies = new_kind(), policies = new_kind() },
    seen = {},      -- key -> the last value text met (accepted or not)
    pending = {},   -- key -> value refused for a missing reference (tried again)
    warned = {},    -- key -> true: an ignored key, logged once
    route_refs = {},  -- route id -> {upstream =, policies = {names}}
    global_refs = {}, -- global_policies id -> policy name
    revision = 0,
    stream = "",     -- the watch stream's unfinished line
  }, mt)
end

-- key -> kind, id; nil and why for a key not ours
local function parse_key(self, key)
  if sub(key, 1, #self.key) ~= self.key then
    return nil, "outside the prefix"
  end
  local rest = sub(key, #self.key + 1)
  local kind, id = rest:match("^([^/]+)/(.+)$")
  if not kind then
    return nil, "not <prefix>/<kind>/<id>"
  end
  if kind == "certificates" then
    return nil, "certificates are not supported by this build yet"
  end
  if not KINDS[kind] then
    return nil, "unknown kind " .. format("%q", kind)
  end
  if find(id, "/", 1, true) then
    return nil, "an id with '/'"
  end
  return kind, id
end

-- where id is in the sorted list: true and its index, or false and where
-- it would go. O(log n).
local function bsearch(list, id)
  local lo, hi = 1, #list
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    local v = list[mid]
    if v == id then
      return true, mid
    elseif v < id then
      lo = mid + 1
    else
      hi = mid - 1
    end
  end
  return false, lo
end

local function sorted_insert(list, id)
  local found, at = bsearch(list, id)
  if not found then
    insert(list, at, id)
  end
end

local function sorted_remove(list, id)
  local found, at = bsearch(list, id)
  if found then
    remove(list, at)
  end
end

local function set(self, kind, id, text)
  local k = self.kinds[kind]
  if k.text[id] == nil then
    sorted_insert(k.ids, id)
  end
  k.text[id] = text
end

local function unset(self, kind, id)
  local k = self.kinds[kind]
  if k.text[id] ~= nil then
    sorted_remove(k.ids, id)
    k.text[id] = nil
  end
end

-- the policy loader of a batch: files first, then the accepted sandboxed texts
local function loader(self)
  if not self.batch_loader then
    local sb = self.sandboxed
    self.batch_loader = config.policy_loader(self.lua_path, {
      sources = self.kinds.policies.text, dir = sb.dir, max_instructions = sb.max_instructions,
    })
  end
  return self.batch_loader
end

local function missing_reference(msg)
  return find(msg, "unknown upstream", 1, true) or find(msg, "unknown policy", 1, true)
end

local function policy_names(list)
  local names = {}
  if type(list) == "table" then
    for _, p in ipairs(list) do
      if type(p) == "table" and type(p.name) == "string" then
        names[#names + 1] = p.name
      end
    end
  end
  return names
end

-- who still names upstream / policy `id`: {{kind =, id =}}, sorted
local function users(self, kind, id)
  local out = {}
  if kind == "upstreams" then
    for rid, refs in pairs(self.route_refs) do
      if refs.upstream == id then
        out[#out + 1] = { kind = "routes", id = rid }
      end
    end
  elseif kind == "policies" then
    for rid, refs in pairs(self.route_refs) do
      for _, name in ipairs(refs.policies) do
        if name == id then
          out[#out + 1] = { kind = "routes", id = rid }
          break
        end
      end
    end
    for gid, name in pairs(self.global_refs) do
      if name == id then
        out[#out + 1] = { kind = "global_policies", id = gid }
      end
    end
  end
  table.sort(out, function(a, b)
    return a.kind < b.kind or (a.kind == b.kind and a.id < b.id)
  end)
  return out
end

-- What config_check needs to check a value against what is accepted (the
-- check the Admin API runs on a PUT).
local function check_ctx(self)
  local sb = self.sandboxed
  return {
    upstream = function(uid) return self.kinds.upstreams.text[uid] end,
    policy_loader = loader(self),
    lua_path = self.lua_path,
    policies_dir = sb.dir,
    max_instructions = sb.max_instructions,
    sources = self.kinds.policies.text,
    users = function(name)
      local out = users(self, "policies", name)
      for _, u in ipairs(out) do
        u.text = self.kinds[u.kind].text[u.id]
      end
      return out
    end,
  }
end

-- Many routes at once (a range, a big batch): one config.check_routes call
-- over them and the upstreams they name, errors sorted back by index (at
-- 10,000 routes: half the cost of one call per route, which checks the
-- upstream each time); per route, what config_check.entity finds. nil:
-- check them one by one (few routes, or an error that is about no one
-- route). Else key -> {ok = true, value, text}, or config_check's errors:
-- put() takes the value from here instead of decoding the text again (a
-- decode is ~5 us a route).
local function precheck_routes(self, entries)
  if #entries < 16 then
    return nil
  end
  local list, keys, ids, named, ups = {}, {}, {}, {}, {}
  local accepted = self.kinds.upstreams.text
  local out = {}
  for _, e in ipairs(entries) do
    local value, text = config_check.parse("routes", e[3], e[4])
    if not value then
      out[e[1]] = text -- the errors
    else
      list[#list + 1] = value
      keys[#keys + 1] = e[1]
      ids[#ids + 1] = e[3]
      out[e[1]] = { ok = true, value, text }
      local u = value.upstream
      if type(u) == "string" and not named[u] and accepted[u] then
        named[u] = true
        ups[#ups + 1] = json.decode(accepted[u])
      end
    end
  end
  local _, errs = config.check_routes({ upstreams = ups, routes = list },
                                      { policy_loader = loader(self) })
  for _, msg in ipairs(errs or {}) do
    local i = msg:match("^routes%[(%d+)%]")
    local n = i and tonumber(i) + 1
    local key = n and keys[n]
    if not key then
      return nil
    end
    local e = config_check.named_errors({ msg }, "routes[" .. i .. "]", "routes." .. ids[n])[1]
    if out[key].ok then
      out[key] = { e }
    else
      out[key][#out[key] + 1] = e
    end
  end
  return out
end

local function refuse(self, key, msg, text)
  local kind, id = parse_key(self, key)
  local before = kind and self.kinds[kind].text[id] ~= nil
  self.log("err", format("etcd: %s: refused: %s; %s", key, msg,
                         before and "the previous value stays"
                         or "the key is ignored until it is valid"))
  if text and missing_reference(msg) then
    self.pending[key] = text
  end
end

-- One PUT: true when accepted.
local function put(self, key, kind, id, text)
  self.pending[key] = nil
  if kind == "policies" then
    if self.kinds.policies.text[id] == text then
      return false
    end
    local errs = config_check.policy_source(id, text, check_ctx(self))
    if errs then
      refuse(self, key, config_check.error_text(errs))
      return false
    end
    set(self, kind, id, text)
    self.batch_loader = nil -- a new text: modules loaded again
    return true
  end
  if self.kinds[kind].text[id] == text then
    return false -- the accepted text again
  end
  local pre -- nil: not prechecked
  if kind == "routes" and self.prechecked then
    pre = self.prechecked[key]
  end
  local value, checked
  if pre == nil then
    value, checked = config_check.entity(kind, id, text, check_ctx(self))
  elseif pre.ok then
    value, checked = pre[1], pre[2]
  else
    checked = pre -- the errors
  end
  if not value then
    refuse(self, key, config_check.error_text(checked), text)
    return false
  end
  text = checked -- with its id, when the value had none
  if self.kinds[kind].text[id] == text then
    return false
  end
  set(self, kind, id, text)
  if kind == "routes" then
    self.route_refs[id] = { upstream = type(value.upstream) == "string" and value.upstream or nil,
                            policies = policy_names(value.policies) }
  elseif kind == "global_policies" then
    self.global_refs[id] = type(value.name) == "string" and value.name or nil
  end
  return true
end

-- One DELETE: true when something was removed.
local function delete(self, key, kind, id)
  self.pending[key] = nil
  if self.kinds[kind].text[id] == nil then
    return false
  end
  local by = {}
  for i, u in ipairs(users(self, kind, id)) do
    by[i] = u.kind .. "/" .. u.id
  end
  if #by > 0 then
    if kind == "policies" and self.kinds.policies.text[id] and config.policy_file(self.lua_path, id) then
      by = {} -- a policy file of that name serves them: the sandboxed text was shadowed anyway
    end
  end
  if #by > 0 then
    self.log("err", format("etcd: %s: delete refused: still used by %s%s; the value stays "
                           .. "until they no longer name it", key,
                           concat(by, ", ", 1, math.min(#by, 5)), #by > 5 and ", ..." or ""))
    self.pending[key] = false -- gone from etcd: goes here once unused
    return false
  end
  unset(self, kind, id)
  if kind == "routes" then
    self.route_refs[id] = nil
  elseif kind == "global_policies" then
    self.global_refs[id] = nil
  elseif kind == "policies" then
    self.batch_loader = nil
  end
  return true
end

local PUT_FIRST = { policies = 1, upstreams = 2, consumers = 2, routes = 3, global_policies = 3 }
local DELETE_AT = { routes = 3, global_policies = 3, consumers = 4, upstreams = 4, policies = 5 }

-- batch: {key = text | false (deleted)}; order: keys in first-seen order.
-- Returns true when an accepted value changed.
local function apply(self, batch, order)
  local changed = false
  self.batch_loader = nil
  local steps = { {}, {}, {}, {}, {} }
  for _, key in ipairs(order) do
    local text = batch[key]
    local kind, id = parse_key(self, key)
    if not kind then
      if not self.warned[key] then
        self.warned[key] = true
        self.log("warn", format("etcd: %s: ignored (%s)", key, id))
      end
    else
      local step = text and PUT_FIRST[kind] or DELETE_AT[kind]
      local s = steps[step]
      s[#s + 1] = { key, kind, id, text }
    end
  end
  for n, s in ipairs(steps) do
    if n == 3 then
      local routes = {}
      for _, e in ipairs(s) do
        if e[2] == "routes" and e[4] then
          routes[#routes + 1] = e
        end
      end
      self.prechecked = precheck_routes(self, routes)
    end
    for _, e in ipairs(s) do
      local ok
      if e[4] then
        ok = put(self, e[1], e[2], e[3], e[4])
      else
        ok = delete(self, e[1], e[2], e[3])
      end
      changed = changed or ok
    end
  end
  self.prechecked = nil
  -- values refused for a reference that may exist now
  if changed and next(self.pending) then
    local again, again_order = {}, {}
    for key, text in pairs(self.pending) do
      again[key] = text
      again_order[#again_order + 1] = key
    end
    table.sort(again_order)
    self.pending = {}
    local quiet = self.log
    self.log = function() end -- they were logged when first refused
    local any = false
    for _, key in ipairs(again_order) do
      local kind, id = parse_key(self, key)
      if again[key] == false then
        if delete(self, key, kind, id) then
          any = true
          quiet("info", format("etcd: %s: deleted now that nothing names it", key))
        end
      elseif put(self, key, kind, id, again[key]) then
        any = true
        quiet("info", format("etcd: %s: accepted now that what it names exists", key))
      end
    end
    self.log = quiet
    changed = changed or any
  end
  self.batch_loader = nil
  return changed
end

-- ---- range and watch -----------------------------------------------------------------

-- A range body in the form etcd's JSON gateway writes it, read without
-- decoding it into tables: {"header":{...,"revision":"N",...},
-- "kvs":[{"key":"<base64>",...,"value":"<base64>"},...],...} with each kv a
-- flat object of strings (base64 and decimal digits: no brace, quote or
-- backslash anywhere in the body), the base64 decoded straight from it. At 10,000
-- routes (3 MB): ~10 ms against ~40 ms for cjson's tables and their
-- base64 strings. Returns the revision (a string of digits), the keys and
-- the values (decoded; a kv whose key or value is not base64 is left out,
-- as the tables' path does), or nil for a body in any other form (the
-- caller decodes it with cjson then).
local KV_OPEN, KV_SEP, KV_END = byte("{"), byte(","), byte("]")

local function scan_range(body)
  local _, he, rev = find(body, '^{"header":{[^{}]*"revision":"(%d+)"[^{}]*}')
  if not rev then
    return nil
  end
  if find(body, "\\", 1, true) then
    return nil -- an escape somewhere: not only base64 and digits
  end
  local keys, values, n = {}, {}, 0
  local pos = he + 1
  if sub(body, pos, pos + 7) == ',"kvs":[' then
    local base = ffi_cast(char_ptr, body)
    pos = pos + 8
    while true do
      if byte(body, pos) ~= KV_OPEN then
        return nil
      end
      -- the kv ends at the first '}', with no '{' before it (plain finds:
      -- LuaJIT compiles them, not pattern ones, and this loop runs once
      -- a key)
      local close = find(body, "}", pos + 1, true)
      local nested = find(body, "{", pos + 1, true)
      if not close or (nested and nested < close) then
        return nil
      end
      local _, ke = find(body, '"key":"', pos, true)
      local kend = ke and find(body, '"', ke + 1, true)
      if not (kend and kend < close) then
        return nil
      end
      local _, ve = find(body, '"value":"', pos, true)
      local vend = ve and ve < close and find(body, '"', ve + 1, true)
      local key = b64_decode_at(base + ke, kend - ke - 1)
      local text
      if vend then
        text = b64_decode_at(base + ve, vend - ve - 1)
      else
        text = "" -- an empty value has no member
      end
      if key and text then
        n = n + 1
        keys[n], values[n] = key, text
      end
      local c = byte(body, close + 1)
      pos = close + 2
      if c == KV_END then
        break
      elseif c ~= KV_SEP then
        return nil
      end
    end
  end
  -- the rest: members of plain values ("more":false,"count":"N"), the end
  if not find(body, "^[^{}%[%]]*}%s*$", pos) then
    return nil
  end
  return rev, keys, values
end
_M.scan_range = scan_range

-- The kvs of a range body through cjson (any JSON form): as scan_range,
-- or nil and why.
local function decode_range(body)
  local r = json_top.decode(body)
  if type(r) ~= "table" or type(r.header) ~= "table" then
    return nil, "not a range answer"
  end
  local rev = tonumber(r.header.revision)
  if not rev then
    return nil, "a range answer without a revision"
  end
  local keys, values, n = {}, {}, 0
  for _, kv in ipairs(type(r.kvs) == "table" and r.kvs or {}) do
    local key = type(kv.key) == "string" and b64_decode(kv.key)
    local text = type(kv.value) == "string" and b64_decode(kv.value) or (kv.value == nil and "")
    if key and text then
      n = n + 1
      keys[n], values[n] = key, text
    end
  end
  return rev, keys, values
end

-- The whole /v3/kv/range body: everything under the prefix at one revision.
-- Returns the revision and whether the accepted set changed, or nil and why.
function _M:range(body)
  local rev, keys, values = scan_range(body)
  if rev then
    rev = tonumber(rev)
  else
    rev, keys, values = decode_range(body)
    if not rev then
      return nil, keys
    end
  end
  local batch, order, present = {}, {}, {}
  local seen = self.seen
  for i = 1, #keys do
    local key, text = keys[i], values[i]
    present[key] = true
    if seen[key] ~= text then
      seen[key] = text
      batch[key] = text
      order[#order + 1] = key
    end
  end
  -- what is gone since the last read
  for key in pairs(seen) do
    if not present[key] then
      seen[key] = nil
      batch[key] = false
      order[#order + 1] = key
    end
  end
  self.stream = ""
  local changed = apply(self, batch, order)
  self.revision = rev
  return rev, changed
end

-- A piece of the watch stream (newline-separated JSON messages, cut
-- anywhere). Returns the highest revision applied (nil when the piece
-- ended no event) and whether the accepted set changed; "rerange" when
-- etcd cancelled the watch (history compacted): the caller reads
-- everything again; nil, nil, why on an error message.
function _M:watch(piece)
  local buf = self.stream .. piece
  local batch, order = {}, {}
  local rev
  local from = 1
  while true do
    local nl = find(buf, "\n", from, true)
    if not nl then
      break
    end
    local line = sub(buf, from, nl - 1)
    from = nl + 1
    if find(line, "%S") then
      local m = json_top.decode(line)
      local res = type(m) == "table" and m.result
      if type(res) ~= "table" then
        self.stream = ""
        local e = type(m) == "table" and m.error
        return nil, nil, "watch: " .. (type(e) == "table" and tostring(e.message) or "a bad message")
      end
      if res.canceled or res.compact_revision then
        self.stream = ""
        return "rerange"
      end
      for _, ev in ipairs(type(res.events) == "table" and res.events or {}) do
        local kv = ev.kv
        local key = type(kv) == "table" and type(kv.key) == "string" and b64_decode(kv.key)
        if key then
          local text = false
          if ev.type ~= "DELETE" then
            text = type(kv.value) == "string" and b64_decode(kv.value) or ""
          end
          if batch[key] == nil then
            order[#order + 1] = key
          end
          batch[key] = text
          self.seen[key] = text or nil
          local mr = tonumber(kv.mod_revision)
          if mr and (not rev or mr > rev) then
            rev = mr
          end
        end
      end
    end
  end
  self.stream = sub(buf, from)
  if not rev then
    return nil, false
  end
  local changed = apply(self, batch, order)
  self.revision = rev
  return rev, changed
end

-- The accepted config as the control process hands it out.
function _M:doc()
  local elements = {}
  for _, kind in ipairs(LISTED) do
    local k = self.kinds[kind]
    local list = {}
    for i, id in ipairs(k.ids) do
      list[i] = k.text[id]
    end
    elements[kind] = list
  end
  local g = self.kinds.global_policies
  local gl = {}
  for i, id in ipairs(g.ids) do
    gl[i] = g.text[id]
  end
  local policies = {}
  for name, text in pairs(self.kinds.policies.text) do
    policies[name] = text
  end
  return { elements = elements, skeleton = '{"global_policies":[' .. concat(gl, ",") .. "]}",
           policies = policies, revision = self.revision }
end

return _M
