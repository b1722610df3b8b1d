-- A policy for the proxy fuzz target (fuzz/fuzz_request.c, proxy mode):
-- request headers of the fuzzed input steer what it does, so the fuzzer
-- reaches header edits, URI rewrites, local answers, body reads, sleeps,
-- errors and the header_filter and log phases of the C runtime. On route
-- "pp" it checks ctx.params against the path (an abort when they differ).
--   x-fuzz-set / x-fuzz-add: "Name: value"  ctx.req:set_header / add_header
--   x-fuzz-del: name                        ctx.req:set_header(name, nil)
--   x-fuzz-uri: /path[?query]               ctx.req:set_uri
--   x-fuzz-resp: "Name: value"              ctx.resp:set_header in access
--   x-fuzz-body: part|any                   read one piece, or the whole body
--   x-fuzz-sleep: ms                        mg.sleep(ms)
--   x-fuzz-status: N                        answer N at the gateway
--   x-fuzz-error: any                       raise an error
--   x-fuzz-hf: "Name: value"                ctx.resp:set_header in header_filter
--   x-fuzz-hf-status: N                     ctx.resp:set_status in header_filter
--   x-fuzz-bf: upper|drop|double|tail|error body_filter: change, drop or double
--                                           each piece, add one at eof, raise

local mg = require("moongate")

local tonumber = tonumber
local match = string.match
local find = string.find
local sub = string.sub

local function name_value(s)
  if not s then
    return nil
  end
  return match(s, "^([^:]*):%s*(.*)$")
end

-- an oracle's failure: a crash, which the fuzzer keeps as a finding
local function finding(what)
  io.stderr:write("fuzz-edit: ", what, "\n")
  local ffi = require("ffi")
  pcall(ffi.cdef, "void abort(void);")
  ffi.C.abort()
end

local function access(_, ctx)
  local req = ctx.req
  -- route "pp" (/pp/:a/*): the value its path has, before any x-fuzz-uri
  local want_a = ctx.route.id == "pp" and match(req.path, "^/pp/([^/]+)")
  local n, v = name_value(req:header("x-fuzz-set"))
  if n then
    req:set_header(n, v)
  end
  n, v = name_value(req:header("x-fuzz-add"))
  if n then
    req:add_header(n, v)
  end
  local del = req:header("x-fuzz-del")
  if del then
    req:set_header(del, nil)
  end
  local uri = req:header("x-fuzz-uri")
  if uri then
    local q = find(uri, "?", 1, true)
    if q then
      req:set_uri(sub(uri, 1, q - 1), sub(uri, q + 1))
    else
      req:set_uri(uri)
    end
  end
  n, v = name_value(req:header("x-fuzz-resp"))
  if n then
    ctx.resp:set_header(n, v)
  end
  local how = req:header("x-fuzz-body")
  if how == "part" then -- one piece only: the rest is not handed back
    local piece, err = req:read_body()
    ctx.vars.body_len = piece and #piece or err
  elseif how then
    local body, err = req:body()
    ctx.vars.body_len = body and #body or err
  end
  local ms = tonumber(req:header("x-fuzz-sleep"))
  if ms and ms >= 0 then
    mg.sleep(ms)
  end
  if want_a then
    -- ctx.params is made on this first read, after any sleep (other
    -- inputs' requests routed meanwhile): it must be this path's segment
    local got = ctx.params.a
    if got ~= want_a then
      finding("ctx.params.a is " .. tostring(got) .. ", the path has " .. want_a)
    end
  end
  if req:header("x-fuzz-error") then
    error("fuzz-edit: asked to fail")
  end
  local status = tonumber(req:header("x-fuzz-status"))
  if status then
    return status, { answered = "fuzz-edit", path = req.path }
  end
end

return {
  name = "fuzz-edit",
  priority = 1000,
  version = "0.1.0",
  schema = { type = "object", additionalProperties = false, properties = {} },
  rewrite = function(_, ctx)
    ctx.vars.method = ctx.req.method
  end,
  access = access,
  header_filter = function(_, ctx)
    local n, v = name_value(ctx.req:header("x-fuzz-hf"))
    if n then
      ctx.resp:set_header(n, v)
    end
    local st = tonumber(ctx.req:header("x-fuzz-hf-status"))
    if st then
      ctx.resp:set_status(st)
    end
    ctx.vars.upstream_status = ctx.resp.status
  end,
  body_filter = function(_, ctx, chunk, eof)
    local how = ctx.req:header("x-fuzz-bf")
    if how == "upper" then
      return chunk:upper()
    elseif how == "drop" then
      return ""
    elseif how == "double" then
      return chunk .. chunk
    elseif how == "tail" and eof then
      return "TAIL"
    elseif how == "error" and #chunk > 0 then
      error("fuzz-edit: body_filter asked to fail")
    end
    return nil
  end,
  log = function(_, ctx)
    ctx.vars.logged = ctx.resp.status
  end,
}
