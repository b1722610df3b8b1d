-- Declarative validator for JSON-decoded values (JSON-schema-like, the way
-- Kong and APISIX describe plugin configuration).
--
--   local schema = require("moongate.schema")
--   local v = schema.compile({ type = "object", properties = {...} })
--   local ok, errs = v:validate(value, "routes[0].policies[1].conf")
--   -- errs: { { path = "routes[0].policies[1].conf.rate", message = "must be >= 1" }, ... }
--   schema.format(errs)  -- { "routes[0].policies[1].conf.rate: must be >= 1", ... }
--
-- compile() does the work once (property lists, required sets, enum sets,
-- type tables); validate() walks the value and allocates only its state
-- table, its path stack and the errors it reports.
--
-- Keywords:
--   type                 "string", "number", "integer", "boolean", "array",
--                        "object", "null", or a list of these
--   properties, required, additionalProperties (false, true, or a schema)
--   default              a missing property is set to a deep copy of its
--                        default before it is validated (in place)
--   enum
--   minimum, maximum, exclusiveMinimum, exclusiveMaximum  (numbers)
--   minLength, maxLength (strings; counted in bytes)
--   pattern              a Lua pattern (string.find), NOT a regular
--                        expression, and unanchored: write "^...$" to match
--                        the whole string
--   items, minItems, maxItems, uniqueItems
--   oneOf, anyOf         lists of schemas
--   check                function(value, root) -> true | false, "message";
--                        runs only when the value and everything under it
--                        passed the structural keywords; root is the value
--                        given to validate()
--   description, title, examples, $comment    annotations, ignored
-- Any other key in a definition is an error at compile time (a typo such as
-- "requried" must not silently disable a check).
--
-- Values: cjson decodes [] and {} to the same empty table, so an empty table
-- is both a valid array and a valid object. A table whose keys are exactly
-- 1..n is an array; any other table is an object. cjson.null has type "null"
-- and is rejected unless `type` lists "null". A number is an "integer" when
-- it is finite and has no fractional part.
--
-- oneOf/anyOf try each branch without filling defaults, then validate the
-- chosen branch again, filling its defaults. When no branch matches and
-- exactly one branch accepts the value's type, that branch's errors are
-- reported (they say more than "does not match any allowed schema").

local cjson_null = require("cjson.safe").null

local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local pcall = pcall
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local floor = math.floor
local find = string.find
local gsub = string.gsub
local format = string.format
local concat = table.concat
local sort = table.sort


local _M = { _VERSION = "0.1.0" }


local TYPES = {
  string = true, number = true, integer = true, boolean = true,
  array = true, object = true, null = true,
}

-- value kinds each declared type accepts ("empty" is the empty table)
local ACCEPTS = {
  string = { "string" },
  number = { "number", "integer" },
  integer = { "integer" },
  boolean = { "boolean" },
  array = { "array", "empty" },
  object = { "object", "empty" },
  null = { "null" },
}

-- how a value kind is named in "expected X, got Y"
local KIND_NAMES = {
  integer = "number",
  empty = "empty array or object",
}

local KEYWORDS = {
  type = true, properties = true, required = true,
  additionalProperties = true, default = true, enum = true,
  minimum = true, maximum = true, exclusiveMinimum = true,
  exclusiveMaximum = true, minLength = true, maxLength = true,
  pattern = true, items = true, minItems = true, maxItems = true,
  uniqueItems = true, oneOf = true, anyOf = true, check = true,
  description = true, title = true, examples = true, ["$comment"] = true,
}


local validator_mt = {}
validator_mt.__index = validator_mt


-- helpers ------------------------------------------------------------------

local function kind_of(v)
  local t = type(v)
  if t == "table" then
    if next(v) == nil then
      return "empty"
    end
    local n = #v
    if n == 0 then
      return "object"
    end
    -- an array has exactly the keys 1..n: n distinct keys, all in 1..n
    local count = 0
    for k in pairs(v) do
      if type(k) ~= "number" or k < 1 or k > n or k ~= floor(k) then
        return "object"
      end
      count = count + 1
    end
    return count == n and "array" or "object"
  end

  if t == "number" then
    -- v - v ~= 0 for inf and nan
    if v == floor(v) and v - v == 0 then
      return "integer"
    end
    return "number"
  end

  if v == cjson_null then
    return "null"
  end

  return t
end


local function kind_name(kind)
  return KIND_NAMES[kind] or kind
end


local function deep_copy(v)
  if type(v) ~= "table" then
    return v
  end
  local c = {}
  for k, x in pairs(v) do
    c[k] = deep_copy(x)
  end
  return c
end


local function deep_equal(a, b)
  if a == b then
    return true
  end
  if type(a) ~= "table" or type(b) ~= "table" then
    return false
  end
  for k, x in pairs(a) do
    if not deep_equal(x, b[k]) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end


local function quote(s)
  return '"' .. gsub(s, '[\\"]', "\\%0") .. '"'
end


-- integers print without an exponent ("10485760", not "1.048576e+07")
local function num_str(n)
  if n == floor(n) and n > -2^53 and n < 2^53 then
    return format("%d", n)
  end
  return tostring(n)
end


local function plural(n, word)
  if n == 1 then
    return n .. " " .. word
  end
  return n .. " " .. word .. "s"
end


-- error paths --------------------------------------------------------------

-- The path of the value being validated is a stack of segments: numbers are
-- 0-based array indexes, strings are object keys. It is turned into a string
-- only when an error is reported.
local function format_path(st, extra)
  local buf = { st.prefix }
  local n = 1
  local depth = st.depth
  local path = st.path
  for i = 1, depth + (extra ~= nil and 1 or 0) do
    local seg = i <= depth and path[i] or extra
    n = n + 1
    if type(seg) == "number" then
      buf[n] = "[" .. seg .. "]"
    elseif find(seg, "^[%a_][%w_]*$") then
      buf[n] = n == 2 and buf[1] == "" and seg or "." .. seg
    else
      buf[n] = "[" .. quote(seg) .. "]"
    end
  end
  return concat(buf, "", 1, n)
end


local function add_error(st, message, extra)
  local errs = st.errs
  if not errs then
    errs = {}
    st.errs = errs
  end
  local n = st.nerr + 1
  st.nerr = n
  errs[n] = { path = format_path(st, extra), message = message }
end


local function push(st, seg)
  local depth = st.depth + 1
  st.depth = depth
  st.path[depth] = seg
end


local function pop(st)
  st.depth = st.depth - 1
end


-- validation ---------------------------------------------------------------

local validate_node


local function check_string(node, value, st)
  local len = #value
  if node.min_length and len < node.min_length then
    add_error(st, "length must be >= " .. node.min_length)
  end
  if node.max_length and len > node.max_length then
    add_error(st, "length must be <= " .. node.max_length)
  end
  if node.pattern and not find(value, node.pattern) then
    add_error(st, "does not match pattern " .. quote(node.pattern))
  end
end


local function check_number(node, value, st)
  if node.minimum and value < node.minimum then
    add_error(st, "must be >= " .. num_str(node.minimum))
  end
  if node.maximum and value > node.maximum then
    add_error(st, "must be <= " .. num_str(node.maximum))
  end
  if node.exclusive_minimum and value <= node.exclusive_minimum then
    add_error(st, "must be > " .. num_str(node.exclusive_minimum))
  end
  if node.exclusive_maximum and value >= node.exclusive_maximum then
    add_error(st, "must be < " .. num_str(node.exclusive_maximum))
  end
end


local function check_unique(value, n, st)
  -- O(n) for scalars, O(n^2) for tables (compared deeply); arrays in
  -- configuration are short.
  local seen = {}
  for i = 1, n do
    local item = value[i]
    if type(item) == "table" then
      for j = 1, i - 1 do
        if deep_equal(item, value[j]) then
          add_error(st, "duplicate item, same as [" .. (j - 1) .. "]", i - 1)
          break
        end
      end
    else
      local first = seen[item]
      if first then
        add_error(st, "duplicate item, same as [" .. (first - 1) .. "]", i - 1)
      else
        seen[item] = i
      end
    end
  end
end


local function check_array(node, value, st, fill)
  local n = #value
  if node.min_items and n < node.min_items then
    add_error(st, "must have at least " .. plural(node.min_items, "item"))
  end
  if node.max_items and n > node.max_items then
    add_error(st, "must have at most " .. plural(node.max_items, "item"))
  end
  local items = node.items
  if items then
    for i = 1, n do
      push(st, i - 1)
      validate_node(items, value[i], st, fill)
      pop(st)
    end
  end
  if node.unique_items and n > 1 then
    check_unique(value, n, st)
  end
end


local function check_object(node, value, st, fill)
  local props = node.properties
  local names = node.property_names
  if names then
    local required = node.required_set
    for i = 1, #names do
      local name = names[i]
      local child = props[name]
      local v = value[name]
      if v == nil and child.default ~= nil then
        if fill then
          v = deep_copy(child.default)
          value[name] = v
        else
          -- a trial (oneOf/anyOf): the default will be filled later
          v = child.default
        end
      end
      if v ~= nil then
        push(st, name)
        validate_node(child, v, st, fill)
        pop(st)
      elseif required[name] then
        add_error(st, "required field missing", name)
      end
    end
  end

  local extra_required = node.extra_required
  if extra_required then
    for i = 1, #extra_required do
      local name = extra_required[i]
      if value[name] == nil then
        add_error(st, "required field missing", name)
      end
    end
  end

  local additional = node.additional
  if additional == nil then
    return
  end

  local unknown
  for k, v in pairs(value) do
    if not (props and props[k]) then
      if additional == false then
        unknown = unknown or {}
        unknown[#unknown + 1] = tostring(k)
      else
        push(st, tostring(k))
        validate_node(additional, v, st, fill)
        pop(st)
      end
    end
  end
  if unknown then
    sort(unknown)
    for i = 1, #unknown do
      add_error(st, "unknown field", unknown[i])
    end
  end
end


-- validates value against branch without filling defaults; returns the
-- errors the branch reported (nil when it matched)
local function try_branch(branch, value, st)
  local errs, nerr, depth = st.errs, st.nerr, st.depth
  st.errs, st.nerr = nil, 0
  validate_node(branch, value, st, false)
  local branch_errs = st.errs
  st.errs, st.nerr, st.depth = errs, nerr, depth
  return branch_errs
end


local function check_branches(node, branches, one, value, kind, st, fill)
  local matched, nmatched = nil, 0
  local typed_errs, ntyped = nil, 0
  for i = 1, #branches do
    local branch = branches[i]
    local errs = try_branch(branch, value, st)
    if not errs then
      nmatched = nmatched + 1
      if nmatched == 1 then
        matched = branch
        if not one then
          break
        end
      else
        break
      end
    elseif not branch.accepts or branch.accepts[kind] then
      ntyped = ntyped + 1
      typed_errs = errs
    end
  end

  if nmatched == 1 then
    if fill then
      validate_node(matched, value, st, true)
    end
    return
  end

  if nmatched > 1 then
    return add_error(st, "matches more than one allowed schema")
  end

  if ntyped == 1 then
    local errs = st.errs
    if not errs then
      errs = {}
      st.errs = errs
    end
    local n = st.nerr
    for i = 1, #typed_errs do
      n = n + 1
      errs[n] = typed_errs[i]
    end
    st.nerr = n
    return
  end

  if ntyped == 0 then
    return add_error(st, "expected " .. node.branch_types .. ", got "
                         .. kind_name(kind))
  end

  add_error(st, "does not match any allowed schema")
end


validate_node = function(node, value, st, fill)
  local kind = kind_of(value)

  if kind == "nil" then
    return add_error(st, "required field missing")
  end

  local accepts = node.accepts
  if accepts then
    if not accepts[kind] then
      return add_error(st, "expected " .. node.type_text .. ", got "
                           .. kind_name(kind))
    end
  elseif kind == "null" then
    return add_error(st, "must not be null")
  end

  local nerr = st.nerr

  local enum = node.enum
  if enum then
    local found
    if type(value) == "table" then
      for i = 1, #enum do
        if deep_equal(enum[i], value) then
          found = true
          break
        end
      end
    else
      found = node.enum_set[value]
    end
    if not found then
      add_error(st, node.enum_text)
    end
  end

  local kind_for_checks = kind == "empty" and node.empty_as or kind
  if kind_for_checks == "string" then
    check_string(node, value, st)
  elseif kind_for_checks == "integer" or kind_for_checks == "number" then
    check_number(node, value, st)
  elseif kind_for_checks == "array" then
    check_array(node, value, st, fill)
  elseif kind_for_checks == "object" then
    check_object(node, value, st, fill)
  end

  if node.one_of then
    check_branches(node, node.one_of, true, value, kind, st, fill)
  end
  if node.any_of then
    check_branches(node, node.any_of, false, value, kind, st, fill)
  end

  local check = node.check
  if check and st.nerr == nerr then
    local ok, message = check(value, st.root)
    if not ok then
      add_error(st, message or "invalid value")
    end
  end
end


-- compilation --------------------------------------------------------------

local function bad(where, msg)
  error((where == "" and "schema" or "schema" .. where) .. ": " .. msg, 0)
end


local function is_list(t)
  local k = kind_of(t)
  return k == "array" or k == "empty"
end


local function opt_number(def, key, where)
  local v = def[key]
  if v ~= nil and type(v) ~= "number" then
    bad(where, key .. " must be a number")
  end
  return v
end


local function opt_count(def, key, where)
  local v = def[key]
  if v == nil then
    return nil
  end
  if kind_of(v) ~= "integer" or v < 0 then
    bad(where, key .. " must be a non-negative integer")
  end
  return v
end


local compile_node


local function compile_list(defs, key, where, seen)
  if type(defs) ~= "table" or not is_list(defs) or #defs == 0 then
    bad(where, key .. " must be a non-empty list of schemas")
  end
  local list = {}
  for i = 1, #defs do
    list[i] = compile_node(defs[i], where .. "." .. key .. "[" .. (i - 1) .. "]",
                           seen)
  end
  return list
end


local function compile_types(node, t, where)
  if t == nil then
    return
  end
  local list = type(t) == "string" and { t } or t
  if type(list) ~= "table" or not is_list(list) or #list == 0 then
    bad(where, "type must be a type name or a non-empty list of them")
  end
  local accepts = {}
  for i = 1, #list do
    local name = list[i]
    if not TYPES[name] then
      bad(where, "unknown type " .. quote(tostring(name)))
    end
    for _, kind in ipairs(ACCEPTS[name]) do
      accepts[kind] = true
    end
  end
  node.accepts = accepts
  node.type_list = list
  node.type_text = concat(list, " or ")
end


local function compile_object(node, def, where, seen)
  local props = def.properties
  if props ~= nil then
    if type(props) ~= "table" then
      bad(where, "properties must be a table")
    end
    local names = {}
    node.properties = {}
    for name, child in pairs(props) do
      if type(name) ~= "string" then
        bad(where, "properties keys must be strings")
      end
      names[#names + 1] = name
      node.properties[name] = compile_node(child, where .. ".properties."
                                                  .. name, seen)
    end
    -- sorted, so errors come in a stable order
    sort(names)
    node.property_names = names
  end

  local required = def.required
  node.required_set = {}
  if required ~= nil then
    if type(required) ~= "table" or not is_list(required) then
      bad(where, "required must be a list of property names")
    end
    local extra
    for i = 1, #required do
      local name = required[i]
      if type(name) ~= "string" then
        bad(where, "required must be a list of property names")
      end
      if node.properties and node.properties[name] then
        node.required_set[name] = true
      else
        extra = extra or {}
        extra[#extra + 1] = name
      end
    end
    node.extra_required = extra
  end

  local additional = def.additionalProperties
  if additional == false then
    node.additional = false
  elseif type(additional) == "table" then
    node.additional = compile_node(additional, where .. ".additionalProperties",
                                   seen)
  elseif additional ~= nil and additional ~= true then
    bad(where, "additionalProperties must be a boolean or a schema")
  end
end


local function compile_enum(node, enum, where)
  if type(enum) ~= "table" or not is_list(enum) or #enum == 0 then
    bad(where, "enum must be a non-empty list")
  end
  local set, names = {}, {}
  for i = 1, #enum do
    local v = enum[i]
    if type(v) ~= "table" then
      set[v] = true
    end
    names[i] = type(v) == "string" and v or tostring(v)
  end
  node.enum = enum
  node.enum_set = set
  node.enum_text = "must be one of: " .. concat(names, ", ")
end


-- an empty table is both an array and an object: which checks apply to it
local function empty_as(node)
  local accepts = node.accepts
  if accepts then
    local arr, obj = accepts.array, accepts.object
    if arr and not obj then
      return "array"
    end
    if obj and not arr then
      return "object"
    end
  end
  if node.properties or node.extra_required or node.additional ~= nil
     or next(node.required_set) then
    return "object"
  end
  if node.items or node.min_items then
    return "array"
  end
  return "object"
end


local function branch_types(branches)
  local seen, list = {}, {}
  for i = 1, #branches do
    local types = branches[i].type_list
    if not types then
      return nil
    end
    for j = 1, #types do
      if not seen[types[j]] then
        seen[types[j]] = true
        list[#list + 1] = types[j]
      end
    end
  end
  return concat(list, " or ")
end


compile_node = function(def, where, seen)
  if type(def) ~= "table" then
    bad(where, "a schema must be a table")
  end
  if getmetatable(def) == validator_mt then
    return def.node
  end
  local node = seen[def]
  if node then
    -- shared or recursive definition: compiled once
    return node
  end
  node = {}
  seen[def] = node

  for key in pairs(def) do
    if not KEYWORDS[key] then
      bad(where, "unknown keyword " .. quote(tostring(key)))
    end
  end

  compile_types(node, def.type, where)
  compile_object(node, def, where, seen)

  if def.enum ~= nil then
    compile_enum(node, def.enum, where)
  end

  node.default = def.default
  node.minimum = opt_number(def, "minimum", where)
  node.maximum = opt_number(def, "maximum", where)
  node.exclusive_minimum = opt_number(def, "exclusiveMinimum", where)
  node.exclusive_maximum = opt_number(def, "exclusiveMaximum", where)
  node.min_length = opt_count(def, "minLength", where)
  node.max_length = opt_count(def, "maxLength", where)
  node.min_items = opt_count(def, "minItems", where)
  node.max_items = opt_count(def, "maxItems", where)

  local pattern = def.pattern
  if pattern ~= nil then
    if type(pattern) ~= "string" or not pcall(find, "", pattern) then
      bad(where, "pattern must be a valid Lua pattern")
    end
    node.pattern = pattern
  end

  if def.items ~= nil then
    if type(def.items) ~= "table" or kind_of(def.items) == "array" then
      bad(where, "items must be a schema (tuples are not supported)")
    end
    node.items = compile_node(def.items, where .. ".items", seen)
  end

  if def.uniqueItems ~= nil and type(def.uniqueItems) ~= "boolean" then
    bad(where, "uniqueItems must be a boolean")
  end
  node.unique_items = def.uniqueItems or nil

  if def.oneOf ~= nil then
    node.one_of = compile_list(def.oneOf, "oneOf", where, seen)
  end
  if def.anyOf ~= nil then
    node.any_of = compile_list(def.anyOf, "anyOf", where, seen)
  end
  if node.one_of or node.any_of then
    node.branch_types = branch_types(node.one_of or node.any_of)
  end

  if def.check ~= nil and type(def.check) ~= "function" then
    bad(where, "check must be a function")
  end
  node.check = def.check

  node.empty_as = empty_as(node)
  return node
end


-- public API ---------------------------------------------------------------

-- Compiles a schema definition. A mistake in the definition raises an error
-- naming where it is ("schema.properties.rate: unknown type \"int\"").
function _M.compile(def)
  if getmetatable(def) == validator_mt then
    return def
  end
  local ok, node = pcall(compile_node, def, "", {})
  if not ok then
    error(node, 2)
  end
  return setmetatable({ node = node }, validator_mt)
end


-- Validates value, filling defaults in place. path_prefix (optional) is the
-- JSON path of value inside a larger document; it starts every error path.
-- Returns true, or false and a list of { path = ..., message = ... }.
function validator_mt.validate(self, value, path_prefix)
  local st = {
    root = value,
    prefix = path_prefix or "",
    path = {},
    depth = 0,
    errs = nil,
    nerr = 0,
  }
  validate_node(self.node, value, st, true)
  if st.errs then
    return false, st.errs
  end
  return true
end


-- Fills defaults in place as validate() does, for a value already known
-- valid against this schema (the workers' copy of what the control process
-- checked): no check runs, and only the parts of the schema that hold a
-- default are walked, so it costs a fraction of validate(). As a cheap
-- guard, the Lua type of each value walked (and of the value itself) must
-- be one the schema accepts, and a required member must be there: false
-- when not (the caller validates then, for the errors). A node with
-- oneOf/anyOf and a default under a branch is validated (the branch is
-- the one validate() picks). Returns true or false.
local fill_node

-- whether filling under node can do anything (a default below it);
-- cached on the node. A recursive schema counts as filling.
local function fills(node, visiting)
  local f = node.fills
  if f ~= nil then
    return f
  end
  if visiting[node] then
    return true
  end
  visiting[node] = true
  f = false
  if node.properties then
    for _, child in pairs(node.properties) do
      if child.default ~= nil or fills(child, visiting) then
        f = true
      end
    end
  end
  if type(node.additional) == "table" and fills(node.additional, visiting) then
    f = true
  end
  if node.items and fills(node.items, visiting) then
    f = true
  end
  for _, branches in pairs({ node.one_of or false, node.any_of or false }) do
    if branches then
      for i = 1, #branches do
        if fills(branches[i], visiting) or branches[i].default ~= nil then
          f = true
        end
      end
    end
  end
  visiting[node] = nil
  node.fills = f
  return f
end

-- the Lua type each declared type is (a table: an array, an object or empty)
local LUA_TYPE = { string = "string", number = "number", integer = "number",
                   boolean = "boolean", array = "table", object = "table", empty = "table" }

local function does_fill(node)
  local f = node.fills
  if f == nil then
    f = fills(node, {})
  end
  return f
end

local function type_ok(node, value)
  local accepts = node.accepts
  if not accepts then
    return value ~= cjson_null
  end
  if value == cjson_null then
    return accepts.null == true
  end
  local lua_types = node.lua_types
  if not lua_types then
    lua_types = {}
    for kind in pairs(accepts) do
      if LUA_TYPE[kind] then
        lua_types[LUA_TYPE[kind]] = true
      end
    end
    node.lua_types = lua_types
  end
  return lua_types[type(value)] == true
end

fill_node = function(node, value)
  if not type_ok(node, value) then
    return false
  end
  if type(value) ~= "table" or not does_fill(node) then
    return true
  end
  if node.one_of or node.any_of then
    local st = { root = value, prefix = "", path = {}, depth = 0, errs = nil, nerr = 0 }
    validate_node(node, value, st, true)
    return st.errs == nil
  end
  -- a valid value: the schema says which it is, unless it allows both
  -- (kind_of walks an array's keys)
  local kind
  if node.items and not (node.properties or node.additional ~= nil) then
    kind = "array"
  elseif not node.items and (node.properties or node.additional ~= nil) then
    kind = "object"
  else
    kind = kind_of(value)
    if kind == "empty" then
      kind = node.empty_as
    end
  end
  if kind == "object" then
    local props, names = node.properties, node.property_names
    if names then
      local required = node.required_set
      for i = 1, #names do
        local name = names[i]
        local child = props[name]
        local v = value[name]
        if v == nil and child.default ~= nil then
          v = deep_copy(child.default)
          value[name] = v
        end
        if v == nil then
          if required[name] then
            return false
          end
        elseif not fill_node(child, v) then
          return false
        end
      end
    end
    local additional = node.additional
    if type(additional) == "table" and does_fill(additional) then
      for k, v in pairs(value) do
        if not (props and props[k]) and not fill_node(additional, v) then
          return false
        end
      end
    end
  elseif kind == "array" then
    local items = node.items
    if items and does_fill(items) then
      for i = 1, #value do
        if not fill_node(items, value[i]) then
          return false
        end
      end
    end
  end
  return true
end

function validator_mt.fill(self, value)
  return fill_node(self.node, value)
end


-- Turns errors into "<path>: <message>" strings (just the message when the
-- path is empty, i.e. the error is about the value itself).
function _M.format(errs)
  local out = {}
  for i = 1, #errs do
    local e = errs[i]
    out[i] = e.path == "" and e.message or e.path .. ": " .. e.message
  end
  return out
end


-- The kind of a decoded JSON value: "string", "integer", "number",
-- "boolean", "null", "array", "object", or "empty" for an empty table.
_M.kind_of = kind_of

-- A deep copy of a decoded JSON value (no metatables, no cycles).
_M.deep_copy = deep_copy


return _M
