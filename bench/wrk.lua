-- wrk script of the benchmark: POST one JSON body, report one JSON line.
--
-- Environment: BENCH_BODY_FILE (the request body), BENCH_AUTH (optional bearer key),
-- BENCH_STREAM=1 (the body asks for a stream: a 200 whose body lacks "data: [DONE]" is
-- counted as a broken stream, an error; only then does wrk hand bodies to Lua, which
-- costs it CPU).
--
-- Output, on the last line: BENCH_RESULT {"requests": ..., "errors": {...}, "p50_us": ...}

local file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_AUTH")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

broken = 0
if os.getenv("BENCH_STREAM") == "1" then
  function response(status, headers, body)
    if status == 200 and not string.find(body, "data: [DONE]", 1, true) then
      broken = broken + 1
    end
  end
end

function done(summary, latency, requests)
  local broken_total = 0
  for _, thread in ipairs(threads) do
    broken_total = broken_total + thread:get("broken")
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, '
      .. '"write": %d, "timeout": %d, "status": %d, "broken_stream": %d}, '
      .. '"p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.timeout, errors.status, broken_total,
    latency:percentile(50), latency:percentile(99), latency.max))
end
