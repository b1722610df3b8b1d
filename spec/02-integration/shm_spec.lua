-- Shared memory across a node's workers: mg.limit state is node-wide (a
-- limit of N admits N across 2 workers, not N per worker), node config shm
-- zones exist, and concurrency slots go back when a request ends, however
-- it ends (answered, policy error, client gone). Policies come from
-- spec/fixtures/policies-it/it-limit.lua.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-it"

local function route(id, conf)
  return { id = id, paths = { "/" .. id .. "/*" }, upstream = "a", strip_prefix = true,
           policies = { { name = "it-limit", conf = conf } } }
end

local eventually = proc.eventually

describe("shm across workers", function()
  local gw, mock

  setup(function()
    mock = gateway.mock()
    local routes = {
      upstreams = { gateway.upstream("a", mock) },
      routes = {
        route("fixed", { algorithm = "fixed_window", limit = 20, window_ms = 600000, key = "fixed" }),
        route("custom", { algorithm = "fixed_window", limit = 3, window_ms = 600000,
                          zone = "custom-zone", key = "custom" }),
        route("conc", { concurrency = 1, key = "conc", sleep_ms = 400 }),
        route("conc-raise", { concurrency = 1, key = "conc-raise" }),
        route("conc-abort", { concurrency = 1, key = "conc-abort", sleep_ms = 300 }),
        route("plain", {}),
      },
    }
    gw = gateway.start{ routes = routes, workers = 2,
                        node = { lua_path = { POLICY_DIR },
                                 shm = { limits = "2m", ["custom-zone"] = "64k" } } }
    assert(eventually(function() return client.get(gw.port, "/plain/x") end, 5),
           gw:log_tail())
  end)

  teardown(function()
    client.close_all()
    gateway.stop_all()
  end)

  it("a limit of 20 admits 20 of 60 requests spread over 2 workers", function()
    local counts, workers = { [200] = 0, [429] = 0 }, {}
    for _ = 1, 60 do
      -- a new connection each time: SO_REUSEPORT spreads them over workers
      local res = assert(client.get(gw.port, "/fixed/x", { Connection = "close" }))
      counts[res.status] = (counts[res.status] or 0) + 1
      workers[res.headers["x-worker"]] = true
    end
    assert.same({ [200] = 20, [429] = 40 }, counts)
    assert.is_true(workers["0"] and workers["1"], "both workers answered")
  end)

  it("a reload that resizes a zone says it needs a restart, and the state stays", function()
    local node = cjson.decode(assert(io.open(gw.conf_path)):read("*a"))
    node.shm["custom-zone"] = "128k"
    local f = assert(io.open(gw.conf_path, "w"))
    f:write(cjson.encode(node))
    f:close()
    local rc, out = gw:reload()
    assert.equal(0, rc, out)
    assert.is_truthy(eventually(function()
      return gw:log():find("reload: changes to shm need a restart", 1, true)
    end, 5), gw:log_tail())
    -- the workers' zones are the ones mapped at start: the fixed window of
    -- 20 used up by the first test is still used up
    local res = assert(client.get(gw.port, "/fixed/x", { Connection = "close" }))
    assert.equal(429, res.status)
  end)

  it("a zone declared in the node config holds its own state", function()
    local statuses = {}
    for i = 1, 4 do
      statuses[i] = assert(client.get(gw.port, "/custom/x", { Connection = "close" })).status
    end
    assert.same({ 200, 200, 200, 429 }, statuses)
  end)

  it("a concurrency slot is held while the request lasts, then given back", function()
    local a = assert(client.connect(gw.port))
    assert(a:request{ path = "/conc/slow" })
    socket.sleep(0.1) -- a is in its sleep, holding the only slot
    local busy = {}
    for i = 1, 4 do -- from either worker
      busy[i] = assert(client.get(gw.port, "/conc/x", { Connection = "close" })).status
    end
    assert.same({ 503, 503, 503, 503 }, busy)
    local res = assert(a:read_response())
    assert.equal(200, res.status)
    a:close()
    assert.is_truthy(eventually(function()
      local r = client.get(gw.port, "/conc/x")
      return r and r.status == 200
    end, 3), "the slot never came back")
  end)

  -- A slot goes back when its request ends: after the response's last
  -- write completed and the log phase ran, which may be a moment after the
  -- client read the response; hence "eventually" below. A slot that never
  -- came back would make every later request a 503.
  it("a policy error while holding a slot gives it back", function()
    for i = 1, 3 do
      local got = eventually(function()
        local res = client.get(gw.port, "/conc-raise/x", { ["X-Raise"] = "1" })
        return res and res.status == 500
      end, 3)
      assert.is_truthy(got, "policy error " .. i .. ": slot still held")
    end
    assert.is_truthy(eventually(function()
      local res = client.get(gw.port, "/conc-raise/x")
      return res and res.status == 200
    end, 3), "the slot never came back")
  end)

  it("a client gone while its request holds a slot gives it back", function()
    local a = assert(client.connect(gw.port))
    assert(a:request{ path = "/conc-abort/slow" })
    socket.sleep(0.1)
    a:close() -- the request is aborted when its sleep ends
    local got = eventually(function()
      local res = client.get(gw.port, "/conc-abort/x", { Connection = "close" })
      return res and res.status == 200 and res
    end, 3)
    assert.is_truthy(got, "the slot never came back")
    local body = cjson.decode(got.body)
    assert.equal("/x", body.path)
  end)
end)
