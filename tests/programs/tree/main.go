// tree: a known goroutine tree. main starts 3 workers (each sleeps, then starts 2 leaves that
// wait on a channel), one goroutine waiting in select, one waiting for a mutex, and two that
// are still blocked when the program exits. Usage: tree MANIFEST [EXIT_CODE]
package main

import (
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

var (
	release   = make(chan struct{})
	allLeaves []*m.Goroutine // every leaf's record, under m.Set
)

func leaf(rec *m.Goroutine, wg *sync.WaitGroup) {
	defer wg.Done()
	m.Set(func() { rec.Goid, rec.Started = m.Goid(), m.Now() })
	<-release
	m.Set(func() { rec.Ended = m.Now() })
}

func worker(rec *m.Goroutine, wg *sync.WaitGroup) {
	defer wg.Done()
	me := m.Goid()
	m.Set(func() { rec.Goid, rec.Started = me, m.Now() })
	time.Sleep(20 * time.Millisecond)
	var leaves sync.WaitGroup
	for i := 0; i < 2; i++ {
		kid := m.Add(&m.Goroutine{Parent: me, Func: "main.leaf", Site: "leaf", WaitsOn: "chan receive", Spawned: m.Now()})
		m.Set(func() { allLeaves = append(allLeaves, kid) })
		leaves.Add(1)
		go leaf(kid, &leaves) // site:leaf
	}
	leaves.Wait()
	m.Set(func() { rec.Ended = m.Now() })
}

func selector(rec *m.Goroutine, a, b chan int, done chan struct{}) {
	m.Set(func() { rec.Goid, rec.Started = m.Goid(), m.Now() })
	select {
	case <-a:
	case <-b:
	}
	m.Set(func() { rec.Ended = m.Now() })
	close(done)
}

func locker(rec *m.Goroutine, mu *sync.Mutex, done chan struct{}) {
	m.Set(func() { rec.Goid, rec.Started = m.Goid(), m.Now() })
	mu.Lock()
	mu.Unlock()
	m.Set(func() { rec.Ended = m.Now() })
	close(done)
}

func stuck(rec *m.Goroutine, never chan int, ready *sync.WaitGroup) {
	m.Set(func() { rec.Goid, rec.Started = m.Goid(), m.Now() })
	ready.Done()
	<-never
}

func main() {
	me := m.Goid()
	alone := runtime.NumGoroutine() // main (the runtime's own goroutines are not counted)
	var workers sync.WaitGroup
	var recs []*m.Goroutine
	for i := 0; i < 3; i++ {
		rec := m.Add(&m.Goroutine{Parent: me, Func: "main.worker", Site: "worker", Spawned: m.Now()})
		recs = append(recs, rec)
		workers.Add(1)
		go worker(rec, &workers) // site:worker
	}

	a, b := make(chan int), make(chan int)
	selDone := make(chan struct{})
	sel := m.Add(&m.Goroutine{Parent: me, Func: "main.selector", Site: "selector", WaitsOn: "select", Spawned: m.Now()})
	go selector(sel, a, b, selDone) // site:selector

	var mu sync.Mutex
	mu.Lock()
	lockDone := make(chan struct{})
	lk := m.Add(&m.Goroutine{Parent: me, Func: "main.locker", Site: "locker", WaitsOn: "sync.Mutex.Lock", Spawned: m.Now()})
	go locker(lk, &mu, lockDone) // site:locker

	never := make(chan int)
	var ready sync.WaitGroup
	for i := 0; i < 2; i++ {
		st := m.Add(&m.Goroutine{Parent: me, Func: "main.stuck", Site: "stuck", WaitsOn: "chan receive", Spawned: m.Now()})
		ready.Add(1)
		go stuck(st, never, &ready) // site:stuck
	}
	ready.Wait()

	time.Sleep(50 * time.Millisecond) // everyone is parked now
	close(release)
	b <- 1
	mu.Unlock()
	workers.Wait()
	<-selDone
	<-lockDone
	// They signal just before they return: wait until every goroutine but the two stuck ones has
	// finished exiting (the runtime counts a goroutine until it is freed, after its exit), however
	// long that takes on a loaded machine. Joined is then an upper bound of every exit.
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > alone+2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if runtime.NumGoroutine() == alone+2 {
		now := m.Now()
		m.Set(func() {
			for _, r := range append(append(recs, sel, lk), allLeaves...) {
				r.Joined = now
			}
		})
	} // else Joined stays 0 for all: the tests fail on it
	code := 0
	if len(os.Args) > 2 {
		code, _ = strconv.Atoi(os.Args[2])
	}
	m.Write(os.Args[1], map[string]any{"exit_code": code})
	os.Exit(code)
}
