-- The config as the control process hands it to the workers (issue 5):
-- numbered versions of one document,
--
--   doc = { version = N,
--           node = <the node config's text>,
--           skeleton = <routes.json less its split arrays, as json_split
--                       cuts it: global_policies and any other member>,
--           elements = { upstreams = {texts}, routes = {texts},
--                        consumers = {texts} },
--           policies = nil | { name = <Lua source> } }
--
-- policies: the sandboxed policies of an etcd source
-- (<prefix>/policies/<name>, each accepted by sandbox.load in the control
-- process); a worker's builder loads them by name (set_policy_sources).
-- nil in file mode.
--
-- each entity as the exact text it had in its source, in the source's
-- order (file order in file mode), so that a worker's builder reuses what
-- it compiled for every text it has seen (config_version.lua).
--
-- Frames (JSON, on the channel: runtime/src/channel.c):
--   control -> worker
--     snapshot: {version, reset = true, node, skeleton, elements, policies?}
--     delta:    {version, base, node?, skeleton?, policies? (the whole set),
--                splice = {kind = {at, del, ins = {texts}}}}
--               applies to the doc of version `base` only: elements
--               at .. at+del-1 of that kind are replaced by ins (one
--               contiguous change per kind: what a file edit makes; an
--               etcd source would send one delta per batch of events)
--   worker -> control
--     {hello = worker id} (sent by C on each connection), then
--     {applied = N} | {refused = N, error = "..."} | {resync = true}
--
-- Positional splices rather than set/del by id: the order of routes is
-- part of their meaning (the first listed wins a tie), a worker then
-- needs no ids to place an entity, and a one-route change is one small
-- frame whatever the number of routes.

local cjson = require("cjson.safe")
local json_split = require("moongate.json_split")

local type = type
local pairs = pairs
local next = next
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local io_open = io.open
local os_rename = os.rename
local os_remove = os.remove
local new_tab = require("table.new")

local _M = {}

local KINDS = { "upstreams", "routes", "consumers" }
local MAX_CHAIN = 16 -- deltas linked back from a doc (see apply)
local SPLIT = { upstreams = true, routes = true, consumers = true }
_M.KINDS = KINDS
_M.SPLIT = SPLIT

local json = cjson.new()
json.decode_invalid_numbers(false)
json.encode_invalid_numbers(false)

function _M.encode(frame)
  return json.encode(frame)
end

function _M.decode(text)
  local v = json.decode(text)
  if type(v) ~= "table" then
    return nil, "not a JSON object"
  end
  return v
end

-- A doc from a json_split doc (its element lists are shared, not copied:
-- neither side ever changes a list in place).
function _M.from_split(node_text, split)
  local elements = {}
  for _, kind in ipairs(KINDS) do
    elements[kind] = split.elements[kind] or {}
  end
  return { node = node_text, skeleton = split.skeleton, elements = elements }
end

-- routes.json's text for doc (json_split.join): the same JSON as the
-- source, the white space inside the arrays aside.
function _M.routes_text(doc)
  return json_split.join(doc.skeleton, doc.elements)
end

function _M.snapshot(doc)
  return { version = doc.version, reset = true, node = doc.node, skeleton = doc.skeleton,
           elements = doc.elements, policies = doc.policies }
end

-- The same sets of sandboxed policies (nil is the empty set). O(policies).
local function same_policies(a, b)
  if a == b then
    return true
  end
  a, b = a or {}, b or {}
  for name, text in pairs(a) do
    if b[name] ~= text then
      return false
    end
  end
  for name in pairs(b) do
    if a[name] == nil then
      return false
    end
  end
  return true
end
_M.same_policies = same_policies

-- The delta from old to new (new.version is the frame's); changed = false
-- when no text differs. O(elements): texts are interned strings, so each
-- comparison is a pointer comparison.
function _M.diff(old, new)
  local frame = { version = new.version, base = old.version }
  local changed = false
  if new.node ~= old.node then
    frame.node = new.node
    changed = true
  end
  if new.skeleton ~= old.skeleton then
    frame.skeleton = new.skeleton
    changed = true
  end
  if not same_policies(old.policies, new.policies) then
    -- the whole set: a few sources, changed rarely
    frame.policies = new.policies or {}
    changed = true
  end
  for _, kind in ipairs(KINDS) do
    local a, b = old.elements[kind] or {}, new.elements[kind] or {}
    if a ~= b then
      local na, nb = #a, #b
      local m = na < nb and na or nb
      local p = 0
      while p < m and a[p + 1] == b[p + 1] do
        p = p + 1
      end
      local s = 0
      while s < m - p and a[na - s] == b[nb - s] do
        s = s + 1
      end
      if not (p == na and p == nb) then
        local ins = new_tab(nb - p - s, 0)
        for i = p + 1, nb - s do
          ins[#ins + 1] = b[i]
        end
        frame.splice = frame.splice or {}
        frame.splice[kind] = { at = p + 1, del = na - p - s, ins = ins }
        changed = true
      end
    end
  end
  return frame, changed
end

-- a frame's policies: name -> text, strings only (nil: none)
local function policies_of(p)
  if type(p) ~= "table" then
    return nil
  end
  local out
  for name, text in pairs(p) do
    if type(name) == "string" and type(text) == "string" then
      out = out or {}
      out[name] = text
    end
  end
  return out
end

-- The doc after frame, from doc (nil before the first snapshot). Returns
-- the new doc, or nil and why: a delta whose base is not doc's version
-- (the caller asks for a snapshot). doc's elements are not changed; a
-- delta's doc has .delta = {base = doc, splice = {kind = {at, del, ins}}
-- (the splices checked, as numbers), prior = doc.delta, depth}.
function _M.apply(doc, frame)
  local version = tonumber(frame.version)
  if not version then
    return nil, "a frame without a version"
  end
  if frame.reset then
    local elements = {}
    local given = type(frame.elements) == "table" and frame.elements or {}
    for _, kind in ipairs(KINDS) do
      elements[kind] = type(given[kind]) == "table" and given[kind] or {}
    end
    if type(frame.node) ~= "string" or type(frame.skeleton) ~= "string" then
      return nil, "a snapshot without node or skeleton"
    end
    return { version = version, node = frame.node, skeleton = frame.skeleton,
             elements = elements, policies = policies_of(frame.policies) }
  end
  if not doc or tonumber(frame.base) ~= doc.version then
    return nil, "a delta for version " .. tostring(frame.base) .. ", not "
                .. tostring(doc and doc.version)
  end
  local out = { version = version, node = frame.node or doc.node,
                skeleton = frame.skeleton or doc.skeleton, elements = {}, policies = doc.policies }
  if frame.policies ~= nil then -- the whole new set ({}: none left)
    out.policies = policies_of(frame.policies)
  end
  local splice = type(frame.splice) == "table" and frame.splice or {}
  -- what changed, for the worker's builder (config_version.lua builds
  -- from the version in force and the splices since alone): linked to
  -- doc's own delta (prior), so that several frames taken at once still
  -- lead back to the version in force. The builder drops a version's link once it is in force; a
  -- chain longer than MAX_CHAIN is cut here, so a doc keeps at most that
  -- many versions before it alive.
  local prior = doc.delta
  local depth = prior and prior.depth + 1 or 1
  if depth > MAX_CHAIN then
    doc.delta, prior, depth = nil, nil, 1
  end
  local delta = { base = doc, splice = {}, prior = prior, depth = depth }
  out.delta = delta
  for _, kind in ipairs(KINDS) do
    local a = doc.elements[kind]
    local sp = splice[kind]
    if type(sp) == "table" then
      local at, del, ins = tonumber(sp.at), tonumber(sp.del), sp.ins
      if not (at and del and at >= 1 and del >= 0 and at + del - 1 <= #a) then
        return nil, "a splice out of range for " .. kind
      end
      ins = type(ins) == "table" and ins or {}
      delta.splice[kind] = { at = at, del = del, ins = ins }
      local b = new_tab(#a - del + #ins, 0)
      local n = 0
      for i = 1, at - 1 do
        n = n + 1
        b[n] = a[i]
      end
      for i = 1, #ins do
        n = n + 1
        b[n] = ins[i]
      end
      for i = at + del, #a do
        n = n + 1
        b[n] = a[i]
      end
      a = b
    end
    out.elements[kind] = a
  end
  return out
end

-- "routes +1 ~1 -0, node" for the log: counts of the entities a frame
-- adds, replaces and removes (a splice's first min(del, #ins) are counted
-- as replaced).
function _M.summary(frame)
  local parts = {}
  if frame.node then
    parts[#parts + 1] = "node config"
  end
  if frame.skeleton then
    parts[#parts + 1] = "global_policies"
  end
  if frame.policies then
    parts[#parts + 1] = "policies"
  end
  for _, kind in ipairs(KINDS) do
    local sp = frame.splice and frame.splice[kind]
    if sp then
      local ins = #sp.ins
      local replaced = ins < sp.del and ins or sp.del
      parts[#parts + 1] = ("%s +%d ~%d -%d"):format(kind, ins - replaced, replaced,
                                                     sp.del - replaced)
    end
  end
  return #parts > 0 and table.concat(parts, ", ") or "no entity changed"
end

-- ---- last-known-good copy ----------------------------------------------------

-- Writes doc to path atomically (a temporary file renamed over it):
-- {"version": N, "node": <moongate.json>, "routes": <routes.json>}, the
-- two documents inline as they were written (no re-encoding: escaping a
-- string of 786 KiB cost 4 ms a version at 5,000 routes; this costs the
-- join and the write, ~1 ms); plus "policies": {name: "<Lua source>"} when
-- the doc has sandboxed policies (etcd). Returns true, or nil and why.
function _M.lkg_write(path, doc)
  local routes, err = _M.routes_text(doc)
  if not routes then
    return nil, err
  end
  local tmp = path .. ".tmp"
  local f
  f, err = io_open(tmp, "wb")
  if not f then
    return nil, err
  end
  local ok
  local policies = doc.policies and next(doc.policies)
                   and ',\n"policies":' .. json.encode(doc.policies) or ""
  ok, err = f:write('{"version":', tostring(doc.version), ',\n"node":', doc.node, ',\n"routes":',
                    routes, policies, "}\n")
  f:close()
  if ok then
    ok, err = os_rename(tmp, path)
  end
  if not ok then
    os_remove(tmp)
    return nil, err
  end
  return true
end

-- The doc a last-known-good copy holds, or nil and why (nil, nil: there
-- is no such file). The etcd source starts from it when etcd cannot be
-- reached.
function _M.lkg_read(path)
  local f = io_open(path, "rb")
  if not f then
    return nil, nil
  end
  local text = f:read("*a")
  f:close()
  -- the members' texts as written (json_split), once the whole is known
  -- to be JSON (a copy cut short by a crash is not)
  local v = json.decode(text)
  local top = type(v) == "table" and json_split.split(text, {})
  local m = top and top.members
  if not (m and type(v.version) == "number" and type(v.node) == "table"
          and type(v.routes) == "table" and m.node and m.routes) then
    return nil, path .. ": not a last-known-good copy"
  end
  local split, err = json_split.split(m.routes, SPLIT)
  if not split then
    return nil, path .. ": routes: " .. tostring(err)
  end
  local doc = _M.from_split(m.node, split)
  doc.version = v.version
  doc.policies = policies_of(v.policies)
  return doc
end

-- The same node config text but for the white space around it (a copy's
-- node text is the file's less its trailing newline).
function _M.same_text(a, b)
  return a == b or (a and b and a:match("^%s*(.-)%s*$") == b:match("^%s*(.-)%s*$")) or false
end

return _M
