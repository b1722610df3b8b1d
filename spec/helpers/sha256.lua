-- SHA-256 in pure LuaJIT (the `bit` library), for checking bodies in specs.
--
-- About 40-80 MB/s once the JIT has compiled the block loop: a few MB hash
-- in well under a second. Specs only; nothing on the request path uses it.
--   sha256.hex(s)          -> 64 lowercase hex digits
--   local h = sha256.new(); h:update(piece) ...; h:hex()   (streaming)
local bit = require("bit")

local band = bit.band
local bnot = bit.bnot
local bor = bit.bor
local bxor = bit.bxor
local lshift = bit.lshift
local rshift = bit.rshift
local ror = bit.ror
local tobit = bit.tobit
local tohex = bit.tohex
local byte = string.byte
local char = string.char
local concat = table.concat
local floor = math.floor
local setmetatable = setmetatable
local error = error

local K = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do
    K[i] = tobit(K[i])
end

local H0 = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
}

-- Compresses the 64-byte blocks of s from offset `from` (1-based) for
-- `nblocks` blocks into state h (8 words). w is a 64-entry scratch table.
local function compress(h, w, s, from, nblocks)
    local h1, h2, h3, h4 = h[1], h[2], h[3], h[4]
    local h5, h6, h7, h8 = h[5], h[6], h[7], h[8]
    for blk = 0, nblocks - 1 do
        local off = from + blk * 64
        for j = 1, 16 do
            local p = off + (j - 1) * 4
            local b1, b2, b3, b4 = byte(s, p, p + 3)
            w[j] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
        end
        for j = 17, 64 do
            local x, y = w[j - 15], w[j - 2]
            local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
            local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
            w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
        end
        local a, b, c, d, e, f, g, hh = h1, h2, h3, h4, h5, h6, h7, h8
        for j = 1, 64 do
            local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
            local ch = bxor(band(e, f), band(bnot(e), g))
            local t1 = hh + S1 + ch + K[j] + w[j]
            local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
            local maj = bxor(band(a, b), band(a, c), band(b, c))
            local t2 = S0 + maj
            hh = g
            g = f
            f = e
            e = tobit(d + t1)
            d = c
            c = b
            b = a
            a = tobit(t1 + t2)
        end
        h1 = tobit(h1 + a)
        h2 = tobit(h2 + b)
        h3 = tobit(h3 + c)
        h4 = tobit(h4 + d)
        h5 = tobit(h5 + e)
        h6 = tobit(h6 + f)
        h7 = tobit(h7 + g)
        h8 = tobit(h8 + hh)
    end
    h[1], h[2], h[3], h[4] = h1, h2, h3, h4
    h[5], h[6], h[7], h[8] = h5, h6, h7, h8
end

local hasher = {}
hasher.__index = hasher

local _M = {}

function _M.new()
    local h = {}
    for i = 1, 8 do
        h[i] = tobit(H0[i])
    end
    return setmetatable({ h = h, w = {}, tail = "", length = 0, done = false }, hasher)
end

-- Feeds more bytes; returns the hasher.
function hasher:update(s)
    if self.done then
        error("sha256: update after hex()", 2)
    end
    self.length = self.length + #s
    if #self.tail > 0 then
        s = self.tail .. s
    end
    local nblocks = floor(#s / 64)
    if nblocks > 0 then
        compress(self.h, self.w, s, 1, nblocks)
    end
    self.tail = s:sub(nblocks * 64 + 1)
    return self
end

-- Finishes and returns the digest as 64 lowercase hex digits.
function hasher:hex()
    if not self.digest then
        local bits = self.length * 8
        local pad = 64 - ((self.length + 9) % 64)
        if pad == 64 then
            pad = 0
        end
        local hi = floor(bits / 0x100000000)
        local lo = bits % 0x100000000
        local trailer = "\128" .. ("\0"):rep(pad)
            .. char(band(rshift(hi, 24), 255), band(rshift(hi, 16), 255),
                band(rshift(hi, 8), 255), band(hi, 255),
                floor(lo / 0x1000000) % 256, floor(lo / 0x10000) % 256,
                floor(lo / 0x100) % 256, lo % 256)
        local s = self.tail .. trailer
        compress(self.h, self.w, s, 1, #s / 64)
        local out = {}
        for i = 1, 8 do
            out[i] = tohex(self.h[i], 8)
        end
        self.digest = concat(out)
        self.done = true
    end
    return self.digest
end

function _M.hex(s)
    return _M.new():update(s):hex()
end

return _M
