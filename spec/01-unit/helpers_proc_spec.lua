-- Specs of spec/helpers/ports.lua and spec/helpers/proc.lua.
local ports = require("helpers.ports")
local proc = require("helpers.proc")
local socket = require("socket")

local ipairs = ipairs
local tonumber = tonumber

local function wait_for(pred, timeout)
    local deadline = proc.now() + (timeout or 5)
    while not pred() do
        if proc.now() >= deadline then
            return false
        end
        proc.sleep(0.02)
    end
    return true
end

describe("helpers.ports", function()
    it("free() returns a bindable loopback port", function()
        local port = ports.free()
        assert.is_number(port)
        assert.is_true(port > 0 and port < 65536)
        local server = assert(socket.bind("127.0.0.1", port))
        server:close()
    end)

    it("free() never hands out the same port twice", function()
        local seen = {}
        for _ = 1, 50 do
            local port = ports.free()
            assert.is_nil(seen[port])
            seen[port] = true
            assert.is_true(ports.was_handed_out(port))
        end
    end)
end)

describe("helpers.proc", function()
    local started = {}

    local function spawn(cmd, opts)
        local pid = proc.spawn(cmd, opts)
        started[#started + 1] = pid
        return pid
    end

    -- kills every process a test started, with the trees they grew
    after_each(function()
        local all = {}
        for _, pid in ipairs(started) do
            all[#all + 1] = pid
            for _, d in ipairs(proc.descendants(pid)) do
                all[#all + 1] = d
            end
        end
        for _, pid in ipairs(all) do
            if proc.alive(pid) then
                proc.kill(pid, "KILL")
                proc.wait_exit(pid, 2)
            end
        end
        started = {}
    end)

    teardown(function()
        proc.cleanup()
    end)

    it("spawn returns the program's own pid and logs stdout and stderr", function()
        local dir = proc.tmpdir()
        local log = dir .. "/out.log"
        local pid = spawn({ "sh", "-c", "echo to-out; echo to-err >&2; exec sleep 30" },
            { log = log })
        assert.is_true(wait_for(function()
            local text = proc.read_file(log) or ""
            return text:find("to-out", 1, true) and text:find("to-err", 1, true)
        end))
        -- after `exec sleep`, the pid we were handed is the sleep itself
        assert.is_true(wait_for(function()
            return proc.cmdline(pid)[1] == "sleep"
        end))
        assert.same({ "sleep", "30" }, proc.cmdline(pid))
    end)

    it("spawn passes env and cwd, and quotes argv words", function()
        local dir = proc.tmpdir()
        local log = dir .. "/env.log"
        local pid = spawn({ "sh", "-c", 'echo "$MG_A|$MG_B|$(pwd)|$0"', "it's $HOME" },
            { log = log, env = { MG_A = "one two", MG_B = "x'y" }, cwd = dir })
        assert.is_true(proc.wait_exit(pid, 5))
        assert.equal("one two|x'y|" .. dir .. "|it's $HOME\n", proc.read_file(log))
    end)

    it("spawn takes a string holding one simple command", function()
        local pid = spawn("sleep 30")
        assert.is_true(proc.alive(pid))
        assert.same({ "sleep", "30" }, proc.cmdline(pid))
    end)

    it("a spawned process inherits no descriptor but 0, 1 and 2", function()
        local server = assert(socket.bind("127.0.0.1", 0))
        local pid = spawn({ "sleep", "30" })
        server:close()
        local _, listing = proc.run("ls /proc/" .. pid .. "/fd")
        local fds = {}
        for fd in listing:gmatch("%d+") do
            fds[#fds + 1] = tonumber(fd)
        end
        table.sort(fds)
        local what = {}
        for _, fd in ipairs(fds) do
            local _, target = proc.run("readlink /proc/" .. pid .. "/fd/" .. fd)
            what[#what + 1] = fd .. "=" .. (target or ""):gsub("%s+$", "")
        end
        assert.same({ 0, 1, 2 }, fds, table.concat(what, " "))
    end)

    it("alive, kill and wait_exit follow a process to its end", function()
        local pid = spawn({ "sleep", "30" })
        assert.is_true(proc.alive(pid))
        assert.is_false(proc.wait_exit(pid, 0.1))
        assert.is_true(proc.kill(pid, "TERM"))
        assert.is_true(proc.wait_exit(pid, 5))
        assert.is_false(proc.alive(pid))
        assert.is_false(proc.kill(pid, "TERM"))
    end)

    it("kill takes names with or without SIG, and numbers", function()
        local a = spawn({ "sleep", "30" })
        local b = spawn({ "sleep", "30" })
        assert.is_true(proc.kill(a, "SIGKILL"))
        assert.is_true(proc.kill(b, 9))
        assert.is_true(proc.wait_exit(a, 5))
        assert.is_true(proc.wait_exit(b, 5))
        assert.has_error(function() proc.kill(a, "NOPE") end)
        assert.has_error(function() proc.kill(1, "TERM") end)
    end)

    it("wait_port waits for a listener and times out without one", function()
        local port = ports.free()
        local t0 = proc.now()
        local ok, err = proc.wait_port("127.0.0.1", port, 0.3)
        assert.is_nil(ok)
        assert.equal("timeout", err)
        assert.is_true(proc.now() - t0 >= 0.3)
        assert.is_true(proc.now() - t0 < 2)

        spawn({ "luajit", "-e", "local s=require('socket'); proc_s=assert(s.bind('127.0.0.1',"
            .. port .. ")); s.sleep(30)" })
        assert.is_true(proc.wait_port("127.0.0.1", port, 5))
    end)

    it("sleep sleeps", function()
        local t0 = proc.now()
        proc.sleep(0.2)
        local dt = proc.now() - t0
        assert.is_true(dt >= 0.19 and dt < 1, "slept " .. dt)
    end)

    it("tmpdir makes distinct directories that cleanup removes", function()
        local a, b = proc.tmpdir(), proc.tmpdir()
        assert.not_equal(a, b)
        assert.equal(0, (proc.run("test -d " .. proc.quote(a))))
        proc.write_file(a .. "/f", "data")
        assert.equal("data", proc.read_file(a .. "/f"))
        proc.cleanup(a)
        assert.equal(1, (proc.run("test -d " .. proc.quote(a))))
        assert.equal(0, (proc.run("test -d " .. proc.quote(b))))
        proc.cleanup()
        assert.equal(1, (proc.run("test -d " .. proc.quote(b))))
    end)

    it("rss_kb reads a live process's resident size", function()
        local pid = spawn({ "luajit", "-e",
            "local t = {} for i = 1, 3e6 do t[i] = i end require('socket').sleep(30)" })
        assert.is_true(wait_for(function()
            return (proc.rss_kb(pid) or 0) > 20000 -- 3e6 slots of 8 bytes
        end))
        local small = spawn({ "sleep", "30" })
        assert.is_true(proc.rss_kb(small) < 20000)
        proc.kill(pid, "KILL")
        assert.is_true(proc.wait_exit(pid, 5))
        assert.is_nil(proc.rss_kb(pid))
    end)

    it("children and descendants list a process tree", function()
        local pid = spawn({ "sh", "-c", "sleep 30 & sleep 31 & sh -c 'sleep 32 & wait' & wait" })
        local function names(pids)
            local out = {}
            for _, k in ipairs(pids) do
                out[#out + 1] = table.concat(proc.cmdline(k), " ")
            end
            table.sort(out)
            return table.concat(out, "|")
        end
        -- a forked child shows its parent's command line until it execs
        local kids_want = "sh -c sleep 32 & wait|sleep 30|sleep 31"
        assert.is_true(wait_for(function()
            return names(proc.children(pid)) == kids_want
                and names(proc.descendants(pid)) == "sh -c sleep 32 & wait|sleep 30|sleep 31|sleep 32"
        end), names(proc.descendants(pid)))
        assert.equal(kids_want, names(proc.children(pid)))
        assert.equal(3, #proc.children(pid))
        assert.equal(4, #proc.descendants(pid))
        local sleeper = proc.children(pid)[2]
        assert.same({}, proc.children(sleeper))
        assert.same({}, proc.descendants(sleeper))
    end)

    it("run returns the exit code and stdout", function()
        local rc, out = proc.run({ "sh", "-c",
            "printf 'a\\nb'; echo '(helpers_proc_spec: expected stderr line)' >&2; exit 3" })
        assert.equal(3, rc)
        assert.equal("a\nb", out)
        rc, out = proc.run({ "sh", "-c", "echo out; echo err >&2" }, { stderr = true })
        assert.equal(0, rc)
        assert.equal("out\nerr\n", out)
        rc, out = proc.run({ "printf", "%s|", "it's", "two words", "$HOME" })
        assert.equal(0, rc)
        assert.equal("it's|two words|$HOME|", out)
        assert.equal(127, (proc.run("/nonexistent/moongate-cmd 2>/dev/null")))
    end)
end)
