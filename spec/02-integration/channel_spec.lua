-- The config channel between the control process and the workers
-- (runtime/src/channel.c), when something goes wrong:
--   * out of memory while a frame is queued, on either end
--     (MOONGATE_TEST_CHAN_OOM="control:N" / "worker:N" fails the Nth frame
--     that end queues): the frame is not dropped quietly, which left the
--     worker on the old version until some later change; the connection
--     is closed and the worker's reconnect brings it the version in force;
--   * a worker sending a frame over 64 KiB (a policy gone wrong writing on
--     the channel socket): the control process disconnects it, it
--     reconnects and keeps getting versions;
--   * a refusal with a long error text: cut by the worker, so the control
--     process still hears it.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-channel"

local eventually = proc.eventually

local routes_with, route = gateway.demo_routes, gateway.demo_route

-- the version in force once the single worker has it
local function settled(gw)
  local v = eventually(function()
    return gw:config_versions()[0]
  end, 5)
  assert.is_truthy(v, gw:log_tail())
  return v
end

local function serves(gw, path)
  return eventually(function()
    local res = client.get(gw.port, path)
    return res and res.status == 200
  end, 5)
end

-- a route added by file + reload: the one delta frame after the snapshot
local function add_route(gw, mock, id, policies)
  gw:write_routes(routes_with(mock, { route(id, policies) }))
  assert.equal(0, (gw:reload()))
end

describe("config channel", function()
  after_each(function()
    client.close_all()
    gateway.stop_all()
  end)

  -- which end fails to queue the delta (the frame after the snapshot), and
  -- what that end logs
  for _, c in ipairs({
    { "control:2", "the control process cannot queue its frame",
      { "channel: out of memory for a %d+%-byte frame to peer %d+; disconnected, so that it "
        .. "reconnects and gets the version in force" } },
    { "worker:2", "it cannot queue a frame it received",
      { "#w0: channel: out of memory for a %d+%-byte frame",
        "#w0: lost the control process %(out of memory for a frame; a snapshot follows the "
        .. "reconnect%)" } },
  }) do
    it("does not leave a worker behind when " .. c[2], function()
      local mock = gateway.mock()
      local gw = gateway.start({ routes = routes_with(mock),
                                 env = { MOONGATE_TEST_CHAN_OOM = c[1] } })
      local v = settled(gw)
      add_route(gw, mock, "added") -- frame 2: the delta, which fails
      -- no later change comes: the worker gets the version all the same
      assert.is_truthy(eventually(function() return gw:config_all_at(v + 1) end, 5),
                       gw:log_tail())
      assert.is_truthy(serves(gw, "/added/x"), gw:log_tail())
      local log = gw:log()
      for _, line in ipairs(c[3]) do
        assert.matches(line, log)
      end
      assert.matches("#w0: reconnected to the control process", log)
    end)
  end

  it("disconnects a worker that sends a frame over 64 KiB; it reconnects and keeps up", function()
    local mock = gateway.mock()
    local gw = gateway.start({
      routes = routes_with(mock, { route("flood", { { name = "chan-oversize",
                                                      conf = { bytes = 65537 } } }) }),
      node = { lua_path = { POLICY_DIR } },
    })
    local v = settled(gw)
    local res = assert(client.get(gw.port, "/flood/x"))
    assert.equal(200, res.status, res.body)
    assert.matches("^sent fd %d+$", res.body)
    assert.is_truthy(eventually(function()
      return gw:log():find("reconnected to the control process", 1, true)
    end, 5), gw:log_tail())
    assert.matches("channel: peer %d+ sent a frame of 65537 bytes %(a worker's are at most "
                   .. "65536%); disconnected", gw:log())
    -- the new connection carries versions as before
    gw:write_routes(routes_with(mock, { route("after") }))
    assert.equal(0, (gw:reload()))
    assert.is_truthy(eventually(function() return gw:config_all_at(v + 1) end, 5),
                     gw:log_tail())
    assert.is_truthy(serves(gw, "/after/x"), gw:log_tail())
  end)

  it("cuts a worker's long refusal text so that the control process still hears it", function()
    local mock = gateway.mock()
    local gw = gateway.start({ routes = routes_with(mock),
                               node = { lua_path = { POLICY_DIR } } })
    local v = settled(gw)
    -- init() fails with 100,000 bytes of text: the worker refuses v + 1
    add_route(gw, mock, "bad", { { name = "chan-bad-init", conf = { bytes = 100000 } } })
    -- /status/ready names the worker and its error, as the control heard it
    local late = eventually(function()
      local res = client.get(gw.status_port, "/status/ready")
      local body = res and res.status == 503 and cjson.decode(res.body)
      return body and body.workers and body.workers[1] and body.workers[1].error and body
    end, 5)
    assert.is_truthy(late, gw:log_tail())
    assert.equal(v + 1, late.version)
    local err = late.workers[1].error
    assert.matches("init failed: xxxx", err)
    assert.matches("%.%.%. %(cut at 8192 bytes%)$", err)
    assert.is_true(#err < 8192 + 100, "an error of " .. #err .. " bytes")
    assert.matches("worker 0 refused config version " .. (v + 1) .. ": ", gw:log())
    -- the version in force stays, and the channel is as it was
    assert.equal(v, gw:config_versions()[0])
    assert.is_nil(gw:log():find("lost the control process", 1, true))
  end)
end)
