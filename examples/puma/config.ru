# A Rack app for puma under `handoff run` (see README.md beside it).
#
# Routes, as in the other examples: GET / ("Hello World !!!"), /healthz ("ok"),
# /hello/NAME and /slow?ms=N. Handoff-Pid names the process that answered.
require 'uri'

VERSION = ENV.fetch('APP_VERSION', 'dev')
MAX_SLOW_MS = 60_000

run(lambda do |env|
  text = ->(status, body) { [status, { 'Content-Type' => 'text/plain; charset=utf-8' }, [body]] }
  status, headers, body =
    if env['REQUEST_METHOD'] != 'GET'
      text.(405, 'method not allowed')
    else
      case env['PATH_INFO']
      when '/' then text.(200, 'Hello World !!!')
      when '/healthz' then text.(200, 'ok')
      when %r{\A/hello/([^/]+)\z} then text.(200, "Hello #{URI.decode_www_form_component(Regexp.last_match(1))}!!!")
      when '/slow'
        ms = Integer(URI.decode_www_form(env['QUERY_STRING'].to_s).to_h['ms'], exception: false)
        if ms && ms >= 0 && ms <= MAX_SLOW_MS
          sleep(ms / 1000.0)
          text.(200, "slept #{ms} ms")
        else
          text.(400, "ms must be an integer from 0 to #{MAX_SLOW_MS}")
        end
      else text.(404, 'not found')
      end
    end
  headers['Content-Length'] = body.sum(&:bytesize).to_s
  headers['Handoff-Pid'] = Process.pid.to_s
  headers['Handoff-Version'] = VERSION
  [status, headers, body]
end)
