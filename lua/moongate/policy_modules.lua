-- Policy modules by name, loaded once per source text: a reload re-reads
-- each policy's file and runs it again only when the text changed, so an
-- unchanged module stays the same table (and what was compiled from it,
-- per route, stays valid: config_version.lua compares module identities).
--
--   local modules = policy_modules.new()          -- one per worker
--   local gen = modules:generation(node.lua_path, sandboxed) -- one per config load
--   gen.loader(name)  -- as config.policy_loader's: module, or nil and
--                     -- "not found"; raises when the module fails to load
--   gen.get(name)     -- the module, or nil (not found or failing)
--   gen.seen()        -- {name = module or false} of the names asked
--
-- A name is looked up in the lua_path directories, then the shipped
-- policies (config.policies_dir): <dir>/<name>.lua, <dir>/<name>/init.lua;
-- the first file that exists wins. A name no file has is then looked up
-- in sandboxed (config.sandboxed_source: etcd's policies, the node's
-- sandbox.policies_dir) and loaded by moongate.sandbox; so a sandboxed
-- policy never shadows a file or built-in one. Lookups and reads are
-- memoized per generation: O(policy names + helper files) file reads per
-- config load, not O(routes).
-- A file module's identity is its own source and the sources of the
-- helper modules it loaded while it ran (require()d from the policy
-- directories, or dofile'd; config.run_policy records them): a reload that
-- finds any of them changed runs the policy module again (and the changed
-- helpers), so editing policies/lib/headers.lua alone reaches
-- request-headers and response-headers. A require made later, inside a
-- phase, is not watched.

local config = require("moongate.config")
local sandbox = require("moongate.sandbox")

local load = load
local pcall = pcall
local pairs = pairs
local ipairs = ipairs
local setmetatable = setmetatable

local _M = {}
local mt = { __index = _M }

function _M.new()
  -- file path -> {text =, mod =, deps = {file = text}}: the module last
  -- loaded from that file and its helpers' sources then; helpers: file ->
  -- {text =, value =}, the required helpers (config.run_policy)
  return setmetatable({ files = {}, helpers = {} }, mt)
end

local read = config.read_text

-- whether every helper in deps still has the source recorded
local function deps_unchanged(deps, read_text)
  for file, text in pairs(deps) do
    if read_text(file) ~= text then
      return false
    end
  end
  return true
end

-- the module of file with source text; raises as config.policy_loader does
local function run(self, name, file, text, dirs, read_text)
  local known = self.files[file]
  if known and known.text == text and deps_unchanged(known.deps, read_text) then
    return known.mod
  end
  local chunk, err = load(text, "@" .. file)
  if not chunk then
    error(err, 0)
  end
  local deps = {}
  local res = config.run_policy(chunk, name, file,
                                { dirs = dirs, deps = deps, helpers = self.helpers, read = read_text })
  self.files[file] = { text = text, mod = res, deps = deps }
  self.loads = (self.loads or 0) + 1
  return res
end

-- the module of the sandboxed policy name with source text; raises with
-- sandbox.load's message when it is refused
local function run_sandboxed(self, name, text)
  local key = "\0sandboxed:" .. name -- never a file path
  local known = self.files[key]
  if known and known.text == text then
    return known.mod
  end
  local mod, err = sandbox.load(name, text)
  if not mod then
    error(err, 0)
  end
  self.files[key] = { text = text, mod = mod }
  self.loads = (self.loads or 0) + 1
  return mod
end

-- dirs: the node's lua_path (a list); sandboxed: nil or {sources =, dir =}
-- (config.sandboxed_source). Returns {loader =, get =, seen =}.
function _M:generation(dirs, sandboxed)
  -- name -> {mod} | {err} | false (not found)
  local seen = {}
  -- file -> its text, or false: each file read once per generation
  local texts = {}
  local function read_once(file)
    local t = texts[file]
    if t == nil then
      t = read(file) or false
      texts[file] = t
    end
    return t or nil
  end

  local function resolve(name)
    local r = seen[name]
    if r ~= nil then
      return r
    end
    r = false
    for _, file in ipairs(config.policy_files(dirs, name) or {}) do
      local text = read_once(file)
      if text then
        local ok, res = pcall(run, self, name, file, text, dirs, read_once)
        r = ok and { mod = res } or { err = res }
        break
      end
    end
    if not r then
      local text = config.sandboxed_source(sandboxed, name)
      if text then
        local ok, res = pcall(run_sandboxed, self, name, text)
        r = ok and { mod = res } or { err = res }
      end
    end
    seen[name] = r
    return r
  end

  local gen = {}
  function gen.loader(name)
    local r = resolve(name)
    if not r then
      return nil, "not found"
    end
    if r.err then
      error(r.err, 0)
    end
    return r.mod
  end
  function gen.get(name)
    local r = resolve(name)
    return r and r.mod or nil
  end
  -- name -> module (false: not found or failing) for each name asked so far
  function gen.seen()
    local out = {}
    for name, r in pairs(seen) do
      out[name] = r and r.mod or false
    end
    return out
  end
  return gen
end

-- How many times a module was (re)loaded from its source, in total.
function _M:load_count()
  return self.loads or 0
end

return _M
