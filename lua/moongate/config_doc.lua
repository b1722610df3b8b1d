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
--     snapshot: {version, reset = true, node, skeleton, elements, policies?,
--                unchecked?}
--     delta:    {version, base, node?, skeleton?, policies? (the whole set),
--                splice = {kind = {{at, del, ins = {texts}}, ...}}, unchecked?}
--               unchecked = true: the control process did not validate
--               these entities (a last-known-good copy read from disk);
--               a worker validates them (and every doc it derives from
--               one: apply() keeps the mark) instead of trusting them
--               (config_version.lua, doc.checked)
--               applies to the doc of version `base` only: each hunk
--               replaces elements at .. at+del-1 of that kind (numbered
--               in the base doc) by ins; a kind's hunks are in ascending
--               order and do not overlap. Several hunks, not one splice
--               from the first change to the last: two edits far apart
--               (what a reload that coalesced two file writes sees) would
--               otherwise resend every route between them, a 1 MB frame
--               at 5,000 routes whose decode (4-14 ms, unsliced: one
--               cjson call) stalled the worker's requests.
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
-- neither side ever changes a list in place). The doc keeps the text that
-- was split (routes_source: the file's bytes) for lkg_write.
function _M.from_split(node_text, split)
  local elements = {}
  for _, kind in ipairs(KINDS) do
    elements[kind] = split.elements[kind] or {}
  end
  return { node = node_text, skeleton = split.skeleton, elements = elements,
           routes_source = split.text }
end

-- routes.json's text for doc (json_split.join): the same JSON as the
-- source, the white space inside the arrays aside.
function _M.routes_text(doc)
  return json_split.join(doc.skeleton, doc.elements)
end

function _M.snapshot(doc)
  return { version = doc.version, reset = true, node = doc.node, skeleton = doc.skeleton,
           elements = doc.elements, policies = doc.policies, unchecked = doc.unchecked or nil }
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

-- The hunks turning a[lo..ha] into b[lo..hb] ({at, del, ins} in a's
-- numbering, ascending), appended to hunks. Greedy and O(n) with two
-- count maps: equal texts are kept; a text of b that the rest of a does
-- not hold is inserted, a text of a that the rest of b does not hold is
-- deleted; else one look-ahead tells a lone insertion or deletion from a
-- replacement. Not minimal for reordered entities (a route moved far
-- replaces those in between), but exact: applying the hunks gives b.
local function hunks_of(a, b, lo, ha, hb, hunks)
  local left_a, left_b = {}, {}
  for i = lo, ha do
    local t = a[i]
    left_a[t] = (left_a[t] or 0) + 1
  end
  for j = lo, hb do
    local t = b[j]
    left_b[t] = (left_b[t] or 0) + 1
  end
  local i, j = lo, lo
  local h -- the hunk being grown
  while i <= ha or j <= hb do
    local x, y = a[i], b[j]
    if i <= ha and j <= hb and x == y then
      left_a[x] = left_a[x] - 1
      left_b[y] = left_b[y] - 1
      i, j = i + 1, j + 1
      h = nil
    else
      if not h then
        h = { at = i, del = 0, ins = {} }
        hunks[#hunks + 1] = h
      end
      local take_a, take_b
      if j > hb then
        take_a = true
      elseif i > ha then
        take_b = true
      elseif (left_a[y] or 0) == 0 then
        take_b = true
      elseif (left_b[x] or 0) == 0 then
        take_a = true
      elseif i < ha and a[i + 1] == y then
        take_a = true -- x alone was removed
      elseif j < hb and b[j + 1] == x then
        take_b = true -- y alone was added
      else
        take_a, take_b = true, true
      end
      if take_a then
        left_a[x] = left_a[x] - 1
        h.del = h.del + 1
        i = i + 1
      end
      if take_b then
        left_b[y] = left_b[y] - 1
        h.ins[#h.ins + 1] = y
        j = j + 1
      end
    end
  end
end

-- The hunks turning a[lo..ha] into b[lo..hb] when the changes are a few
-- short ones (what one-route edits, folded or not, make): a walk in step
-- that, at each difference, takes the first pair of positions at most
-- WINDOW entities on where the lists agree again. O(n) pointer
-- comparisons and no table but the hunks; nil when the lists do not
-- agree again within the window (or too many hunks): hunks_of decides.
local WINDOW, MAX_HUNKS = 8, 32
local function near_hunks(a, b, lo, ha, hb, hunks)
  local i, j = lo, lo
  while i <= ha or j <= hb do
    if i <= ha and j <= hb and a[i] == b[j] then
      i, j = i + 1, j + 1
    else
      -- the lists agree again at a[i+k], b[j+l] (k + l as small as may
      -- be), or both run out: the end of the range is where they agree
      local ri, rj
      if i > ha or j > hb then
        ri, rj = ha + 1, hb + 1 -- one list ran out: the rest of the other
      end
      for d = 1, ri and 0 or 2 * WINDOW do
        for k = 0, d do
          local x, y = i + k, j + d - k
          if x > ha + 1 or y > hb + 1 then -- luacheck: ignore 542
            -- past one end of the range
          elseif x == ha + 1 or y == hb + 1 then
            if x == ha + 1 and y == hb + 1 then
              ri, rj = x, y
              break
            end
          elseif a[x] == b[y] then
            ri, rj = x, y
            break
          end
        end
        if ri then
          break
        end
      end
      if not ri or #hunks >= MAX_HUNKS then
        return nil
      end
      local ins = new_tab(rj - j, 0)
      for y = j, rj - 1 do
        ins[#ins + 1] = b[y]
      end
      hunks[#hunks + 1] = { at = i, del = ri - i, ins = ins }
      i, j = ri, rj
    end
  end
  return hunks
end

-- The hunks ({at, del, ins}, ascending, in a's numbering) turning list a
-- into list b; {} when they hold the same texts. O(n): texts are interned
-- strings, so each comparison is a pointer comparison.
function _M.hunks(a, b)
  if a == b then
    return {}
  end
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
  if p == na and p == nb then
    return {}
  end
  local hunks = near_hunks(a, b, p + 1, na - s, nb - s, {})
  if not hunks then
    hunks = {}
    hunks_of(a, b, p + 1, na - s, nb - s, hunks)
  end
  return hunks
end

-- The delta from old to new (new.version is the frame's); changed = false
-- when no text differs. O(elements): texts are interned strings, so each
-- comparison is a pointer comparison.
function _M.diff(old, new)
  local frame = { version = new.version, base = old.version, unchecked = new.unchecked or nil }
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
    local hunks = _M.hunks(old.elements[kind] or {}, new.elements[kind] or {})
    if #hunks > 0 then
      frame.splice = frame.splice or {}
      frame.splice[kind] = hunks
      changed = true
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
-- (one splice covering the kind's hunks), hunks = {kind = {{at, del,
-- ins}, ...}} (the hunks checked, as numbers, adjacent ones merged: what
-- a worker builds from), prior = doc.delta, depth}.
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
             elements = elements, policies = policies_of(frame.policies),
             unchecked = frame.unchecked == true or nil }
  end
  if not doc or tonumber(frame.base) ~= doc.version then
    return nil, "a delta for version " .. tostring(frame.base) .. ", not "
                .. tostring(doc and doc.version)
  end
  local out = { version = version, node = frame.node or doc.node,
                skeleton = frame.skeleton or doc.skeleton, elements = {}, policies = doc.policies,
                unchecked = (doc.unchecked or frame.unchecked == true) or nil }
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
  local delta = { base = doc, splice = {}, hunks = {}, prior = prior, depth = depth }
  out.delta = delta
  for _, kind in ipairs(KINDS) do
    local a = doc.elements[kind]
    local hunks = splice[kind]
    if type(hunks) == "table" then
      local na = #a
      local size = na
      for _, h in ipairs(hunks) do
        size = size - (tonumber(type(h) == "table" and h.del) or 0)
                    + (type(h) == "table" and type(h.ins) == "table" and #h.ins or 0)
      end
      local b = new_tab(size > 0 and size or 0, 0)
      local n, from = 0, 1 -- next element of a to copy
      local first
      local list, last = {}, nil -- the hunks checked, adjacent ones merged
      for _, h in ipairs(hunks) do
        local at, del = tonumber(type(h) == "table" and h.at), tonumber(type(h) == "table" and h.del)
        if not (at and del and at >= from and del >= 0 and at + del - 1 <= na) then
          return nil, "a splice out of range or order for " .. kind
        end
        first = first or at
        for i = from, at - 1 do
          n = n + 1
          b[n] = a[i]
        end
        local ins = type(h.ins) == "table" and h.ins or {}
        if last and last.at + last.del == at then
          last.del = last.del + del
        else
          last = { at = at, del = del, ins = {} }
          list[#list + 1] = last
        end
        local lins = last.ins
        for i = 1, #ins do
          n = n + 1
          b[n] = ins[i]
          lins[#lins + 1] = ins[i]
        end
        from = at + del
      end
      if first then
        -- the builder's record is one splice covering the hunks (what
        -- config_version.lua builds from): a[first .. from-1] became
        -- b[first .. n]; a copy of references, O(range)
        local ins = new_tab(n - first + 1, 0)
        for i = first, n do
          ins[#ins + 1] = b[i]
        end
        delta.splice[kind] = { at = first, del = from - first, ins = ins }
        delta.hunks[kind] = list
      end
      for i = from, na do
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
-- adds, replaces and removes (a hunk's first min(del, #ins) are counted
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
    local hunks = frame.splice and frame.splice[kind]
    if hunks then
      local added, replaced, removed = 0, 0, 0
      for _, h in ipairs(hunks) do
        local ins = #h.ins
        local r = ins < h.del and ins or h.del
        added, replaced, removed = added + ins - r, replaced + r, removed + h.del - r
      end
      parts[#parts + 1] = ("%s +%d ~%d -%d"):format(kind, added, replaced, removed)
    end
  end
  return #parts > 0 and table.concat(parts, ", ") or "no entity changed"
end

-- ---- last-known-good copy ----------------------------------------------------

-- Writes doc to path atomically (a temporary file renamed over it):
-- {"version": N, "node": <moongate.json>, "routes": <routes.json>}, the
-- two documents inline as they were written (no re-encoding: escaping a
-- string of 786 KiB cost 4 ms a version at 5,000 routes). A doc split
-- from a file's text (from_split) writes that text as it is: the join
-- (routes_text) cost ~0.6 ms of the control's CPU per change at 5,000
-- routes; the write itself ~0.4 ms. Plus "policies": {name: "<Lua
-- source>"} when the doc has sandboxed policies (etcd). Returns true, or
-- nil and why.
function _M.lkg_write(path, doc)
  local routes = doc.routes_source
  if not routes then
    local err
    routes, err = _M.routes_text(doc)
    if not routes then
      return nil, err
    end
  end
  local tmp = path .. ".tmp"
  local f, err = io_open(tmp, "wb")
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
  doc.unchecked = true -- a file anyone may have edited: the workers validate it
  return doc
end

-- The same node config text but for the white space around it (a copy's
-- node text is the file's less its trailing newline).
function _M.same_text(a, b)
  return a == b or (a and b and a:match("^%s*(.-)%s*$") == b:match("^%s*(.-)%s*$")) or false
end

return _M
