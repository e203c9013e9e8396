-- Each thread reads its own share of pre-signed requests (<dir>/requests.<id>: "<length>\n<bytes>" records),
-- sends each `rounds` times (1: none repeats), and stops once every one is answered.
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long s; long ns; } bench_ts; int clock_gettime(int, bench_ts *); ]]
local ts = ffi.new("bench_ts")
local function now() ffi.C.clock_gettime(1, ts); return tonumber(ts.s) + tonumber(ts.ns) * 1e-9 end
local threads = {}
function setup(thread) thread:set("id", #threads); table.insert(threads, thread) end

reqs, total, sent, answered, ok, first, last, dir = {}, 0, 0, 0, 0, 0, 0, ""  -- globals: done() reads them
function init(args)
  dir = args[1]
  local f = assert(io.open(dir .. "/requests." .. id, "rb")); local data = f:read("*a"); f:close()
  local pos = 1
  while pos <= #data do
    local nl = data:find("\n", pos, true); local len = tonumber(data:sub(pos, nl - 1))
    reqs[#reqs + 1] = data:sub(nl + 1, nl + len); pos = nl + 1 + len
  end
  total, checked = #reqs * tonumber(args[2]), id ~= 0  -- wrk asks thread 0 for one request to check, never sent
end

function request()
  if not checked then checked = true; return reqs[1] end
  if sent >= total then return "" end  -- nothing left: the connection idles until the thread stops
  sent = sent + 1; if sent == 1 then first = now() end
  return reqs[(sent - 1) % #reqs + 1]
end

function response(status, headers, body)
  answered = answered + 1; if status >= 200 and status < 300 then ok = ok + 1 end
  if answered >= total then
    last = now(); local f = io.open(dir .. "/done." .. id, "w"); f:write("done"); f:close(); wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local out = {}
  for _, t in ipairs(threads) do
    out[#out + 1] = string.format('{"sent": %d, "answered": %d, "ok": %d, "first": %.6f, "last": %.6f}',
      t:get("sent"), t:get("answered"), t:get("ok"), t:get("first"), t:get("last"))
  end
  io.write("BENCH [" .. table.concat(out, ", ") .. "]\n")
end
