-- The mock backend (`moongate mock --listen ADDR`), on the same runtime.
-- It echoes the request as JSON: method, path, query, headers, body length
-- and sha256 (the body is streamed through the hash, never held), steered
-- by query parameters:
--   status=N        answer with status N
--   delay_ms=N      wait before answering
--   bytes=N         answer with a body of N bytes (a repeating pattern)
--   chunked=1       chunked framing instead of Content-Length
--   close=1         close-delimited body (no length, connection closes)
--   drip_ms=N       send the body in pieces of chunk=N bytes (default 1024)
--                   with N ms between them
--   header=Name:Value  add a response header (repeatable)
--   interim=103     send a 1xx (with a Link header) before the answer
--   skip_body=1     answer without reading the request body
-- GET /__mock/hits answers {"hits": N}: the requests this mock worker
-- received before it (any path, whatever their fate), so a spec can tell
-- whether the gateway reached the backend at all.

local ffi = require("ffi")
local binding = require("moongate.ffi")
local request = require("moongate.request")
local context = require("moongate.context")
local mg = require("moongate")

local C = binding.C
local ffi_cast = ffi.cast
local ffi_new = ffi.new
local ffi_string = ffi.string
local ffi_gc = ffi.gc
local tonumber = tonumber
local type = type
local rep = string.rep
local sub = string.sub
local format = string.format
local concat = table.concat
local co_yield = coroutine.yield

local MG_OK, MG_AGAIN = C.MG_OK, C.MG_AGAIN
local SET, ADD = C.MG_HDR_SET, C.MG_HDR_ADD
local LEN_CHUNKED, LEN_CLOSE = C.MG_LEN_CHUNKED, C.MG_LEN_CLOSE

local view_ptr = ffi.typeof("mg_req_view_t *")
local req_ptr = ffi.typeof("mg_req_t *")
local data_out = ffi_new("const char *[1]")
local len_out = ffi_new("size_t[1]")
local digest = ffi_new("unsigned char[32]")

local PATTERN_CHUNK = 65536
-- One spare period: a piece may start anywhere in the first 64 bytes, so the
-- body stays one unbroken pattern whatever the piece size.
local pattern = rep("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_",
                    PATTERN_CHUNK / 64 + 1)
-- A pointer into pattern: the string must stay referenced (_M.pattern below)
-- or the GC frees the bytes under the pointer.
local pattern_ptr = ffi.cast("const char *", pattern)

local _M = { pattern = pattern }

function _M.init()
  return true
end

local function hex(buf, n)
  local t = {}
  for i = 0, n - 1 do
    t[i + 1] = format("%02x", buf[i])
  end
  return concat(t)
end

-- Streams the body through sha256 straight from the C buffer.
local function consume_body(r)
  local h = ffi_gc(C.mg_sha256_new(), C.mg_sha256_free)
  local total = 0
  while true do
    local rc = C.mg_req_read_body(r, data_out, len_out)
    if rc == MG_OK then
      local n = tonumber(len_out[0])
      if n == 0 then
        break
      end
      total = total + n
      C.mg_sha256_update(h, data_out[0], n)
    elseif rc == MG_AGAIN then
      co_yield()
    else
      return nil
    end
  end
  C.mg_sha256_final(h, digest)
  return total, hex(digest, 32)
end

-- false when the response takes no more bytes (HEAD, 204/304, a client
-- gone): the caller stops instead of spinning through the rest
local function write(r, s, n)
  local rc = C.mg_resp_write(r, s, n)
  if rc == MG_AGAIN then
    co_yield()
    return true
  end
  return rc == MG_OK
end

local function as_list(v)
  if v == nil then
    return {}
  end
  if type(v) == "table" then
    return v
  end
  return { v }
end

local hits = 0

function _M.access(rp)
  local r = ffi_cast(req_ptr, rp)
  local v = ffi_cast(view_ptr, rp)
  context.set(r)
  local req = request.new_req(r, v)
  if req.path == "/__mock/hits" then
    local body = '{"hits":' .. hits .. '}\n'
    C.mg_resp_set_header(r, "Content-Type", 12, "application/json", 16, SET)
    C.mg_resp_send(r, 200, body, #body)
    return
  end
  hits = hits + 1
  local args = req:args()
  local delay = tonumber(args.delay_ms)
  if delay and delay > 0 then
    mg.sleep(delay)
  end
  local body_length, body_sha256 = 0, nil
  if not args.skip_body then
    body_length, body_sha256 = consume_body(r)
    if not body_length then
      return -- the body failed: C answers (413/400) or the client is gone
    end
  end
  local status = tonumber(args.status) or 200
  local interim = tonumber(args.interim)
  if interim then
    local hdrs = "Link: </style.css>; rel=preload\r\n"
    C.mg_resp_interim(r, interim, hdrs, #hdrs)
  end
  for _, h in ipairs(as_list(args.header)) do
    local name, value = h:match("^([^:]+):[ \t]*(.-)[ \t]*$") -- values without OWS
    if name then
      C.mg_resp_set_header(r, name, #name, value, #value, ADD)
    end
  end
  local chunked = args.chunked == "1"
  local close = args.close == "1"
  local bytes = tonumber(args.bytes)
  if bytes then
    bytes = bytes > 0 and math.floor(bytes) or 0
  end
  local body
  if not bytes then
    local headers = {}
    local list = {}
    for i = 0, v.nheaders - 1 do
      local hh = v.headers[i]
      local name = ffi_string(hh.name, hh.name_len):lower()
      local value = ffi_string(hh.value, hh.value_len)
      list[#list + 1] = { name, value }
      local old = headers[name]
      if old == nil then
        headers[name] = value
      elseif type(old) == "table" then
        old[#old + 1] = value
      else
        headers[name] = { old, value }
      end
    end
    body = mg.json.encode({
      method = req.method,
      path = req.path,
      query = req.query,
      headers = headers,
      header_list = list,
      body_length = body_length,
      body_sha256 = body_sha256,
      remote_addr = req.remote_addr,
      http_version = format("%d.%d", v.version_major, v.version_minor),
    }) .. "\n"
    bytes = #body
    C.mg_resp_set_header(r, "Content-Type", 12, "application/json", 16, SET)
  else
    C.mg_resp_set_header(r, "Content-Type", 12, "application/octet-stream", 24, SET)
  end
  local len = bytes
  if chunked then
    len = LEN_CHUNKED
  elseif close then
    len = LEN_CLOSE
  end
  C.mg_resp_start(r, status, len)
  local drip = tonumber(args.drip_ms)
  local piece = drip and (tonumber(args.chunk) or 1024) or PATTERN_CHUNK
  -- at least a byte (0 would never end), at most what the pattern holds
  piece = math.max(1, math.min(math.floor(piece), PATTERN_CHUNK))
  local left = bytes
  local off = 0
  while left > 0 do
    local n = left < piece and left or piece
    local ok
    if body then
      ok = write(r, sub(body, off + 1, off + n), n)
    else
      ok = write(r, pattern_ptr + off % 64, n)
    end
    if not ok then
      break
    end
    off = off + n
    left = left - n
    if drip and left > 0 then
      mg.sleep(drip)
    end
  end
  C.mg_resp_finish(r)
end

return _M
