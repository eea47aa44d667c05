-- wrk script: every request is a distinct QingStor notifier record (unique request_id),
-- so relay stores each one instead of answering a duplicate.
local counter = 0
-- Seeded from the clock: Lua's generator starts the same in every run, and a repeated
-- prefix would make a second run's requests duplicates of the first's.
math.randomseed(os.time())
local prefix = string.format("%x-%x", os.time(), math.random(0, 0xffffff))

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

-- WRK_DELAY_MS: a mean pause before each request on each connection, for a steady load
-- (32 connections pausing 30 ms on average is about 1,000 req/s) rather than as fast as
-- it goes. Random pauses, so the connections do not fire in lockstep bursts.
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "0")
if pause > 0 then
  delay = function()
    return math.random() * 2 * pause
  end
end
