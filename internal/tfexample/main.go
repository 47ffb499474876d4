// Command tfexample is tableflip's documented example program, "graceful
// shutdown with net/http" (github.com/cloudflare/tableflip v1.2.3,
// http_example_test.go, linked from its README), as a main package, so that
// the upgrade benchmarks (speed_bench_test.go) can compare handoff with it
// under the same harness.
//
// It is the example as published, with two additions that change nothing of
// its upgrade: handlers.go registers the routes of the benchmark's load on
// http.DefaultServeMux (the example serves DefaultServeMux, which has none),
// and its log lines carry microseconds.
//
//	tfexample -listen 127.0.0.1:8080 -pid-file /tmp/tfexample.pid
//	kill -HUP "$(cat /tmp/tfexample.pid)"
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

func main() {
	var (
		listenAddr = flag.String("listen", "localhost:8080", "`Address` to listen on")
		pidFile    = flag.String("pid-file", "", "`Path` to pid file")
	)

	flag.Parse()
	log.SetPrefix(fmt.Sprintf("%d ", os.Getpid()))
	log.SetFlags(log.LstdFlags | log.Lmicroseconds) // an addition: the benchmark reads the times

	upg, err := tableflip.New(tableflip.Options{
		PIDFile: *pidFile,
	})
	if err != nil {
		panic(err)
	}
	defer upg.Stop()

	// Do an upgrade on SIGHUP
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGHUP)
		for range sig {
			err := upg.Upgrade()
			if err != nil {
				log.Println("Upgrade failed:", err)
			}
		}
	}()

	// Listen must be called before Ready
	ln, err := upg.Listen("tcp", *listenAddr)
	if err != nil {
		log.Fatalln("Can't listen:", err)
	}

	server := http.Server{
		// Set timeouts, etc.
	}

	go func() {
		err := server.Serve(ln)
		if err != http.ErrServerClosed {
			log.Println("HTTP server:", err)
		}
	}()

	log.Printf("ready")
	if err := upg.Ready(); err != nil {
		panic(err)
	}
	<-upg.Exit()

	// Make sure to set a deadline on exiting the process
	// after upg.Exit() is closed. No new upgrades can be
	// performed if the parent doesn't exit.
	time.AfterFunc(30*time.Second, func() {
		log.Println("Graceful shutdown timed out")
		os.Exit(1)
	})

	// Wait for connections to drain.
	server.Shutdown(context.Background())
}
