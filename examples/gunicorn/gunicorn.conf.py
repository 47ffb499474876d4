# gunicorn's configuration for `handoff run` (see README.md beside it):
#
#   handoff run --listen 127.0.0.1:8080 -- gunicorn -c gunicorn.conf.py app:app
#
# gunicorn needs nothing for the socket and readiness: it takes the sockets of
# systemd socket activation (LISTEN_FDS, LISTEN_PID) and says READY=1 on
# NOTIFY_SOCKET by itself. What matters is how it drains.

# Threads (the gthread worker): /slow holds a thread for its whole sleep.
workers = 2
threads = 16

# No keep-alive: every response says "Connection: close". On SIGTERM a gthread
# worker stops its loop and, once its requests in flight are done, exits,
# closing its idle keep-alive connections without reading them: a request a
# client sent on one meanwhile is lost (113 of 6,756 in 10 upgrades under load
# with the default of 2 s). Without keep-alive there is none to lose.
keepalive = 0

# Import the app in the master, before it says READY=1: a new release whose app
# fails to import exits before it is ready, so handoff keeps the old one
# serving. (Without it, gunicorn says READY=1 before its workers load the app.)
preload_app = True

# Requests in flight get this long to finish after SIGTERM; keep it below
# handoff run's --drain-timeout (30 s by default), which then SIGKILLs.
graceful_timeout = 15
