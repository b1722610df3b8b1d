-- What the benchmarks share (bench/<name>.lua, run from the repository
-- root: `require("bench.lib")`): their command line, the statistics they
-- print, the CPU a process used, the workers' reload timing lines, and the
-- PASS/FAIL verdicts.
--
--   local lib = require("bench.lib")
--   local opts = lib.args(arg, { routes = 5000, jv = lib.STRING, keep_tmp = false },
--                         "usage: luajit bench/x.lua [--routes N] [--jv FILE] [--keep-tmp]")
--   lib.median(t)  lib.percentile(list, 0.95)  lib.cpu_seconds(pid)
--   lib.timing_lines(log, from)  lib.verdict(pass)  lib.all_passed()
--   lib.RELOAD_POLICIES  lib.reload_route(i, tag)   (the reload benches' table)
local _M = {}

local floor = math.floor
local ceil = math.ceil
local max = math.max
local sort = table.sort
local tonumber = tonumber

-- option kinds whose default is nil (lib.args)
_M.NUMBER = setmetatable({}, { __tostring = function() return "N" end })
_M.STRING = setmetatable({}, { __tostring = function() return "S" end })

-- Parses argv into a copy of defaults: "--some-name V" sets some_name.
-- The kind of each option is its default's: a number ("--x N"), a
-- boolean (a flag, "--x" sets true), a string ("--x S"), a list of
-- numbers ("--x A,B,C"); lib.NUMBER / lib.STRING: that kind, default nil.
-- Anything else prints usage to stderr and exits 2.
function _M.args(argv, defaults, usage)
  local opts, kinds = {}, {}
  for k, v in pairs(defaults) do
    if v == _M.NUMBER then
      kinds[k] = "number"
    elseif v == _M.STRING then
      kinds[k] = "string"
    else
      kinds[k] = type(v)
      opts[k] = v
    end
  end
  local function bad(why)
    io.stderr:write(why, "\n", usage, "\n")
    os.exit(2)
  end
  local i = 1
  while argv[i] do
    local a, v = argv[i], argv[i + 1]
    local key = (a:match("^%-%-([%w%-]+)$") or ""):gsub("%-", "_")
    local kind = kinds[key]
    if kind == "boolean" then
      opts[key] = true
      i = i + 1
    elseif kind == "number" and tonumber(v) then
      opts[key] = tonumber(v)
      i = i + 2
    elseif kind == "string" and v then
      opts[key] = v
      i = i + 2
    elseif kind == "table" and v and v:match("^[%d,]+$") then
      local list = {}
      for n in v:gmatch("%d+") do
        list[#list + 1] = tonumber(n)
      end
      opts[key] = list
      i = i + 2
    else
      bad(kind and ("bad value for " .. a) or ("unknown argument " .. a))
    end
  end
  return opts
end

-- The median of t (sorted in place): for an even count, the lower of the
-- two middle values.
function _M.median(t)
  sort(t)
  return t[floor((#t + 1) / 2)]
end

-- The p-quantile (0 < p <= 1) of list, nearest rank (list is not
-- changed); NaN for an empty list.
function _M.percentile(list, p)
  local s = {}
  for i, v in ipairs(list) do
    s[i] = v
  end
  sort(s)
  if #s == 0 then
    return 0 / 0
  end
  return s[max(1, ceil(#s * p))]
end

-- CPU seconds (user + system) process pid has used so far (0 when it is
-- gone). USER_HZ is 100 on Linux.
local CLK_TCK = 100
function _M.cpu_seconds(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "rb")
  local stat = f and f:read("*a") or ""
  if f then
    f:close()
  end
  local rest = stat:match("%) (.*)$") or ""
  local fields = {}
  for x in rest:gmatch("%S+") do
    fields[#fields + 1] = x
  end
  -- after the comm field: state is 1, utime 12, stime 13
  return ((tonumber(fields[12]) or 0) + (tonumber(fields[13]) or 0)) / CLK_TCK
end

-- The workers' reload timing lines of a gateway log from byte `from` on
-- (worker.lua: "reloaded configuration version N in X ms (changed routes:
-- C, reused: R ... router: Y ms <how>)"):
-- {pid =, version =, ms =, changed =, reused =, router_ms =, router =}
-- (router: "updated" in place, "built" anew or "kept").
function _M.timing_lines(log, from)
  local out = {}
  for line in log:sub(from or 1):gmatch("[^\n]+") do
    local pid, ver, ms, changed, reused = line:match(
      "(%d+)#w%d+: reloaded configuration version (%d+) in ([%d.]+) ms %(changed routes: (%d+), "
      .. "reused: (%d+)")
    if ver then
      out[#out + 1] = { pid = pid, version = tonumber(ver), ms = tonumber(ms),
                        changed = tonumber(changed), reused = tonumber(reused),
                        router_ms = tonumber(line:match("router: ([%d.]+) ms")),
                        router = line:match("router: [%d.]+ ms (%a+)") }
    end
  end
  return out
end

-- "PASS" or "FAIL", remembered: all_passed() is false once one failed.
local ok_all = true
function _M.verdict(pass)
  ok_all = ok_all and pass and true or false
  return pass and "PASS" or "FAIL"
end

function _M.all_passed()
  return ok_all
end

-- The 5,000-route table of bench/reload.lua and bench/churn.lua: two
-- policy modules (by name, their Lua source) and route i of it.
_M.RELOAD_POLICIES = {
  ["bench-tag"] = [[
-- header_filter: one response header from conf (init compiles it)
return {
  name = "bench-tag", priority = 10,
  schema = { type = "object", additionalProperties = false, required = { "value" },
             properties = { name = { type = "string", default = "X-Bench-Tag" },
                            value = { type = "string", minLength = 1 } } },
  init = function(conf) return { name = conf.name, value = conf.value } end,
  header_filter = function(conf, ctx) ctx.resp:set_header(conf.name, conf.value) end,
}
]],
  ["bench-quota"] = [[
-- access: a no-op with a schema of a rate-limit's shape
return {
  name = "bench-quota", priority = 20,
  schema = { type = "object", additionalProperties = false, required = { "rate" },
             properties = { rate = { type = "integer", minimum = 1 },
                            burst = { type = "integer", minimum = 0, default = 0 },
                            key = { type = "string", enum = { "ip", "consumer" },
                                    default = "ip" } } },
  access = function() end,
}
]],
}

function _M.reload_route(i, tag)
  local r = { id = "r" .. i, paths = { "/r" .. i .. "/*" }, methods = { "GET" },
              upstream = "u" .. (i % 10),
              policies = { { name = "bench-tag", conf = { value = tag or ("r" .. i) } } } }
  if i % 2 == 0 then
    r.policies[2] = { name = "bench-quota", conf = { rate = 100 + i, key = "consumer" } }
  end
  return r
end

return _M
