// leaker: leaks a goroutine blocked on a channel nothing else can reach, then asks the Go runtime to
// find leaks (the goroutineleak profile: Go 1.26 with GOEXPERIMENT=goroutineleakprofile, built in from
// 1.27), whose garbage collection marks it _Gleaked. Writes the manifest once the runtime has counted
// it (leaked goroutine, profile count, when), then waits for SIGTERM. Usage: leaker MANIFEST
package main

import (
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

func leak(rec *m.Goroutine, started chan<- struct{}) {
	never := make(chan int) // no other goroutine can reach it
	m.Set(func() { rec.Goid, rec.Started = m.Goid(), m.Now() })
	close(started)
	<-never
}

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	rec := m.Add(&m.Goroutine{Parent: m.Goid(), Func: "main.leak", Site: "leak", WaitsOn: "chan receive", Spawned: m.Now()})
	started := make(chan struct{})
	go leak(rec, started) // site:leak
	<-started
	profile := pprof.Lookup("goroutineleak")
	found := 0
	for deadline := time.Now().Add(20 * time.Second); profile != nil && found == 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond) // for it to block
		profile.WriteTo(io.Discard, 0)  // a garbage collection that detects leaks
		found = profile.Count()
	}
	m.Write(os.Args[1], map[string]any{"profile": profile != nil, "leaks": found, "detected": m.Now()})
	<-stop
}
