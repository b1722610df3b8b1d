-- Node configuration (moongate.json) and declarative routes (routes.json):
-- validation and normalization.
--
--   local node, errs = config.load_node("conf/moongate.json")
--   local routes, errs = config.load_routes(node.config_source.path,
--                                           { policy_loader = loader })
--   local errs = config.check("conf/moongate.json")  -- `moongate check`
--
-- Errors are lists of "<json path>: <message>" strings. The normalized node
-- table is read by the C master through the Lua C API: its shape is a
-- contract (see load_node below and DESIGN.md).
--
-- In both files a JSON null member is the same as an absent one (so the
-- default applies); policies never see cjson.null in their conf.

local ffi = require("ffi")
local cjson = require("cjson.safe")
local schema = require("moongate.schema")

local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local tostring = tostring
local tonumber = tonumber
local loadfile = loadfile
local load = load
local unpack = unpack
local setmetatable = setmetatable
local io_open = io.open
local os_getenv = os.getenv
local byte = string.byte
local sub = string.sub
local find = string.find
local match = string.match
local gmatch = string.gmatch
local gsub = string.gsub
local lower = string.lower
local format = string.format
local concat = table.concat
local debug_getinfo = debug.getinfo
local ffi_string = ffi.string
local C = ffi.C

local null = cjson.null


local _M = { _VERSION = "0.1.0" }


-- a private decoder: settings on the shared cjson module are not ours
local json = cjson.new()
json.decode_invalid_numbers(false)   -- NaN and Infinity are not JSON
json.decode_max_depth(64)

-- getcwd is libc, not part of moongate.h; pcall because another module may
-- have declared it already
pcall(ffi.cdef, "char *getcwd(char *buf, size_t size);")
local CWD_MAX = 4096
local cwd_buf = ffi.new("char[?]", CWD_MAX)


-- paths --------------------------------------------------------------------

local function quote(s)
  return '"' .. gsub(s, '[\\"]', "\\%0") .. '"'
end


-- Lexical cleanup of an absolute path, like Go's filepath.Clean: removes
-- "." and empty segments and resolves "..".
local function clean(path)
  local segs, n = {}, 0
  for seg in gmatch(path, "[^/]+") do
    if seg == ".." then
      if n > 0 then
        n = n - 1
      end
    elseif seg ~= "." then
      n = n + 1
      segs[n] = seg
    end
  end
  return "/" .. concat(segs, "/", 1, n)
end


local function dirname(path)
  local dir = match(path, "^(.*)/[^/]*$")
  if not dir or dir == "" then
    return "/"
  end
  return dir
end


local function cwd()
  local p = C.getcwd(cwd_buf, CWD_MAX)
  if p ~= nil then
    return ffi_string(p)
  end
  return os_getenv("PWD") or "/"
end


-- relative paths resolve against dir (the directory of the file naming them)
local function resolve(dir, path)
  if byte(path, 1) == 47 then   -- "/"
    return clean(path)
  end
  return clean(dir .. "/" .. path)
end

-- path made absolute against the working directory (as check does)
function _M.resolve_path(path)
  return resolve(cwd(), path)
end


local function module_dir()
  local source = debug_getinfo(1, "S").source
  local file = byte(source, 1) == 64 and sub(source, 2) or source   -- "@"
  return dirname(resolve(cwd(), file))
end


-- lua/moongate/config.lua -> ../../policies
-- the repository layout (lua/moongate/ beside policies/), else the installed
-- one (luarocks puts the shipped policies in <luadir>/moongate/policies)
do
  local repo = resolve(module_dir(), "../../policies")
  local installed = resolve(module_dir(), "policies")
  local f = io_open(installed .. "/.moongate-policies", "rb")
  if f then
    f:close()
    _M.policies_dir = installed
  else
    _M.policies_dir = repo
  end
end


-- files --------------------------------------------------------------------

-- returns the decoded JSON of path, or nil and "<path>: <reason>"
-- text: the file's contents when the caller holds them already (a worker
-- starting from the master's snapshot); nil reads the file.
local function read_json(path, text)
  if text == nil then
    local f, err = io_open(path, "rb")
    if not f then
      -- io.open's message is "<path>: <strerror>"
      local reason = sub(err, 1, #path + 2) == path .. ": " and sub(err, #path + 3)
                     or err
      return nil, path .. ": cannot open: " .. reason
    end
    local rerr
    text, rerr = f:read("*a")
    f:close()
    if not text then
      return nil, path .. ": cannot read: " .. tostring(rerr)
    end
  end
  local value, jerr = json.decode(text)
  if value == nil then
    return nil, path .. ": invalid JSON: " .. tostring(jerr)
  end
  if type(value) ~= "table" or schema.kind_of(value) == "array" then
    return nil, path .. ": must contain a JSON object"
  end
  return value
end


-- removes null object members, recursively (null means "not set")
local function strip_nulls(t)
  for k, v in pairs(t) do
    if v == null then
      if type(k) == "string" then
        t[k] = nil
      end
    elseif type(v) == "table" then
      strip_nulls(v)
    end
  end
end


-- addresses and sizes ------------------------------------------------------

local function is_ipv4(s)
  local a, b, c, d = match(s, "^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  return a ~= nil and tonumber(a) < 256 and tonumber(b) < 256
         and tonumber(c) < 256 and tonumber(d) < 256
end


local function is_ipv6(s)
  if #s < 2 or #s > 45 then
    return false
  end
  local v4 = match(s, ":([%d%.]+)$")
  if v4 and find(v4, ".", 1, true) then
    if not is_ipv4(v4) then
      return false
    end
    -- the dotted tail stands for two groups
    s = sub(s, 1, #s - #v4) .. "0:0"
  end
  if find(s, ":::", 1, true) or find(s, "[^%x:]") then
    return false
  end
  local double = find(s, "::", 1, true)
  if double and find(s, "::", double + 1, true) then
    return false
  end
  if (byte(s, 1) == 58 and byte(s, 2) ~= 58)
     or (byte(s, -1) == 58 and byte(s, -2) ~= 58) then
    return false
  end
  local groups = 0
  for group in gmatch(s, "[^:]+") do
    if #group > 4 then
      return false
    end
    groups = groups + 1
  end
  if double then
    return groups <= 7
  end
  return groups == 8
end


-- "host:port", "[v6]:port", ":port" or "port" -> host, port. Hosts are IP
-- literals ("*" and "" mean 0.0.0.0, "localhost" means 127.0.0.1), so the
-- runtime binds them without a resolver.
local function parse_address(s)
  local host, port
  if byte(s, 1) == 91 then   -- "["
    host, port = match(s, "^%[([^%]]+)%]:(%d+)$")
    if not host or not is_ipv6(host) then
      return nil
    end
  else
    host, port = match(s, "^([^:]*):(%d+)$")
    if not host then
      if not find(s, "^%d+$") then
        return nil
      end
      host, port = "", s
    end
    if host == "" or host == "*" then
      host = "0.0.0.0"
    elseif host == "localhost" then
      host = "127.0.0.1"
    elseif not is_ipv4(host) then
      return nil
    end
  end
  port = tonumber(port)
  if port < 1 or port > 65535 then
    return nil, "port must be 1..65535"
  end
  return host, port
end


local function canonical_address(host, port)
  if find(host, ":", 1, true) then
    return "[" .. host .. "]:" .. port
  end
  return host .. ":" .. port
end


local function check_address(s)
  local host, reason = parse_address(s)
  if not host then
    return false, "invalid address " .. quote(s)
                  .. (reason and " (" .. reason .. ")" or "")
  end
  return true
end


local function is_loopback(host)
  return find(host, "^127%.") ~= nil or host == "::1"
end


local SIZE_UNITS = { [""] = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 }

-- 512, "512", "64k", "10m", "1g" (case-insensitive) -> bytes
local function parse_size(v)
  if type(v) == "number" then
    return v
  end
  local digits, unit = match(v, "^(%d+)([kKmMgG]?)$")
  if not digits then
    return nil
  end
  return tonumber(digits) * SIZE_UNITS[lower(unit)]
end


local function size_def(default, minimum)
  return {
    type = { "integer", "string" },
    default = default,
    check = function(v)
      local n = parse_size(v)
      if not n then
        return false, "invalid size " .. quote(v)
                      .. " (bytes, or a number followed by k, m or g)"
      end
      if n < minimum then
        return false, "must be >= " .. minimum .. " bytes"
      end
      return true
    end,
  }
end


local function int(default, minimum, maximum)
  return { type = "integer", default = default, minimum = minimum,
           maximum = maximum }
end


-- node configuration -------------------------------------------------------

-- Zone names as runtime/src/shm.c takes them: at most 31 bytes, and at
-- most 14 zones besides the built-in "limits" and "breakers".
local function check_zone_names(zones)
  local custom = 0
  for name in pairs(zones) do
    if not find(name, "^[%w_%-]+$") then
      return false, "invalid zone name " .. quote(name)
                    .. " (letters, digits, '_' and '-')"
    end
    if #name > 31 then
      return false, "zone name " .. quote(name) .. " is longer than 31 characters"
    end
    if name ~= "limits" and name ~= "breakers" then
      custom = custom + 1
    end
  end
  if custom > 14 then
    return false, "at most 14 zones besides limits and breakers"
  end
  return true
end


local function check_slash(s)
  if byte(s, 1) ~= 47 then   -- "/"
    return false, 'must start with "/"'
  end
  return true
end


local function check_url(u)
  if not find(u, "^https?://[^/]") then
    return false, "invalid URL " .. quote(u) .. " (http:// or https://)"
  end
  return true
end


local node_def = {
  type = "object",
  additionalProperties = false,
  properties = {
    workers = {
      default = "auto",
      anyOf = {
        { type = "string", enum = { "auto" } },
        { type = "integer", minimum = 1, maximum = 256 },
      },
    },
    listen = {
      type = "array",
      minItems = 1,
      default = { { address = "0.0.0.0:8080" } },
      items = {
        type = "object",
        additionalProperties = false,
        required = { "address" },
        properties = {
          address = { type = "string", check = check_address },
          -- true: TLS with the certificates of the config source (SNI);
          -- an object: also a default certificate from files
          tls = {
            type = { "boolean", "object" },
            additionalProperties = false,
            required = { "cert", "key" },
            properties = {
              cert = { type = "string", minLength = 1 },
              key = { type = "string", minLength = 1 },
            },
          },
        },
      },
    },
    admin = {
      type = "object",
      default = {},
      additionalProperties = false,
      properties = {
        listen = { type = "string", default = "127.0.0.1:9180",
                   check = check_address },
        api_key = { type = "string", minLength = 1 },
      },
    },
    status = {
      type = "object",
      default = {},
      additionalProperties = false,
      properties = {
        listen = { type = "string", default = "127.0.0.1:9091",
                   check = check_address },
      },
    },
    -- the properties depend on "type": see source_defs
    config_source = {
      type = "object",
      default = {},
      properties = {
        type = { type = "string", enum = { "file", "etcd" }, default = "file" },
      },
    },
    redis = {
      type = "object",
      default = {},
      additionalProperties = false,
      properties = {
        host = { type = "string", minLength = 1, default = "127.0.0.1" },
        port = int(6379, 1, 65535),
        timeout_ms = int(1000, 1),
        password = { type = "string" },
        db = int(0, 0),
      },
    },
    limits = {
      type = "object",
      default = {},
      additionalProperties = false,
      properties = {
        max_header_bytes = size_def(16384, 1024),
        max_uri_bytes = size_def(8192, 1),
        -- 0: requests with a body are refused
        max_body_bytes = size_def(10 * 1024 * 1024, 0),
        client_header_timeout_ms = int(10000, 1),
        client_body_timeout_ms = int(30000, 1),
        -- 0: no keep-alive
        keepalive_timeout_ms = int(60000, 0),
        send_timeout_ms = int(30000, 1),
        max_keepalive_requests = int(10000, 1),
      },
    },
    shm = {
      type = "object",
      default = {},
      additionalProperties = size_def(nil, 4096),
      check = check_zone_names,
    },
    log = {
      type = "object",
      default = {},
      additionalProperties = false,
      properties = {
        level = { type = "string", enum = { "debug", "info", "warn", "error" },
                  default = "info" },
        -- "off", "stdout", or a file path
        access = { type = "string", minLength = 1, default = "off" },
      },
    },
    lua_path = {
      type = { "string", "array" },
      minLength = 1,
      items = { type = "string", minLength = 1 },
      default = {},
    },
    pid_file = { type = "string", minLength = 1, default = "moongate.pid" },
    shutdown_timeout_ms = int(10000, 0),
    -- policies given as source text run in moongate.sandbox
    sandbox = {
      type = "object",
      default = {},
      additionalProperties = false,
      properties = {
        -- Lua VM instructions one call of a sandboxed policy may run
        -- (a phase, init, a schema check, the module's top level)
        max_instructions = int(10000000, 1000),
        -- a directory whose <name>.lua files are loaded as sandboxed
        -- policies (file mode; etcd mode has <prefix>/policies/<name>)
        policies_dir = { type = "string", minLength = 1 },
      },
    },
  },
}


local source_defs = {
  file = {
    type = "object",
    additionalProperties = false,
    properties = {
      type = { type = "string" },
      path = { type = "string", minLength = 1, default = "routes.json" },
      watch = { type = "boolean", default = false },
      -- the last-known-good copy the control process writes after each
      -- version it hands out (default: moongate.lkg.json beside the node
      -- config)
      cache = { type = "string", minLength = 1 },
    },
  },
  etcd = {
    type = "object",
    additionalProperties = false,
    properties = {
      type = { type = "string" },
      endpoints = {
        type = "array",
        minItems = 1,
        uniqueItems = true,
        items = { type = "string", check = check_url },
        default = { "http://127.0.0.1:2379" },
      },
      prefix = { type = "string", check = check_slash, default = "/moongate" },
      user = { type = "string", minLength = 1 },
      password = { type = "string" },
      timeout_ms = int(5000, 1),
      cache = { type = "string", minLength = 1 },
      -- for the https:// endpoints (the config stream and the Admin API's
      -- writes): without it, the system CA store and verification on
      tls = {
        type = "object",
        additionalProperties = false,
        properties = {
          ca = { type = "string", minLength = 1 },
          cert = { type = "string", minLength = 1 },
          key = { type = "string", minLength = 1 },
          server_name = { type = "string", minLength = 1 },
          verify = { type = "boolean", default = true },
        },
      },
    },
    check = function(src)
      if (src.user == nil) ~= (src.password == nil) then
        return false, "user and password go together"
      end
      local tls = src.tls
      if type(tls) == "table" and (tls.cert == nil) ~= (tls.key == nil) then
        return false, "tls.cert and tls.key go together (the client certificate for mTLS)"
      end
      return true
    end,
  },
}


local node_validator = schema.compile(node_def)
local source_validators = {
  file = schema.compile(source_defs.file),
  etcd = schema.compile(source_defs.etcd),
}


local function normalize_listener(l, prefix)
  local host, port = parse_address(l.address)
  local tls = l.tls
  if tls == true then
    tls = {}
  elseif type(tls) == "table" then
    tls = { cert = resolve(prefix, tls.cert), key = resolve(prefix, tls.key) }
  else
    tls = nil
  end
  return { address = canonical_address(host, port), host = host, port = port,
           tls = tls }
end


local function normalize_source(src, prefix)
  local cache = resolve(prefix, src.cache or "moongate.lkg.json")
  if src.type == "file" then
    return { type = "file", path = resolve(prefix, src.path),
             watch = src.watch, cache = cache }
  end
  local endpoints = {}
  for i, e in ipairs(src.endpoints) do
    endpoints[i] = e
  end
  local tls = src.tls
  if tls then
    tls = { ca = tls.ca and resolve(prefix, tls.ca), cert = tls.cert and resolve(prefix, tls.cert),
            key = tls.key and resolve(prefix, tls.key), server_name = tls.server_name,
            verify = tls.verify }
  end
  return { type = "etcd", endpoints = endpoints, prefix = src.prefix,
           user = src.user, password = src.password,
           timeout_ms = src.timeout_ms, cache = cache, tls = tls }
end


local function normalize_node(raw, conf_path)
  local prefix = dirname(conf_path)

  local listen = {}
  for i, l in ipairs(raw.listen) do
    listen[i] = normalize_listener(l, prefix)
  end

  local admin_host, admin_port = parse_address(raw.admin.listen)
  local status_host, status_port = parse_address(raw.status.listen)

  local limits = {}
  for k, v in pairs(raw.limits) do
    limits[k] = parse_size(v)
  end

  local shm = {}
  for name, size in pairs(raw.shm) do
    shm[name] = parse_size(size)
  end

  local access = raw.log.access
  if access ~= "off" and access ~= "stdout" then
    access = resolve(prefix, access)
  end

  local lua_path = raw.lua_path
  if type(lua_path) == "string" then
    lua_path = { lua_path }
  end
  local dirs = {}
  for i, dir in ipairs(lua_path) do
    dirs[i] = resolve(prefix, dir)
  end

  local redis = raw.redis

  return {
    conf_path = conf_path,
    prefix = prefix,
    workers = raw.workers == "auto" and 0 or raw.workers,
    listen = listen,
    admin = {
      listen = canonical_address(admin_host, admin_port),
      host = admin_host,
      port = admin_port,
      api_key = raw.admin.api_key,
    },
    status = {
      listen = canonical_address(status_host, status_port),
      host = status_host,
      port = status_port,
    },
    config_source = normalize_source(raw.config_source, prefix),
    redis = {
      host = redis.host,
      port = redis.port,
      timeout_ms = redis.timeout_ms,
      password = redis.password,
      db = redis.db,
    },
    limits = limits,
    shm = shm,
    log = { level = raw.log.level, access = access },
    lua_path = dirs,
    pid_file = resolve(prefix, raw.pid_file),
    shutdown_timeout_ms = raw.shutdown_timeout_ms,
    sandbox = {
      max_instructions = raw.sandbox.max_instructions,
      policies_dir = raw.sandbox.policies_dir and resolve(prefix, raw.sandbox.policies_dir),
    },
  }
end


-- two listeners on one port conflict when their hosts are equal or one is
-- the wildcard of the other's family
local function conflicts(a, b)
  if a.port ~= b.port then
    return false
  end
  if a.host == b.host then
    return true
  end
  local a6, b6 = find(a.host, ":", 1, true), find(b.host, ":", 1, true)
  if (a6 ~= nil) ~= (b6 ~= nil) then
    return false
  end
  local any = a6 and "::" or "0.0.0.0"
  return a.host == any or b.host == any
end


local function check_node(node, errs)
  local sockets = {}
  for i, l in ipairs(node.listen) do
    sockets[#sockets + 1] = { path = "listen[" .. (i - 1) .. "].address",
                              host = l.host, port = l.port,
                              address = l.address }
  end
  sockets[#sockets + 1] = { path = "admin.listen", host = node.admin.host,
                            port = node.admin.port,
                            address = node.admin.listen }
  sockets[#sockets + 1] = { path = "status.listen", host = node.status.host,
                            port = node.status.port,
                            address = node.status.listen }
  for i = 2, #sockets do
    local s = sockets[i]
    for j = 1, i - 1 do
      if conflicts(s, sockets[j]) then
        errs[#errs + 1] = s.path .. ": address " .. quote(s.address)
                          .. " conflicts with " .. sockets[j].path
        break
      end
    end
  end

  -- the TLS files of etcd: a start (and `moongate check`) names an
  -- unreadable one here rather than the control process failing later
  local src = node.config_source
  if src.type == "etcd" and src.tls then
    for _, k in ipairs({ "ca", "cert", "key" }) do
      local path = src.tls[k]
      if path then
        local f, err = io_open(path, "rb")
        if f then
          f:close()
        else
          errs[#errs + 1] = "config_source.tls." .. k .. ": cannot read " .. tostring(err)
        end
      end
    end
  end

  if not node.admin.api_key and not is_loopback(node.admin.host) then
    errs[#errs + 1] = "admin.api_key: required when admin.listen is not a "
                      .. "loopback address"
  end
end


-- Validates a decoded moongate.json (changed in place: defaults filled,
-- nulls removed). conf_path is the file it came from: relative paths in it
-- resolve against its directory. Returns the normalized node (shape in
-- load_node) or nil and a list of "path: message" strings.
function _M.validate_node(raw, conf_path)
  if type(raw) ~= "table" then
    return nil, { "expected object, got " .. schema.kind_of(raw) }
  end
  conf_path = resolve(cwd(), conf_path or "moongate.json")
  strip_nulls(raw)

  local ok, errs = node_validator:validate(raw)
  errs = ok and {} or schema.format(errs)

  local src = raw.config_source
  local src_validator = type(src) == "table" and source_validators[src.type]
  if src_validator then
    local sok, serrs = src_validator:validate(src, "config_source")
    if not sok then
      local formatted = schema.format(serrs)
      for i = 1, #formatted do
        errs[#errs + 1] = formatted[i]
      end
      ok = false
    end
  end

  if not ok then
    return nil, errs
  end

  local node = normalize_node(raw, conf_path)
  check_node(node, errs)
  if #errs > 0 then
    return nil, errs
  end
  return node
end


-- Reads, validates and normalizes the node configuration at path. Returns
-- node, or nil and a list of error strings. node:
--   conf_path, prefix (its directory), workers (0 = one per core),
--   listen = { {address, host, port, tls = nil | {cert?, key?}}, ... },
--   admin = {listen, host, port, api_key}, status = {listen, host, port},
--   config_source = {type="file", path, watch, cache}
--                 | {type="etcd", endpoints, prefix, user, password, timeout_ms, cache,
--                    tls = nil | {ca?, cert?, key? (absolute paths), server_name?, verify}},
--   redis = {host, port, timeout_ms, password, db},
--   limits = {... in bytes and ms}, shm = {zone = bytes},
--   log = {level, access = "off" | "stdout" | absolute path},
--   lua_path = {absolute dirs}, pid_file, shutdown_timeout_ms,
--   sandbox = {max_instructions, policies_dir = absolute dir | nil}
-- text (optional): the file's contents, already read.
function _M.load_node(path, text)
  if type(path) ~= "string" then
    error("path must be a string", 2)
  end
  local conf_path = resolve(cwd(), path)
  local raw, err = read_json(conf_path, text)
  if not raw then
    return nil, { err }
  end
  return _M.validate_node(raw, conf_path)
end


-- routes -------------------------------------------------------------------

local function check_id(id)
  if not find(id, "^[%w_%-%.]+$") then
    return false, "invalid id " .. quote(id)
                  .. " (letters, digits, '_', '-' and '.')"
  end
  return true
end


local function check_policy_name(name)
  if not find(name, "^[%w_%-]+$") then
    return false, "invalid policy name " .. quote(name)
                  .. " (letters, digits, '_' and '-')"
  end
  return true
end


-- dot-separated labels of letters, digits, "_" and "-", each 1..63 bytes
local function is_hostname(s)
  local len = #s
  if len == 0 or len > 253 or not find(s, "^[%w_%-%.]+$")
     or byte(s, 1) == 46 or byte(s, len) == 46 or find(s, "..", 1, true) then
    return false
  end
  if len > 63 then
    for label in gmatch(s, "[^.]+") do
      if #label > 63 then
        return false
      end
    end
  end
  return true
end


local function check_host(host)
  if not (is_ipv4(host) or is_hostname(host) or is_ipv6(host)) then
    return false, "invalid host " .. quote(host)
  end
  return true
end


-- route hosts may have one wildcard label, first ("*.example.com") or last
-- ("example.*")
local function check_route_host(host)
  local name = match(host, "^%*%.(.+)$") or match(host, "^(.+)%.%*$") or host
  if not is_hostname(name) then
    return false, "invalid host " .. quote(host)
  end
  return true
end


local function check_route_path(path)
  local ok, err = check_slash(path)
  if not ok then
    return false, err
  end
  if find(path, "[?#%s]") then
    return false, "must not contain a query, a fragment or spaces"
  end
  local star = find(path, "*", 1, true)
  if star and (star ~= #path or byte(path, star - 1) ~= 47) then
    return false, '"*" is only allowed as the last segment ("/a/*")'
  end
  for param in gmatch(path, "/:([^/]*)") do
    if not find(param, "^[%a_][%w_]*$") then
      return false, "invalid parameter " .. quote(":" .. param)
    end
  end
  return true
end


local function check_method(m)
  if not find(m, "^[A-Z][A-Z_%-]*$") then
    return false, "invalid method " .. quote(m) .. ' (upper case, like "GET")'
  end
  return true
end


-- route predicates: header names are RFC 9110 tokens
local function check_header_names(headers)
  for name in pairs(headers) do
    if not find(name, "^[%w!#$%%&'*+%-%.^_`|~]+$") then
      return false, "invalid header name " .. quote(name)
    end
  end
  return true
end


local function check_targets(targets)
  for _, t in ipairs(targets) do
    if t.weight > 0 then
      return true
    end
  end
  return false, "at least one target must have a weight > 0"
end


local id_def = { type = "string", check = check_id }

local policy_entry_def = {
  type = "object",
  additionalProperties = false,
  required = { "name" },
  properties = {
    name = { type = "string", check = check_policy_name },
    conf = { type = "object", default = {} },
    enabled = { type = "boolean", default = true },
  },
}

local policies_def = { type = "array", items = policy_entry_def, default = {} }

-- a route predicate's allowed value: one string, or a list of them
local predicate_values_def = {
  oneOf = { { type = "string" },
            { type = "array", minItems = 1, uniqueItems = true, items = { type = "string" } } },
}

local routes_def = {
  type = "object",
  additionalProperties = false,
  properties = {
    upstreams = {
      type = "array",
      default = {},
      items = {
        type = "object",
        additionalProperties = false,
        required = { "id", "targets" },
        properties = {
          id = id_def,
          targets = {
            type = "array",
            minItems = 1,
            check = check_targets,
            items = {
              type = "object",
              additionalProperties = false,
              required = { "host", "port" },
              properties = {
                host = { type = "string", check = check_host },
                port = int(nil, 1, 65535),
                weight = int(1, 0, 65535),
              },
            },
          },
          balancer = { type = "string", default = "round_robin",
                       enum = { "round_robin", "least_conn", "hash" } },
          timeouts = {
            type = "object",
            default = {},
            additionalProperties = false,
            properties = {
              connect_ms = int(5000, 1),
              send_ms = int(60000, 1),
              read_ms = int(60000, 1),
            },
          },
          keepalive = {
            type = "object",
            default = {},
            additionalProperties = false,
            properties = {
              size = int(64, 0),   -- 0: no pooled connections
              idle_timeout_ms = int(60000, 1),
              requests = int(1000, 1),
            },
          },
        },
      },
    },
    routes = {
      type = "array",
      default = {},
      items = {
        type = "object",
        additionalProperties = false,
        required = { "id" },
        properties = {
          id = id_def,
          hosts = { type = "array", minItems = 1, uniqueItems = true,
                    items = { type = "string", check = check_route_host } },
          paths = { type = "array", minItems = 1, uniqueItems = true,
                    items = { type = "string", check = check_route_path } },
          methods = { type = "array", minItems = 1, uniqueItems = true,
                      items = { type = "string", check = check_method } },
          headers = { type = "object", additionalProperties = predicate_values_def,
                      check = check_header_names },
          query = { type = "object", additionalProperties = predicate_values_def },
          upstream = { type = "string", minLength = 1 },
          strip_prefix = { type = "boolean", default = false },
          priority = int(0),
          rewrite = { type = "string", check = check_slash },
          policies = policies_def,
        },
      },
    },
    consumers = {
      type = "array",
      default = {},
      items = {
        type = "object",
        additionalProperties = false,
        required = { "id" },
        properties = {
          id = id_def,
          tenant = { type = "string", minLength = 1 },
          -- policy name -> that policy's credential
          credentials = { type = "object", default = {},
                          additionalProperties = { type = "object" } },
        },
      },
    },
    global_policies = policies_def,
  },
}

local routes_validator = schema.compile(routes_def)


-- compiled policy schemas, by schema table (one per policy module); weak so
-- that a reloaded module's old schema goes away with it
local compiled_schemas = setmetatable({}, { __mode = "k" })
local ANY_CONF = schema.compile({ type = "object" })


local function policy_validator(mod)
  local def = mod.schema
  if def == nil then
    return ANY_CONF
  end
  local v = compiled_schemas[def]
  if v == nil then
    local ok, res = pcall(schema.compile, def)
    v = ok and res or { err = tostring(res) }
    compiled_schemas[def] = v
  end
  if v.err then
    return nil, v.err
  end
  return v
end


-- the index of each id in list; duplicates are errors
local function index_ids(list, kind, errs)
  local index = {}
  for i, item in ipairs(list) do
    local id = type(item) == "table" and item.id
    if type(id) == "string" then
      local first = index[id]
      if first then
        errs[#errs + 1] = format("%s[%d].id: duplicate id %s (see %s[%d])",
                                 kind, i - 1, quote(id), kind, first - 1)
      else
        index[id] = i
      end
    end
  end
  return index
end


local MODULE_FUNCTIONS = { "init", "rewrite", "access", "header_filter", "body_filter", "log" }

-- What is wrong with a loaded policy module, or nil: the rules every policy
-- meets, from a file or sandboxed (moongate.sandbox refuses a module with
-- a problem at load). "has ..." so that it reads after the policy's name.
function _M.policy_problem(mod)
  if mod.priority ~= nil and type(mod.priority) ~= "number" then
    return "has a priority that is not a number"
  end
  for _, k in ipairs(MODULE_FUNCTIONS) do
    if mod[k] ~= nil and type(mod[k]) ~= "function" then
      return "has " .. k .. " that is not a function"
    end
  end
  local _, err = policy_validator(mod)
  if err then
    return "has an invalid schema: " .. err
  end
  return nil
end


local function check_policies(list, where, loader, modules, errs)
  if type(list) ~= "table" then
    return
  end
  local names = {}
  for j, entry in ipairs(list) do
    local name = type(entry) == "table" and entry.name
    local path = format("%s.policies[%d]", where, j - 1)
    if where == "" then
      path = format("global_policies[%d]", j - 1)
    end
    if type(name) == "string" and check_policy_name(name) then
      if names[name] then
        errs[#errs + 1] = path .. ".name: duplicate policy " .. quote(name)
      end
      names[name] = true

      local mod = modules[name]
      if mod == nil then
        local ok, res = pcall(loader, name)
        if not ok then
          mod = { load_error = tostring(res) }
        elseif type(res) ~= "table" then
          mod = false
        else
          mod = res
        end
        modules[name] = mod
      end

      if mod == false then
        errs[#errs + 1] = path .. ".name: unknown policy " .. quote(name)
      elseif mod.load_error then
        errs[#errs + 1] = path .. ".name: policy " .. quote(name)
                          .. " failed to load: " .. mod.load_error
      else
        local problem = _M.policy_problem(mod)
        if problem then
          errs[#errs + 1] = path .. ".name: policy " .. quote(name) .. " " .. problem
        elseif type(entry.conf) == "table" then
          local ok, cerrs = policy_validator(mod):validate(entry.conf, path .. ".conf")
          if not ok then
            local formatted = schema.format(cerrs)
            for k = 1, #formatted do
              errs[#errs + 1] = formatted[k]
            end
          end
        end
      end
    end
  end
end


-- The files a policy named name may live in, in search order: each dir of
-- lua_path, then the repo's policies/ (<dir>/<name>.lua, then
-- <dir>/<name>/init.lua). nil for a name that is not a policy name (so
-- "../x" never reaches the file system). Shared with policy_modules.lua.
function _M.policy_files(dirs, name)
  if type(name) ~= "string" or not check_policy_name(name) then
    return nil
  end
  local files = {}
  local search = {}
  for i, dir in ipairs(dirs or {}) do
    search[i] = dir
  end
  search[#search + 1] = _M.policies_dir
  for _, dir in ipairs(search) do
    files[#files + 1] = dir .. "/" .. name .. ".lua"
    files[#files + 1] = dir .. "/" .. name .. "/init.lua"
  end
  return files
end

-- The file the policy named name is loaded from (the first of
-- policy_files that exists), or nil. The Admin API refuses a sandboxed
-- policy under such a name: it would never be used (sandboxed_source).
function _M.policy_file(dirs, name)
  for _, file in ipairs(_M.policy_files(dirs, name) or {}) do
    local f = io_open(file, "rb")
    if f then
      f:close()
      return file
    end
  end
  return nil
end

-- A file's contents, or nil when it cannot be opened (the caller says why).
local function read_text(file)
  local f = io_open(file, "rb")
  if not f then
    return nil
  end
  local text = f:read("*a")
  f:close()
  return text or ""
end
_M.read_text = read_text

-- The helper modules of policies: while a policy module's chunk runs,
-- require(modname) looks first in the policy directories (the lua_path
-- dirs, then policies/: <dir>/<mod/name>.lua, <dir>/<mod/name>/init.lua),
-- and every file loaded that way or with dofile is recorded as a helper of
-- the policy (file -> source text, in h.deps), so that a reload which
-- finds a helper's text changed runs the policy again (policy_modules.lua).
-- A required helper is run once per source text (its own and its
-- helpers'; h.helpers: file -> {text, value, deps}, kept by the caller
-- across loads) and is also put in
-- package.loaded; a dofile'd one runs at each dofile, as dofile does.
-- A require made later, from a phase function, is not watched.
local function with_helpers(h, fn, ...)
  local real_require, real_dofile = _G.require, _G.dofile
  local search = {}
  for i, dir in ipairs(h.dirs or {}) do
    search[i] = dir
  end
  search[#search + 1] = _M.policies_dir
  local read = h.read or read_text

  local function unchanged(deps)
    for file, text in pairs(deps) do
      if read(file) ~= text then
        return false
      end
    end
    return true
  end

  local function source(file)
    local text = read(file)
    if not text then
      error("cannot open " .. file, 0)
    end
    h.deps[file] = text
    return text
  end

  _G.require = function(modname)
    if type(modname) == "string" and find(modname, "^[%w_-]+[%w_.-]*$")
       and not find(modname, "..", 1, true) then
      local rel = gsub(modname, "%.", "/")
      for _, dir in ipairs(search) do
        for _, file in ipairs({ dir .. "/" .. rel .. ".lua", dir .. "/" .. rel .. "/init.lua" }) do
          local text = read(file)
          if text then
            local outer = h.deps
            outer[file] = text
            local known = h.helpers[file]
            if known and known.text == text and unchanged(known.deps) then
              for f, t in pairs(known.deps) do
                outer[f] = t
              end
              package.loaded[modname] = known.value
              return known.value
            end
            local chunk, err = load(text, "@" .. file)
            if not chunk then
              error(err, 0)
            end
            -- what it loads in turn: its own helpers, and the policy's
            h.deps = {}
            local ok, value = pcall(chunk, modname)
            local own = h.deps
            h.deps = outer
            if not ok then
              error(value, 0)
            end
            for f, t in pairs(own) do
              outer[f] = t
            end
            if value == nil then
              value = true
            end
            h.helpers[file] = { text = text, value = value, deps = own }
            package.loaded[modname] = value
            return value
          end
        end
      end
    end
    return real_require(modname)
  end
  _G.dofile = function(file)
    if type(file) ~= "string" then
      return real_dofile(file)
    end
    local chunk, err = load(source(file), "@" .. file)
    if not chunk then
      error(err, 0)
    end
    return chunk()
  end
  local res = { pcall(fn, ...) }
  _G.require, _G.dofile = real_require, real_dofile
  return unpack(res)
end

-- Runs a policy module's compiled chunk as the gateway does; raises with the
-- file named when it fails or does not return a table. h (optional):
-- {dirs =, deps = {}, helpers = {}, read = fn(file) -> text or nil}: the
-- helper modules the chunk loads are looked up and recorded as
-- with_helpers says.
function _M.run_policy(chunk, name, file, h)
  local ok, res
  if h then
    ok, res = with_helpers(h, chunk, name)
  else
    ok, res = pcall(chunk, name)
  end
  if not ok then
    local msg = tostring(res)
    -- a runtime error names its place already ("<file>:<line>: ...")
    if sub(msg, 1, #file + 1) ~= file .. ":" then
      msg = file .. ": " .. msg
    end
    error(msg, 0)
  end
  if type(res) ~= "table" then
    error(file .. ": did not return a table", 0)
  end
  return res
end

-- The source text of the sandboxed policy named name, or nil. sandboxed:
-- nil, or {sources = {name = text} (what etcd's <prefix>/policies/<name>
-- hold), dir = the node's sandbox.policies_dir (<dir>/<name>.lua)}; sources
-- first. Only asked for a name that no policy file has: a file or
-- built-in policy cannot be shadowed by a sandboxed one (key-auth stays
-- key-auth). Shared with policy_modules.lua.
function _M.sandboxed_source(sandboxed, name)
  if sandboxed == nil or type(name) ~= "string" or not check_policy_name(name) then
    return nil
  end
  local text = sandboxed.sources and sandboxed.sources[name]
  if text ~= nil then
    return text
  end
  if sandboxed.dir then
    local f = io_open(sandboxed.dir .. "/" .. name .. ".lua", "rb")
    if f then
      text = f:read("*a")
      f:close()
      return text or ""
    end
  end
  return nil
end

-- Returns a policy loader over dirs (then the repo's policies/), then the
-- sandboxed policies (see sandboxed_source; sandboxed.max_instructions: the
-- node's sandbox budget): a function(name) returning the module table, or
-- nil and "not found". A module that fails to load or does not return a
-- table raises an error. Modules are cached per loader.
function _M.policy_loader(dirs, sandboxed)
  local cache, helpers = {}, {}
  return function(name)
    local mod = cache[name]
    if mod then
      return mod
    end
    for _, file in ipairs(_M.policy_files(dirs, name) or {}) do
      local f = io_open(file, "rb")
      if f then
        f:close()
        local chunk, err = loadfile(file)
        if not chunk then
          error(err, 0)
        end
        mod = _M.run_policy(chunk, name, file, { dirs = dirs, deps = {}, helpers = helpers })
        cache[name] = mod
        return mod
      end
    end
    local text = _M.sandboxed_source(sandboxed, name)
    if text then
      -- required here: moongate.sandbox requires this module
      local sandbox = require("moongate.sandbox")
      sandbox.configure(sandboxed)
      local err
      mod, err = sandbox.load(name, text)
      if not mod then
        error(err, 0)
      end
      cache[name] = mod
      return mod
    end
    return nil, "not found"
  end
end

-- Hosts match case-insensitively: a route's are kept lower-cased (the
-- router compares them with the request's lower-cased Host).
local function lower_hosts(route)
  local hosts = route.hosts
  if hosts then
    for j = 1, #hosts do
      hosts[j] = lower(hosts[j])
    end
  end
end

-- Validates decoded routes (changed in place: defaults filled, nulls
-- removed, route hosts lower-cased). opts.policy_loader: function(name) ->
-- module | nil, err (default: policy_loader(opts.lua_path)). Returns the
-- normalized routes {upstreams, routes, consumers, global_policies} or nil
-- and a list of "path: message" strings.
function _M.validate_routes(tbl, opts)
  if type(tbl) ~= "table" then
    return nil, { "expected object, got " .. schema.kind_of(tbl) }
  end
  opts = opts or {}
  local loader = opts.policy_loader or _M.policy_loader(opts.lua_path)

  strip_nulls(tbl)
  local ok, verrs = routes_validator:validate(tbl)
  local errs = ok and {} or schema.format(verrs)

  -- cross references: checked on whatever has the right shape, so that one
  -- run reports every error
  local upstreams = type(tbl.upstreams) == "table" and tbl.upstreams or {}
  local routes = type(tbl.routes) == "table" and tbl.routes or {}
  local consumers = type(tbl.consumers) == "table" and tbl.consumers or {}

  local upstream_ids = index_ids(upstreams, "upstreams", errs)
  index_ids(routes, "routes", errs)
  index_ids(consumers, "consumers", errs)

  local modules = {}
  for i, route in ipairs(routes) do
    if type(route) == "table" then
      local where = format("routes[%d]", i - 1)
      local up = route.upstream
      if type(up) == "string" and up ~= "" and not upstream_ids[up] then
        errs[#errs + 1] = where .. ".upstream: unknown upstream " .. quote(up)
      end
      check_policies(route.policies, where, loader, modules, errs)
    end
  end
  check_policies(tbl.global_policies, "", loader, modules, errs)

  if #errs > 0 then
    return nil, errs
  end

  for _, route in ipairs(routes) do
    lower_hosts(route)
  end
  return tbl
end


-- Routes that the control process checked, made what validate_routes
-- makes of them (defaults filled, route and policy conf; nulls removed;
-- route hosts lower-cased) without checking them again: a worker's
-- build of the control's version (config_version.lua) skips the cost of
-- the checks (~6 us a route: half the validation's part of a first
-- build). The checks across entities (ids, upstreams named) are the
-- caller's. A cheap guard stays: each value the defaults' walk meets has
-- a type its schema accepts, required members are there, each policy
-- named loads and has a usable schema; nil when not (the caller then
-- validates, for the errors). Same opts and result as validate_routes.
function _M.normalize_routes(tbl, opts)
  if type(tbl) ~= "table" then
    return nil
  end
  opts = opts or {}
  local loader = opts.policy_loader or _M.policy_loader(opts.lua_path)
  strip_nulls(tbl)
  if not routes_validator:fill(tbl) then
    return nil
  end
  local validators = {}
  local function fill_policies(list)
    for _, entry in ipairs(list) do
      local name = entry.name
      local v = validators[name]
      if v == nil then
        local ok, mod = pcall(loader, name)
        v = ok and type(mod) == "table" and _M.policy_problem(mod) == nil
            and policy_validator(mod) or false
        validators[name] = v
      end
      if not (v and v:fill(entry.conf)) then
        return false
      end
    end
    return true
  end
  local routes = tbl.routes
  for i = 1, #routes do
    local route = routes[i]
    if not fill_policies(route.policies) then
      return nil
    end
    lower_hosts(route)
  end
  if not fill_policies(tbl.global_policies) then
    return nil
  end
  return tbl
end


-- What is accepted of routes wherever they come from: validate_routes,
-- then the settings this build does not act on yet (unsupported). `moongate
-- check` and `moongate config push` run it on a file, config_check.entity
-- (the Admin API, the etcd source) on a one-entity document, so all three
-- refuse the same entity with the same message. Returns as validate_routes.
function _M.check_routes(tbl, opts)
  local routes, errs = _M.validate_routes(tbl, opts)
  if not routes then
    return nil, errs
  end
  errs = _M.unsupported(nil, routes)
  if #errs > 0 then
    return nil, errs
  end
  return routes
end


-- Reads and validates a routes file with check (default validate_routes;
-- check_routes for what `moongate check` accepts). text (optional): the
-- file's contents, already read.
function _M.load_routes(path, opts, text, check)
  if type(path) ~= "string" then
    error("path must be a string", 2)
  end
  path = resolve(cwd(), path)
  local tbl, err = read_json(path, text)
  if not tbl then
    return nil, { err }
  end
  return (check or _M.validate_routes)(tbl, opts)
end


local function prefixed(file, errs, out)
  for i = 1, #errs do
    local e = errs[i]
    -- errors about the file itself already start with its name
    if sub(e, 1, #file + 2) ~= file .. ": " then
      e = file .. ": " .. e
    end
    out[#out + 1] = e
  end
  return out
end


-- What `moongate check -c FILE` prints: the errors of the node config and,
-- for a file config source, of its routes (policies are found in
-- node.lua_path, then in policies/, then in node.sandbox.policies_dir). Each line is "<file>: <path>: <message>";
-- the list is empty when both are valid.
-- Settings the schema already knows (they are the contract of later
-- stages) but this build does not act on yet: refused with a clear error
-- rather than accepted and ignored. Each line goes when its feature lands.
function _M.unsupported(node, routes)
  local errs = {}
  if node then
    for i, l in ipairs(node.listen) do
      if l.tls then
        errs[#errs + 1] = format("listen[%d].tls: TLS is not supported by this build yet", i - 1)
      end
    end
  end
  if routes then
    for i, u in ipairs(routes.upstreams or {}) do
      if u.balancer ~= "round_robin" then
        errs[#errs + 1] = format("upstreams[%d].balancer: only round_robin is supported by "
                                 .. "this build yet", i - 1)
      end
    end
  end
  return errs
end

function _M.check(node_path)
  if type(node_path) ~= "string" then
    error("node_path must be a string", 2)
  end
  local conf_path = resolve(cwd(), node_path)
  local node, errs = _M.load_node(conf_path)
  if not node then
    return prefixed(conf_path, errs, {})
  end
  local src = node.config_source
  local routes
  if src.type == "file" then
    local rerrs
    routes, rerrs = _M.load_routes(src.path, {
      policy_loader = _M.policy_loader(node.lua_path, {
        dir = node.sandbox.policies_dir,
        max_instructions = node.sandbox.max_instructions,
      }),
    }, nil, _M.check_routes)
    if not routes then
      return prefixed(src.path, rerrs, {})
    end
  end
  local uerrs = _M.unsupported(node, nil)
  if #uerrs > 0 then
    return prefixed(conf_path, uerrs, {})
  end
  return {}
end


return _M
