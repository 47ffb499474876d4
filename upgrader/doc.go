// Package upgrader runs one generation of a server process that upgrades itself
// without closing its listening sockets, on top of github.com/cloudflare/tableflip.
//
// A generation is one process. It obtains its listeners with Listen (inherited
// from the previous generation when there was one, created otherwise), initialises,
// and calls Ready. An upgrade execs the same binary path again and hands it every
// listener; the new generation initialises and calls Ready; only then is Done
// closed in the old generation, which stops accepting, drains and exits.
//
// The invariants:
//
//   - at most two generations are alive, and at most one of them is not ready;
//   - the old generation stops accepting only after the new one is ready;
//   - a new process that is missing, not executable, exits or hangs before Ready
//     is reported (Upgrade returns why) and the old generation keeps serving on
//     every socket: a new generation that never became ready closes only its
//     own copies, unlinks nothing and tells systemd nothing; one given up on
//     (Options.UpgradeTimeout, or Stop) is told to stop and drains what it
//     accepted (Options.AbortTimeout), and what it forked is killed;
//   - one upgrade runs at a time: SIGHUPs that arrive during an upgrade start no
//     other process, and a SIGHUP that arrives while the previous generation is
//     still draining is queued and runs as soon as it has exited (tableflip alone
//     refuses it);
//   - the PID file, when there is one, always names the ready generation: it is
//     written atomically at Ready and removed only by a final stop.
//
// The binary that an upgrade execs is os.Args[0], resolved once at New against
// the starting directory without resolving symlinks, so that swapping a
// "current -> releases/v2" symlink, or renaming a new binary over the old one,
// deploys the new version.
//
// Nothing of the handoff leaks into processes the server itself starts:
// tableflip's marker variable is removed from the environment and the
// descriptors it passes are close-on-exec.
//
// The admission rules (start, queue, coalesce, refuse) are internal/gate's,
// shared with the supervisor of `handoff run`; the control socket's protocol is
// internal/control's. The files: upgrader.go (Options, New), listen.go,
// lifecycle.go (Ready, Stop, Close, signals), loop.go (the owner goroutine),
// attempt.go (one upgrade), handoff.go (the channel between generations).
//
// A minimal server:
//
//	upg, err := upgrader.New(upgrader.Options{PIDFile: "/run/app.pid",
//		HandleSignals: true}) // SIGHUP upgrades, SIGTERM/SIGINT stop
//	if err != nil { ... }
//	defer upg.Close()
//	ln, err := upg.Listen("tcp", "127.0.0.1:8080")
//	go srv.Serve(ln)
//	if err := upg.Ready(); err != nil { ... }
//	<-upg.Done()
//	ctx, cancel := upg.DrainContext(context.Background(), 30*time.Second)
//	defer cancel()
//	srv.Drain(ctx)
package upgrader
