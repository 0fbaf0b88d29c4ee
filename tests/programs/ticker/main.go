// ticker: a long-running program. Every 10 ms its dispatcher starts a main.tick goroutine
// that sleeps 5 ms; each tick starts one main.tock. It runs until SIGTERM/SIGINT or until
// DURATION (default 60s) passes, then writes its manifest. Usage: ticker MANIFEST [DURATION]
package main

import (
	"os"
	"os/signal"
	"syscall"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

func tock() { time.Sleep(time.Millisecond) }

func tick(n int64, spawned int64) {
	m.Add(&m.Goroutine{Goid: m.Goid(), Func: "main.tick", Spawned: spawned, Started: m.Now()})
	time.Sleep(5 * time.Millisecond)
	go tock() // site:tock
}

func dispatcher(stop chan struct{}, counted *int64) {
	var n int64
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			*counted = n
			close(stop)
			return
		case <-t.C:
			n++
			go tick(n, m.Now()) // site:tick
		}
	}
}

func main() {
	limit := 60 * time.Second
	if len(os.Args) > 2 {
		limit, _ = time.ParseDuration(os.Args[2])
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	stop := make(chan struct{})
	var ticks int64
	go dispatcher(stop, &ticks) // site:dispatcher
	select {
	case <-sigs:
	case <-time.After(limit):
	}
	stop <- struct{}{}
	<-stop
	time.Sleep(20 * time.Millisecond)
	m.Write(os.Args[1], map[string]any{"ticks": ticks, "pid": os.Getpid()})
}
