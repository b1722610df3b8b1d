-- The body_filter phase: every piece of a proxied response body passes
-- through the route's filters, in order, then the end; the length changes,
-- so the client gets the body chunked.
local gateway = require("helpers.gateway")
local client = require("helpers.client")
local proc = require("helpers.proc")

local ROOT = gateway.root

describe("body_filter phase", function()
  local mock, gw, count_file

  before_each(function()
    mock = gateway.mock({})
    count_file = proc.tmpdir() .. "/pieces"
    gw = gateway.start({
      node = { lua_path = { ROOT .. "/spec/fixtures/policies-bf" } },
      routes = {
        upstreams = { gateway.upstream("m", mock) },
        routes = {
          { id = "upper", paths = { "/upper/*" }, upstream = "m", strip_prefix = true,
            policies = { { name = "bf-upper",
                           conf = { trailer = "<!--end-->", count_file = count_file } } } },
          { id = "raise", paths = { "/raise/*" }, upstream = "m", strip_prefix = true,
            policies = { { name = "bf-raise" } } },
          { id = "plain", paths = { "/plain/*" }, upstream = "m", strip_prefix = true },
        },
      },
    })
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
    proc.cleanup()
  end)

  it("rewrites a Content-Length body, sends it chunked, and adds the end", function()
    local res = assert(client.get(gw.port, "/upper/x?bytes=1000"))
    assert.equal(200, res.status)
    assert.is_nil(res.headers["content-length"])
    assert.is_true(res.chunked)
    local plain = assert(client.get(gw.port, "/plain/x?bytes=1000"))
    assert.equal(plain.body:upper() .. "<!--end-->", res.body)
  end)

  it("streams a large body piece by piece (not buffered whole)", function()
    local total = 8 * 1024 * 1024
    local res = assert(client.get(gw.port, "/upper/x?bytes=" .. total))
    assert.equal(total + #"<!--end-->", #res.body)
    local rid = res.headers["x-request-id"]
    local pieces
    for line in (proc.read_file(count_file) or ""):gmatch("[^\n]+") do
      local id, n = line:match("^(%S+) (%d+)$")
      if id == rid then
        pieces = tonumber(n)
      end
    end
    -- 8 MiB through 32 KiB buffers: many pieces, plus the end
    assert.is_true(pieces and pieces > 16, "pieces: " .. tostring(pieces))
  end)

  it("rewrites chunked and close-delimited bodies the same way", function()
    local plain = assert(client.get(gw.port, "/plain/x?bytes=5000"))
    for _, q in ipairs({ "chunked=1", "close=1" }) do
      local res = assert(client.get(gw.port, "/upper/x?bytes=5000&" .. q))
      assert.equal(plain.body:upper() .. "<!--end-->", res.body)
    end
  end)

  it("keeps the connection for the next request", function()
    local c = assert(client.connect(gw.port))
    for _ = 1, 3 do
      assert(c:request({ path = "/upper/x?bytes=10" }))
      local res = assert(c:read_response())
      assert.equal(("0123456789"):upper() .. "<!--end-->", res.body)
    end
  end)

  it("leaves HEAD answers alone", function()
    local c = assert(client.connect(gw.port))
    assert(c:request({ method = "HEAD", path = "/upper/x?bytes=10" }))
    local res = assert(c:read_response())
    assert.equal(200, res.status)
    assert.equal("", res.body or "")
  end)

  it("cuts the response when a filter raises, logs it, and the worker serves on", function()
    local res, err = client.get(gw.port, "/raise/x?bytes=100")
    assert.is_nil(res)
    assert.is_truthy(err)
    assert.is_truthy(gw:log():find("bf-raise: refusing this body", 1, true))
    local ok = assert(client.get(gw.port, "/plain/x?bytes=3"))
    assert.equal(200, ok.status)
  end)
end)
