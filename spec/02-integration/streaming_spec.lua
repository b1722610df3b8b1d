-- The memory bound of streaming: a 2 GiB upload and a 2 GiB download
-- through one gateway worker, each meeting a slow reader for a while, keep
-- the worker's RSS growth under 16 MiB, and every byte arrives.
--
-- On loopback the gateway moves 2 GiB in a few seconds; the spec's own
-- hashing and checking (LuaJIT + libcrypto) is what takes most of the time.
-- Set MOONGATE_STREAM_MB to run smaller (e.g. 512 under AddressSanitizer).
local ffi = require("ffi")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")
local cjson = require("cjson")

local floor = math.floor
local format = string.format
local getenv = os.getenv
local max = math.max
local rep = string.rep
local tonumber = tonumber

local MB = 1024 * 1024
local TOTAL = (tonumber(getenv("MOONGATE_STREAM_MB")) or 2048) * MB
local BOUND_KB = 16 * 1024          -- the RSS growth allowed
local SLOW_AFTER = 64 * MB          -- a slow reader stalls after this many bytes...
local STALL_S = 1.5                 -- ...for this long
local SAMPLE_EVERY = 16 * MB
local TIME_LIMIT = 120              -- seconds per direction

-- SHA-256 from libcrypto: the pure-Lua helper would take minutes on 2 GiB.
pcall(ffi.cdef, [[
typedef struct evp_md_ctx_st EVP_MD_CTX;
typedef struct evp_md_st EVP_MD;
EVP_MD_CTX *EVP_MD_CTX_new(void);
void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
const EVP_MD *EVP_sha256(void);
int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, void *impl);
int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt);
int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s);
]])
local crypto = ffi.load("crypto")

local function sha256_stream()
    local ctx = ffi.gc(crypto.EVP_MD_CTX_new(), crypto.EVP_MD_CTX_free)
    assert(crypto.EVP_DigestInit_ex(ctx, crypto.EVP_sha256(), nil) == 1)
    return {
        update = function(s)
            crypto.EVP_DigestUpdate(ctx, s, #s)
        end,
        hex = function()
            local md = ffi.new("unsigned char[32]")
            crypto.EVP_DigestFinal_ex(ctx, md, nil)
            local t = {}
            for i = 0, 31 do
                t[#t + 1] = format("%02x", md[i])
            end
            return table.concat(t)
        end,
    }
end

-- RSS samples of one process: baseline, then the largest seen.
local function rss_probe(pid)
    local base = assert(proc.rss_kb(pid), "no worker " .. pid)
    local probe = { base = base, peak = base, samples = 0 }
    function probe.sample()
        local kb = proc.rss_kb(pid)
        if kb then
            probe.peak = max(probe.peak, kb)
            probe.samples = probe.samples + 1
        end
    end
    function probe.growth_kb()
        return probe.peak - probe.base
    end
    return probe
end

-- A stall of STALL_S seconds, sampling RSS meanwhile.
local function stall(probe)
    local deadline = proc.now() + STALL_S
    while proc.now() < deadline do
        probe.sample()
        proc.sleep(0.05)
    end
    probe.sample()
end

local MOCK_PATTERN = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"

describe("streaming", function()
    local mock, gw, worker

    setup(function()
        mock = gateway.mock()
        local up = gateway.upstream("mock", mock)
        up.timeouts = { connect_ms = 2000, send_ms = 30000, read_ms = 30000 }
        gw = gateway.start({
            workers = 1,
            node = { limits = { max_body_bytes = 4 * 1024 * MB, client_body_timeout_ms = 30000,
                                send_timeout_ms = 30000 } },
            routes = {
                upstreams = { up },
                routes = { { id = "s", paths = { "/s/*" }, upstream = "mock" } },
                consumers = gateway.array(), global_policies = gateway.array(),
            },
        })
        -- the master listens before it forks: wait for the worker
        local workers = gw:workers()
        local deadline = proc.now() + 5
        while #workers == 0 and proc.now() < deadline do
            proc.sleep(0.05)
            workers = gw:workers()
        end
        assert.equal(1, #workers)
        worker = workers[1]
        -- warm up: the worker's Lua state, buffers and pools exist before
        -- the baseline is taken
        for _ = 1, 3 do
            local res = assert(client.request(gw.port, { method = "POST", path = "/s/warm",
                body = rep("w", 200000) }))
            assert.equal(200, res.status)
            assert(client.get(gw.port, "/s/warm?bytes=2000000"))
        end
    end)

    teardown(function()
        client.close_all()
        gateway.stop_all()
    end)

    after_each(function()
        client.close_all()
    end)

    it("streams a " .. TOTAL / MB .. " MiB upload to a stalled backend within 16 MiB of RSS", function()
        local probe = rss_probe(worker)
        local c = assert(client.connect(gw.port))
        c:settimeout(30)
        -- 1 MiB pieces, each stamped with its index, so a lost, repeated or
        -- reordered piece changes the hash the backend computes
        local PIECE = MB
        local filler = rep("0123456789abcdef", PIECE / 16 - 1)
        local npieces = floor(TOTAL / PIECE)
        local sha = sha256_stream()
        local t0 = proc.now()
        local sent_while_stalled = 0
        -- the backend sleeps STALL_S before it reads the body: the gateway
        -- must hold the client back rather than buffer what it cannot pass
        -- on, so the client gets no further than the socket buffers and
        -- the gateway's own buffer meanwhile (every piece samples RSS)
        local ok, err, sent = c:request_stream({
            path = "/s/up?delay_ms=" .. STALL_S * 1000,
            length = npieces * PIECE,
            producer = function(i)
                if i > npieces then
                    return nil
                end
                local now = proc.now()
                assert(now - t0 < TIME_LIMIT, "upload slower than " .. TIME_LIMIT .. " s")
                probe.sample()
                if now - t0 < STALL_S * 0.8 then
                    sent_while_stalled = (i - 1) * PIECE
                end
                local piece = format("%016x", i) .. filler
                sha.update(piece)
                return piece
            end,
        })
        assert.is_true(ok, "upload failed: " .. tostring(err) .. " after " .. tostring(sent) .. " bytes")
        local res = assert(c:read_response({ timeout = 60 }))
        probe.sample()
        local took = proc.now() - t0
        assert.equal(200, res.status)
        local echo = cjson.decode(res.body)
        assert.equal(npieces * PIECE, echo.body_length)
        assert.equal(sha.hex(), echo.body_sha256)
        print(format("\n  upload %d MiB in %.1f s: worker RSS %d -> %d KiB (growth %d KiB, %d samples);"
            .. " %d KiB sent while the backend slept", TOTAL / MB, took, probe.base, probe.peak,
            probe.growth_kb(), probe.samples, sent_while_stalled / 1024))
        assert.is_true(sent_while_stalled < SLOW_AFTER, "the client sent " .. sent_while_stalled
            .. " bytes while the backend read nothing")
        assert.is_true(probe.growth_kb() < BOUND_KB,
            "the worker's RSS grew by " .. probe.growth_kb() .. " KiB")
    end)

    it("streams a " .. TOTAL / MB .. " MiB download to a slow reader within 16 MiB of RSS", function()
        local probe = rss_probe(worker)
        local c = assert(client.connect(gw.port))
        c:settimeout(30)
        assert.is_true(c:request({ path = "/s/down?bytes=" .. format("%d", TOTAL) }))
        -- the mock's body repeats its 64-byte pattern: every piece is checked
        -- in place against the pattern at its offset, which is exactly what
        -- comparing the hash of the stream with the hash of the expected
        -- stream would prove (for a periodic stream, equal bytes at every
        -- offset and equal length), without hashing 2 GiB twice
        local big = rep(MOCK_PATTERN, 65536 / 64 + 2)
        local received, next_sample = 0, SAMPLE_EVERY
        local stalled = false
        local bad_at
        local t0 = proc.now()
        local res, err = c:read_response({
            timeout = 30, total_timeout = TIME_LIMIT,
            sink = function(piece)
                local n = #piece
                local from = received % 64 + 1
                if not bad_at then
                    -- pieces are at most 64 KiB (the client's read size)
                    if n > #big - 64 or big:sub(from, from + n - 1) ~= piece then
                        bad_at = received
                    end
                end
                received = received + n
                if received >= next_sample then
                    next_sample = next_sample + SAMPLE_EVERY
                    probe.sample()
                end
                if not stalled and received >= SLOW_AFTER then
                    -- the slow reader: nothing is read for a while, so
                    -- the mock keeps sending into the gateway
                    stalled = true
                    stall(probe)
                end
            end,
        })
        probe.sample()
        local took = proc.now() - t0
        assert.is_truthy(res, "download failed: " .. tostring(err) .. " after " .. received .. " bytes")
        assert.equal(200, res.status)
        assert.equal(format("%d", TOTAL), res.headers["content-length"])
        assert.equal(TOTAL, received)
        assert.is_nil(bad_at, "the body differs from the pattern at byte " .. tostring(bad_at))
        assert.is_true(stalled)
        print(format("\n  download %d MiB in %.1f s: worker RSS %d -> %d KiB (growth %d KiB, %d samples)",
            TOTAL / MB, took, probe.base, probe.peak, probe.growth_kb(), probe.samples))
        assert.is_true(probe.growth_kb() < BOUND_KB,
            "the worker's RSS grew by " .. probe.growth_kb() .. " KiB")
    end)

    it("streams a chunked upload and a chunked download the same way", function()
        local probe = rss_probe(worker)
        local size = 256 * MB
        local c = assert(client.connect(gw.port))
        c:settimeout(30)
        local PIECE = 256 * 1024
        local filler = rep("fedcba9876543210", PIECE / 16 - 1)
        local npieces = size / PIECE
        local sha = sha256_stream()
        local ok, err = c:request_stream({
            path = "/s/up-chunked?delay_ms=500", chunked = true,
            producer = function(i)
                if i > npieces then
                    return nil
                end
                if i % 64 == 0 then
                    probe.sample()
                end
                local piece = format("%016x", i) .. filler
                sha.update(piece)
                return piece
            end,
        })
        assert.is_true(ok, tostring(err))
        local res = assert(c:read_response({ timeout = 30 }))
        local echo = cjson.decode(res.body)
        assert.equal(size, echo.body_length)
        assert.equal(sha.hex(), echo.body_sha256)

        assert.is_true(c:request({ path = "/s/down?chunked=1&bytes=" .. size }))
        local received = 0
        local down = assert(c:read_response({ timeout = 30, total_timeout = TIME_LIMIT,
            sink = function(piece)
                received = received + #piece
                if received % (16 * MB) < #piece then
                    probe.sample()
                end
            end }))
        probe.sample()
        assert.is_true(down.chunked)
        assert.equal(size, received)
        print(format("\n  chunked %d MiB each way: worker RSS growth %d KiB", size / MB,
            probe.growth_kb()))
        assert.is_true(probe.growth_kb() < BOUND_KB,
            "the worker's RSS grew by " .. probe.growth_kb() .. " KiB")
    end)
end)
