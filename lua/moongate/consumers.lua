-- The consumers of a config version, as policies see them (ctx.consumers):
-- by id, and by credential (key-auth looks up "key-auth"/"key"). Each
-- credential index is built on first use and kept for the config version,
-- so a lookup is one table access.

local ipairs = ipairs
local type = type
local setmetatable = setmetatable

local _M = {}
local mt = { __index = _M }

function _M.new(list)
  local by_id = {}
  for _, c in ipairs(list or {}) do
    by_id[c.id] = c
  end
  return setmetatable({ list = list or {}, by_id = by_id, idx = {} }, mt)
end

function _M:get(id)
  return self.by_id[id]
end

-- The consumer whose credentials[policy][field] equals value (a field may
-- also hold a list of values, e.g. several keys of one consumer).
function _M:find(policy, field, value)
  -- by policy, then field: no key string made per lookup
  local by_field = self.idx[policy]
  if not by_field then
    by_field = {}
    self.idx[policy] = by_field
  end
  local idx = by_field[field]
  if not idx then
    idx = {}
    for _, c in ipairs(self.list) do
      local cred = c.credentials and c.credentials[policy]
      local v = cred and cred[field]
      if type(v) == "table" then
        for _, one in ipairs(v) do
          idx[one] = c
        end
      elseif v ~= nil then
        idx[v] = c
      end
    end
    by_field[field] = idx
  end
  return idx[value]
end

return _M
