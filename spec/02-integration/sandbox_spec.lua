-- Sandboxed policies end to end (issue 5, item 5): policies in the node's
-- sandbox.policies_dir (spec/fixtures/policies-sandbox) are loaded as
-- source text by moongate.sandbox, as etcd's <prefix>/policies/<name>
-- will be, and used by routes of a real gateway in front of the mock.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local gettime = socket.gettime

local FIXTURES = gateway.root .. "/spec/fixtures/policies-sandbox"
local BUDGET_MSG = "instruction budget exceeded (sandbox.max_instructions = 10000000)"

local eventually = proc.eventually

local function route(id, upstream, policies)
  return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream, strip_prefix = true,
           policies = policies or gateway.array() }
end

local function p(name, conf)
  return { name = name, conf = conf or {} }
end

local function get(gw, path, headers)
  local res, err = client.get(gw.port, path, headers)
  assert(res, err)
  return res
end

local function echo_of(res)
  assert.equal(200, res.status, res.body)
  return cjson.decode(res.body)
end

-- a copy of the fixture policies the test may change
local function policies_copy()
  local dir = proc.tmpdir() .. "/sandboxed"
  assert(os.execute("mkdir -p " .. dir .. " && cp " .. FIXTURES .. "/*.lua " .. dir) == 0)
  return dir
end

describe("sandboxed policies", function()
  local gw, mock

  setup(function()
    mock = gateway.mock()
    gw = gateway.start{
      workers = 1,
      node = { sandbox = { policies_dir = FIXTURES } },
      routes = {
        upstreams = { gateway.upstream("a", mock) },
        routes = {
          route("hdr", "a", { p("sb-headers", { value = "hello" }) }),
          route("sleepy", "a", { p("sb-headers", { value = "late", sleep_ms = 100 }) }),
          route("spin", "a", { p("sb-spin") }),
          route("spin-hf", "a", { p("sb-spin", { phase = "header_filter" }) }),
          route("probe", "a", { p("sb-probe") }),
          route("auth", "a", { p("key-auth") }),
          route("plain", "a"),
        },
        consumers = { { id = "alice", credentials = { ["key-auth"] = { key = "k1" } } } },
      },
    }
    assert(eventually(function() return client.get(gw.port, "/plain/ready") end, 5))
  end)

  teardown(function()
    client.close_all()
    gateway.stop_all()
  end)

  after_each(function()
    client.close_all()
  end)

  it("runs a sandboxed policy on its route: the upstream and the client see its headers",
     function()
    local res = get(gw, "/hdr/x")
    local echo = echo_of(res)
    assert.equal("HELLO", echo.headers["x-sandboxed"]) -- init upper-cased it
    assert.equal("HELLO/hdr", res.headers["x-sandboxed-resp"])
    assert.is_nil(echo_of(get(gw, "/plain/x")).headers["x-sandboxed"])
  end)

  it("waits through the kit (mg.sleep) and serves other requests meanwhile", function()
    local slow = assert(client.connect(gw.port))
    assert(slow:request({ method = "GET", path = "/sleepy/x" }))
    local t0 = gettime()
    local other = get(gw, "/hdr/y") -- answered while the sandboxed one sleeps
    assert.equal(200, other.status)
    local res = assert(slow:read_response())
    assert.equal("LATE", echo_of(res).headers["x-sandboxed"])
    assert.is_true(gettime() - t0 >= 0.09)
  end)

  it("stops a policy that never returns: that request gets a 500 with its request id, "
     .. "the worker serves the next one", function()
    local workers = gw:workers()
    for _, path in ipairs({ "/spin/x", "/spin-hf/x" }) do
      local t0 = gettime()
      local res = get(gw, path, { ["X-Request-Id"] = "spin-" .. path:sub(2, -3) })
      assert.is_true(gettime() - t0 < 3, "took " .. (gettime() - t0) .. " s")
      assert.equal(500, res.status)
      assert.equal("spin-" .. path:sub(2, -3), cjson.decode(res.body).request_id)
      assert.equal(200, get(gw, "/plain/next").status)
      assert.equal("HELLO", echo_of(get(gw, "/hdr/next")).headers["x-sandboxed"])
    end
    assert.same(workers, gw:workers()) -- the same worker, not a respawned one
    local log = gw:log()
    assert.truthy(log:find("route spin policy sb-spin failed: policies/sb-spin: access stopped: "
                           .. BUDGET_MSG .. " (request spin-spin)", 1, true), gw:log_tail())
    assert.truthy(log:find("route spin-hf policy sb-spin header_filter failed: policies/sb-spin: "
                           .. "header_filter stopped: " .. BUDGET_MSG, 1, true), gw:log_tail())
  end)

  it("hides the request's C pointers and the framework's tables", function()
    local echo = echo_of(get(gw, "/probe/x?q=1"))
    assert.equal("req._r=nil req._v=nil resp._r=nil mg.ffi=nil io=nil dump=nil "
                 .. "route.phases=nil route.upstream_handle=nil consumers.list=nil "
                 .. "method=GET path=/probe/x", echo.headers["x-probe"])
  end)

  it("cannot take the name of a built-in policy", function()
    assert.equal(401, get(gw, "/auth/x").status)
    local echo = echo_of(get(gw, "/auth/x", { apikey = "k1" }))
    assert.is_nil(echo.headers["x-hijacked"])
  end)
end)

describe("sandboxed policies on reload", function()
  local gw, mock, dir

  local function routes(extra)
    local list = { route("hdr", "a", { p("sb-headers", { value = "hello" }) }), route("plain", "a") }
    for _, r in ipairs(extra or {}) do
      list[#list + 1] = r
    end
    return { upstreams = { gateway.upstream("a", mock) }, routes = list }
  end

  before_each(function()
    mock = gateway.mock()
    dir = policies_copy()
    gw = gateway.start{ workers = 1, node = { sandbox = { policies_dir = dir } }, routes = routes() }
    assert(eventually(function() return client.get(gw.port, "/plain/ready") end, 5))
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
  end)

  local function header()
    return echo_of(get(gw, "/hdr/x")).headers["x-sandboxed"]
  end

  it("takes a changed source", function()
    local src = proc.read_file(dir .. "/sb-headers.lua")
    proc.write_file(dir .. "/sb-headers.lua", (src:gsub("conf.value:upper%(%)", '"v2-" .. conf.value')))
    local rc, out = gw:reload()
    assert.equal(0, rc, out)
    assert(eventually(function() return header() == "v2-hello" end, 5), gw:log_tail())
  end)

  it("refuses a source with a syntax error, naming the policy and the line; the running "
     .. "one stays", function()
    proc.write_file(dir .. "/sb-headers.lua", "return {\n  access = function(conf, ctx)\n    x = = 1\n  end\n}")
    local rc, out = gw:reload()
    assert.equal(1, rc)
    assert.truthy(out:find('policy "sb-headers" failed to load: policies/sb-headers:3: '
                           .. "unexpected symbol near '='", 1, true), out)
    assert.equal("HELLO", header())
  end)

  it("refuses a conf that the policy's sandboxed schema check refuses", function()
    gw:write_routes(routes({ route("bad", "a", { p("sb-headers", { value = "forbidden" }) }) }))
    local rc, out = gw:reload()
    assert.equal(1, rc)
    assert.truthy(out:find("routes[2].policies[0].conf: value must not be forbidden", 1, true), out)
  end)

  it("keeps the running config when a policy's init never returns", function()
    gw:write_routes(routes({ route("spin", "a", { p("sb-spin", { phase = "init" }) }) }))
    local rc, out = gw:reload()
    assert.equal(0, rc, out) -- init runs in the workers, not in the check
    assert(eventually(function()
      return gw:log():find("policies/sb-spin: init stopped: " .. BUDGET_MSG, 1, true)
    end, 5), gw:log_tail())
    assert.equal("HELLO", header())
    assert.equal(404, get(gw, "/spin/x").status)
  end)
end)
