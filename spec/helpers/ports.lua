-- Free TCP ports on the loopback interface for specs.
--
-- ports.free() binds port 0 on 127.0.0.1, reads the port the kernel picked
-- and closes the socket. A port handed out once is never handed out again by
-- this process, so two servers of one spec never collide with each other.
-- (Another process can still grab the port between free() and its use; the
-- kernel picks ports at random, so that race is rare on a test machine.)
local socket = require("socket")

local error = error
local tonumber = tonumber

local _M = {}

local handed_out = {}

-- Returns a port number (an integer) that was free a moment ago.
function _M.free()
    for _ = 1, 200 do
        local sock, err = socket.bind("127.0.0.1", 0)
        if not sock then
            error("ports.free: cannot bind 127.0.0.1:0: " .. err, 2)
        end
        local _, port = sock:getsockname()
        sock:close()
        port = tonumber(port)
        if port and not handed_out[port] then
            handed_out[port] = true
            return port
        end
    end
    error("ports.free: no fresh port after 200 tries", 2)
end

-- True when ports.free() has handed out this port in this process.
function _M.was_handed_out(port)
    return handed_out[port] == true
end

return _M
