// Command grpc is a gRPC server that upgrades itself without failing a call,
// embedding package upgrader: SIGHUP (or `handoff upgrade --pidfile F`) starts
// the same binary again, which inherits the listening socket; once it is ready,
// this generation stops accepting, and its GracefulStop sends GOAWAY to every
// client, which reconnects to the new generation by itself, and waits for the
// calls in flight to finish (at most --drain-timeout, then Stop cuts them).
//
// The service, handoff.examples.grpc.Generation, needs no generated code: its
// messages are protobuf's well-known types and its grpc.ServiceDesc is written
// by hand. Whoami answers with the PID of the process that served the call, so
// that a client sees which generation answered; Sleep does the same after
// sleeping the given number of milliseconds, to keep calls in flight across an
// upgrade.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/handoff-dev/handoff/upgrader"
)

// The full names of the service and of its methods, as a client invokes them
// (grpc.ClientConn.Invoke).
const (
	ServiceName  = "handoff.examples.grpc.Generation"
	WhoamiMethod = "/" + ServiceName + "/Whoami" // Empty -> Int64Value (the PID)
	SleepMethod  = "/" + ServiceName + "/Sleep"  // Int64Value (ms) -> Int64Value (the PID)
)

// maxSleep bounds what Sleep accepts.
const maxSleep = time.Minute

// generationServer is the service's handler type.
type generationServer interface {
	Whoami(context.Context, *emptypb.Empty) (*wrapperspb.Int64Value, error)
	Sleep(context.Context, *wrapperspb.Int64Value) (*wrapperspb.Int64Value, error)
}

// serviceDesc is what protoc-gen-go-grpc would generate for
//
//	service Generation {
//	  rpc Whoami(google.protobuf.Empty) returns (google.protobuf.Int64Value);
//	  rpc Sleep(google.protobuf.Int64Value) returns (google.protobuf.Int64Value);
//	}
var serviceDesc = grpc.ServiceDesc{
	ServiceName: ServiceName,
	HandlerType: (*generationServer)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Whoami", Handler: unary(WhoamiMethod, generationServer.Whoami)},
		{MethodName: "Sleep", Handler: unary(SleepMethod, generationServer.Sleep)},
	},
	Metadata: "main.go",
}

// unary adapts a method of generationServer to a grpc.MethodDesc's handler.
func unary[Req, Resp any](fullMethod string, method func(generationServer, context.Context, *Req) (Resp, error)) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		in := new(Req)
		if err := dec(in); err != nil {
			return nil, err
		}
		call := func(ctx context.Context, req any) (any, error) {
			return method(srv.(generationServer), ctx, req.(*Req))
		}
		if interceptor == nil {
			return call(ctx, in)
		}
		return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: fullMethod}, call)
	}
}

// generation implements the service.
type generation struct{ pid int64 }

func (g generation) Whoami(context.Context, *emptypb.Empty) (*wrapperspb.Int64Value, error) {
	return wrapperspb.Int64(g.pid), nil
}

func (g generation) Sleep(ctx context.Context, in *wrapperspb.Int64Value) (*wrapperspb.Int64Value, error) {
	d := time.Duration(in.GetValue()) * time.Millisecond
	if d < 0 || d > maxSleep {
		return nil, status.Errorf(codes.InvalidArgument, "sleep: %d ms is not within [0, %d]", in.GetValue(), maxSleep.Milliseconds())
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return wrapperspb.Int64(g.pid), nil
	case <-ctx.Done(): // the client gave up, or Stop cut the call at the drain deadline
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "the TCP address to serve gRPC on (the same in every generation)")
	pidFile := flag.String("pidfile", "", "the PID file, naming the ready generation; the control socket is FILE.sock")
	drainTimeout := flag.Duration("drain-timeout", 30*time.Second, "how long an old generation waits for its calls in flight before cutting them")
	flag.Parse()
	os.Exit(run(*listen, *pidFile, *drainTimeout))
}

func run(addr, pidFile string, drainTimeout time.Duration) int {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts := upgrader.Options{PIDFile: pidFile, Logger: logger} // its lines carry pid and generation
	log := logger.With("pid", os.Getpid())
	if pidFile != "" {
		opts.ControlPath = pidFile + ".sock" // where `handoff upgrade --pidfile` looks
	}
	upg, err := upgrader.New(opts)
	if err != nil {
		log.Error("cannot start", "error", err)
		return 1
	}
	defer upg.Close()   // last: removes the PID file after a final stop
	upg.HandleSignals() // SIGHUP upgrades; SIGTERM/SIGINT stop, a second one at once

	ln, err := upg.Listen("tcp", addr) // inherited after an upgrade
	if err != nil {
		log.Error("cannot listen", "error", err)
		return 3
	}
	// Open databases and files here, before Ready: until then the old process serves.
	srv := grpc.NewServer()
	srv.RegisterService(&serviceDesc, generation{pid: int64(os.Getpid())})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	// An HTTP/2 connection cannot change process in the middle of its life, so
	// nothing moves (upg.Moved() stays unserved): GOAWAY makes clients reconnect.
	if err := upg.Ready(); err != nil {
		log.Error("cannot become ready", "error", err)
		srv.Stop()
		return 1
	}
	log.Info("serving", "addr", ln.Addr().String(), "generation", upg.Generation())

	select {
	case <-upg.Done(): // a new generation is ready, or a stop was asked for
	case err := <-served:
		log.Error("serve failed", "error", err)
		upg.Stop()
	}
	ctx, cancel := upg.DrainContext(context.Background(), drainTimeout)
	defer cancel()
	start := time.Now()
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop() // closes the listener, sends GOAWAY, waits for the calls in flight
		close(stopped)
	}()
	select {
	case <-stopped:
		log.Info("drained", "took", time.Since(start).Round(time.Millisecond))
	case <-ctx.Done():
		srv.Stop() // cancels the calls still running, closes every connection
		<-stopped
		log.Warn("drain cut short", "cause", context.Cause(ctx), "took", time.Since(start).Round(time.Millisecond))
	}
	// Close databases and files here: no handler runs any more.
	if res := upg.HandedOff(); res != nil {
		log.Info("handed off", "to", res.PID, "generation", res.Generation)
	}
	return 0
}
