-- wrk's totals as one JSON line for tools/bench/compare.py (it reads the line after "WRK_JSON").
--
--   wrk -t2 -c16 -d10s -s tools/bench/wrk_report.lua http://127.0.0.1:PORT/static
--
-- Defines only setup() and done(): without a request() function wrk keeps its static request,
-- the cheapest load it can make. wrk_headers.lua loads this file for the same report.
-- "status_errors" counts answers with a status above 399 (wrk's own count): the caller counts
-- successes as requests minus every kind of error. "exhausted" is how many requests reused a
-- value after wrk_headers.lua ran out of single-use ones (Negotiate tokens).

threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   local exhausted = 0
   for _, thread in ipairs(threads) do
      exhausted = exhausted + (thread:get("exhausted") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, "connect_errors": %d, '
         .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, "exhausted": %d, "p50_us": %d, "p99_us": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
      exhausted, latency:percentile(50), latency:percentile(99)))
end
