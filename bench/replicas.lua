-- wrk script for bench/replicas.py: the bodies of notifier.lua (a distinct QingStor
-- notifier record per request), spread over several relays. RELAY_PORTS is a
-- comma-separated list of loopback ports; wrk's thread i sends to port i (modulo the
-- list), so `-t2` with two ports loads two relays with the same number of connections
-- each, and wrk still reports one latency distribution over both.
-- Each thread's request ids carry its number as well as a random prefix: the threads'
-- Lua states are seeded alike, and equal ids would be answered as duplicates.
local ports = {}
for port in string.gmatch(os.getenv("RELAY_PORTS") or "", "%d+") do
  table.insert(ports, port)
end
local threads = 0
math.randomseed(os.time())
local run = string.format("%x-%x", os.time(), math.random(0, 0xffffff))

function setup(thread)
  threads = threads + 1
  if #ports > 0 then
    local port = ports[(threads - 1) % #ports + 1]
    thread.addr = wrk.lookup("127.0.0.1", port)[1]
  end
  thread:set("prefix", string.format("%s-t%d", run, threads))
end

local counter = 0

request = function()
  counter = counter + 1
  local body = string.format(
    '{"events":[{"event_source":"qingstor","event_version":"1.0","event_type":"create_object",' ..
    '"event_time":"2021-08-31T06:25:46.000Z","zone_id":"gamma",' ..
    '"user_identify":{"principal_id":"usr-iks7Beds"},' ..
    '"response_elements":{"request_id":"%s-%d"},' ..
    '"qingstor":{"schema_version":"1.0","notification_id":"mp4-notify",' ..
    '"bucket":{"name":"max-test2"},"object":{"name":"abc/%d.mp4",' ..
    '"etag":"10c918b1d01aea85864ee65d9e0c2305","size":9840497}}}]}',
    prefix, counter, counter)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
