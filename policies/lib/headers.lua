-- Header edits shared by request-headers, response-headers and
-- static-response: the schema pieces for header names and values, values
-- with $variables compiled once (in a policy's init), and the per-request
-- rendering. Not a policy (no policies/lib.lua or lib/init.lua): the
-- policies load it with dofile from the shipped policies folder.
--
-- Variables: $remote_addr, $request_id, $consumer (ctx.consumer's id, ""
-- without one), $route (the route id); ${name} where letters follow.
-- A "$" not followed by a name or "{" is a literal "$".

local type = type
local tostring = tostring
local pairs = pairs
local ipairs = ipairs
local find = string.find
local sub = string.sub
local lower = string.lower
local sort = table.sort
local concat = table.concat

local _M = {}

local VARS = {
  remote_addr = function(ctx) return ctx.req.remote_addr end,
  request_id = function(ctx) return ctx.request_id end,
  consumer = function(ctx)
    local c = ctx.consumer
    if type(c) == "table" then
      return c.id or ""
    end
    return c or ""
  end,
  route = function(ctx) return ctx.route and ctx.route.id or "" end,
}

-- Headers the gateway frames or owns per hop: a policy cannot set them
-- (the runtime refuses them or drops the edit), so a conf naming them is
-- refused when it is loaded rather than failing (or doing nothing) per request.
local MANAGED = {
  ["content-length"] = true, ["transfer-encoding"] = true, connection = true,
  ["keep-alive"] = true, te = true, trailer = true, upgrade = true,
  ["proxy-connection"] = true, ["proxy-authenticate"] = true, ["proxy-authorization"] = true,
}
-- appended to by the gateway on the way upstream (README, Proxying): an
-- edit that sets them is ignored, removing them drops the client's chain
local FORWARDING = {
  ["x-forwarded-for"] = true, ["x-forwarded-proto"] = true, ["x-forwarded-host"] = true,
}

-- A field name is a token (RFC 9110 5.1).
local TOKEN = "^[%w!#%$%%&'%*%+%-%.%^_`|~]+$"

-- check of one header name; side "request" or "response", edit "set",
-- "add" or "remove"
function _M.check_name(name, side, edit)
  if type(name) ~= "string" or not find(name, TOKEN) then
    return false, "invalid header name \"" .. tostring(name) .. "\""
  end
  local l = lower(name)
  if MANAGED[l] then
    return false, name .. " is set by the gateway"
  end
  if side == "request" and edit ~= "remove" and FORWARDING[l] then
    return false, name .. " is appended to by the gateway (remove it to drop the client's)"
  end
  return true
end

-- Parses a value into a list of literal strings and variable functions.
-- Returns parts (nil when the value has no variable), or nil, err.
local function parse(value)
  if not find(value, "$", 1, true) then
    return nil
  end
  local parts, n, pos, len = {}, 0, 1, #value
  local lit = {}
  while pos <= len do
    local s = find(value, "$", pos, true)
    if not s then
      lit[#lit + 1] = sub(value, pos)
      break
    end
    lit[#lit + 1] = sub(value, pos, s - 1)
    local name, e = nil, nil
    local _, e1, braced = find(value, "^{([%a_][%w_]*)}", s + 1)
    if braced then
      name, e = braced, e1
    else
      local _, e2, bare = find(value, "^([%a_][%w_]*)", s + 1)
      if bare then
        name, e = bare, e2
      end
    end
    if not name then
      lit[#lit + 1] = "$"
      pos = s + 1
    else
      local fn = VARS[name]
      if not fn then
        return nil, "unknown variable $" .. name
      end
      local text = concat(lit)
      if text ~= "" then
        n = n + 1
        parts[n] = text
      end
      lit = {}
      n = n + 1
      parts[n] = fn
      pos = e + 1
    end
  end
  local text = concat(lit)
  if text ~= "" then
    n = n + 1
    parts[n] = text
  end
  -- a "$" that starts no variable ("price: 5$") is just text
  for i = 1, n do
    if type(parts[i]) == "function" then
      return parts
    end
  end
  return nil
end

-- A header value: no CR, LF, NUL or other controls (tab aside), and only
-- known variables.
function _M.check_value(value)
  if find(value, "[%z\1-\8\10-\31\127]") then
    return false, "control characters are not allowed in header values"
  end
  local _, err = parse(value)
  if err then
    return false, err
  end
  return true
end

_M.value_def = { type = "string", minLength = 1, check = _M.check_value }

-- Checks the names of a {name = value} map (the values are checked by
-- value_def through additionalProperties).
function _M.check_map(map, side, edit)
  local seen = {}
  for name in pairs(map) do
    local ok, err = _M.check_name(name, side, edit)
    if not ok then
      return false, err
    end
    local l = lower(name)
    if seen[l] then
      return false, "header " .. name .. " is given twice (names are case-insensitive)"
    end
    seen[l] = true
  end
  return true
end

-- One compiled value: {name =, value = literal} or {name =, parts = {...}}.
local function compile_one(name, value)
  local parts = parse(value)
  if parts then
    return { name = name, parts = parts }
  end
  return { name = name, value = value }
end

-- {name = value | {values}} -> a list of compiled values, sorted by name
-- (so the edits come in a stable order).
function _M.compile_map(map)
  local names = {}
  for name in pairs(map or {}) do
    names[#names + 1] = name
  end
  sort(names)
  local list = {}
  for _, name in ipairs(names) do
    local v = map[name]
    if type(v) == "table" then
      for _, one in ipairs(v) do
        list[#list + 1] = compile_one(name, one)
      end
    else
      list[#list + 1] = compile_one(name, v)
    end
  end
  return list
end

-- render's scratch list, reused: nothing between filling and joining it
-- yields, so no other request can write into it meanwhile
local buf = {}

-- The value of a compiled entry for this request (rendered once).
function _M.render(entry, ctx)
  local v = entry.value
  if v then
    return v
  end
  local parts = entry.parts
  local n = #parts
  if n == 1 then
    return parts[1](ctx)
  end
  for i = 1, n do
    local p = parts[i]
    if type(p) == "function" then
      buf[i] = p(ctx)
    else
      buf[i] = p
    end
  end
  return concat(buf, "", 1, n)
end

-- The schema of an add/set/remove conf for `side` ("request"/"response").
function _M.edits_schema(side)
  local one_or_more = {
    oneOf = {
      _M.value_def,
      { type = "array", minItems = 1, items = _M.value_def },
    },
  }
  return {
    type = "object",
    additionalProperties = false,
    properties = {
      remove = {
        type = "array", default = {}, uniqueItems = true,
        items = { type = "string", check = function(name)
          return _M.check_name(name, side, "remove")
        end },
      },
      set = {
        type = "object", default = {}, additionalProperties = _M.value_def,
        check = function(map) return _M.check_map(map, side, "set") end,
      },
      add = {
        type = "object", default = {}, additionalProperties = one_or_more,
        check = function(map) return _M.check_map(map, side, "add") end,
      },
    },
  }
end

-- conf -> {remove = {names}, set = {entries}, add = {entries}}
function _M.compile_edits(conf)
  local remove = {}
  for i, name in ipairs(conf.remove or {}) do
    remove[i] = name
  end
  return { remove = remove, set = _M.compile_map(conf.set), add = _M.compile_map(conf.add) }
end

-- Applies compiled edits to target (ctx.req or ctx.resp): remove, then
-- set, then add. A value whose variables came out empty ($consumer
-- without a consumer) removes the header (set) or adds nothing (add), so
-- a header the client sent under that name never passes as ours.
function _M.apply(edits, target, ctx)
  local remove = edits.remove
  for i = 1, #remove do
    target:set_header(remove[i], nil)
  end
  local set = edits.set
  for i = 1, #set do
    local e = set[i]
    local v = _M.render(e, ctx)
    if v == "" then
      target:set_header(e.name, nil)
    else
      target:set_header(e.name, v)
    end
  end
  local add = edits.add
  for i = 1, #add do
    local e = add[i]
    local v = _M.render(e, ctx)
    if v ~= "" then
      target:add_header(e.name, v)
    end
  end
end

_M.parse = parse

return _M
