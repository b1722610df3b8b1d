-- The Admin API as an operator meets it: bin/moongate refusing an open
-- admin listener, and (once the control process serves it) the API itself.
local cjson = require("cjson")
local socket = require("socket")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local function moongate(...)
    return proc.run({ "timeout", "-s", "KILL", "15", gateway.bin(), ... }, { stderr = true })
end

describe("admin listener", function()
    local dir

    setup(function()
        dir = proc.tmpdir()
        proc.write_file(dir .. "/routes.json", "{}")
    end)

    it("a non-loopback admin address without api_key: start and check refuse, exit 1", function()
        local conf = dir .. "/open.json"
        local port = ports.free()
        proc.write_file(conf, cjson.encode({
            listen = { { address = "127.0.0.1:" .. ports.free() } },
            admin = { listen = "0.0.0.0:" .. port },
        }))
        for _, cmd in ipairs({ "start", "check" }) do
            local rc, out = moongate(cmd, "-c", conf)
            assert.equal(1, rc, out)
            assert.matches("admin.api_key: required when admin.listen is not a loopback address",
                           out, 1, true)
        end
        -- nothing listens there
        assert.is_nil((socket.connect("127.0.0.1", port)))
        -- with a key it is accepted
        proc.write_file(conf, cjson.encode({
            listen = { { address = "127.0.0.1:" .. ports.free() } },
            admin = { listen = "0.0.0.0:" .. port, api_key = "k" },
        }))
        local crc, out = moongate("check", "-c", conf)
        assert.equal(0, crc, out)
    end)
end)
