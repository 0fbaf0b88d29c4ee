// spawners: the two long-lived spawners of a service. A ticker starts a main.beat every 20 ms; a
// dispatcher starts a goroutine per job it receives (a job every 5 ms): a main.work for most, and
// for every tenth a main.fanout, which starts two main.part of its own and waits for them. Beats
// and works are short and start no goroutine. It runs for DURATION (default 4s), stops both spawners, waits for what
// they started, and writes every goroutine to MANIFEST. Usage: spawners MANIFEST [DURATION]
package main

import (
	"os"
	"sync"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

var all sync.WaitGroup // every beat, work, fanout and part

func record(fn string, parent int64, spawned int64) *m.Goroutine {
	return m.Add(&m.Goroutine{Goid: m.Goid(), Parent: parent, Func: fn, Spawned: spawned, Started: m.Now()})
}

func finish(g *m.Goroutine) {
	m.Set(func() { g.Ended = m.Now() })
	all.Done()
}

// nap is the life of a short goroutine that starts none: it records itself, sleeps d, and ends.
func nap(fn string, parent, spawned int64, d time.Duration) {
	g := record(fn, parent, spawned)
	time.Sleep(d)
	finish(g)
}

// Not inlined into the go statements' wrappers: the agent would name them after nap (issue 13, item 3).
//
//go:noinline
func beat(parent, spawned int64) { nap("main.beat", parent, spawned, time.Millisecond) }

//go:noinline
func work(parent, spawned int64) { nap("main.work", parent, spawned, 2*time.Millisecond) }

//go:noinline
func part(parent, spawned int64, done *sync.WaitGroup) {
	nap("main.part", parent, spawned, time.Millisecond)
	done.Done()
}

// fanout waits for its parts: a child that ends after its parent, shorter than it, gets a clock-skew
// warning in Jaeger. Wait returns at a part's Done, which comes a moment before the part's exit, so
// on a loaded machine a part may still end some microseconds after its fanout: the Jaeger test allows
// the warning there, and only there.
func fanout(parent, spawned int64) {
	g := record("main.fanout", parent, spawned)
	var parts sync.WaitGroup
	for i := 0; i < 2; i++ {
		all.Add(1)
		parts.Add(1)
		go part(g.Goid, m.Now(), &parts) // site:part
	}
	parts.Wait()
	finish(g)
}

func ticker(stop <-chan struct{}, done *sync.WaitGroup) {
	g := record("main.ticker", 1, 0)
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			m.Set(func() { g.Ended = m.Now() })
			done.Done()
			return
		case <-t.C:
			all.Add(1)
			go beat(g.Goid, m.Now()) // site:beat
		}
	}
}

func dispatcher(jobs <-chan int, done *sync.WaitGroup) {
	g := record("main.dispatcher", 1, 0)
	for job := range jobs {
		all.Add(1)
		if job%10 == 0 {
			go fanout(g.Goid, m.Now()) // site:fanout
		} else {
			go work(g.Goid, m.Now()) // site:work
		}
	}
	m.Set(func() { g.Ended = m.Now() })
	done.Done()
}

func main() {
	limit := 4 * time.Second
	if len(os.Args) > 2 {
		limit, _ = time.ParseDuration(os.Args[2])
	}
	var spawners sync.WaitGroup
	spawners.Add(2)
	stop, jobs := make(chan struct{}), make(chan int)
	started := m.Now()
	go ticker(stop, &spawners)     // site:ticker
	go dispatcher(jobs, &spawners) // site:dispatcher
	for job := 0; time.Duration(m.Now()-started) < limit; job++ {
		jobs <- job
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	close(jobs)
	spawners.Wait()
	all.Wait()
	m.Write(os.Args[1], map[string]any{"started": started, "stopped": m.Now()})
}
