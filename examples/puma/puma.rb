# Puma's configuration for `handoff run` (see README.md beside it):
#
#   handoff run --listen 127.0.0.1:8080 -- puma -C examples/puma/puma.rb examples/puma/config.ru

# Serve on the socket handoff passes as fd 3 (systemd socket activation:
# LISTEN_FDS, LISTEN_PID), and nothing else. Readiness is systemd's too: with
# NOTIFY_SOCKET set and the sd_notify gem (Debian: ruby-sd-notify), puma says
# READY=1 once it has booted.
bind_to_activated_sockets 'only'

# No keep-alive: every response says "Connection: close". On SIGTERM puma
# closes its idle keep-alive connections at once, and a request a client sends
# on one just then is lost; without keep-alive there is none to close.
queue_requests false

# /slow holds a thread for its whole sleep: enough threads for the load.
threads 32, 32

# Drained, exit 0 (by default puma re-raises SIGTERM and dies by it).
raise_exception_on_sigterm false

# Finish every request in flight: handoff's --drain-timeout is the bound.
force_shutdown_after :forever
