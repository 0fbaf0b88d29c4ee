// promises: goroutines that exercise limits the README states, each recorded from the inside.
//
//	promises spawner MANIFEST  main.elder (with no more than 3 children, far under the default
//	                           --spawner-children) starts a main.child at its own ages 0, 0.7 s
//	                           and 1.3 s: the default --spawner-age (1 s) decides which join its trace
//	promises labels MANIFEST   main.labelled ends with 10 pprof labels (k0..k9); main.longlabel with
//	                           one whose key is 40 bytes and value 70 (the limits: 8 labels, 32, 64)
package main

import (
	"context"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

func child(spawned int64, wg *sync.WaitGroup) {
	defer wg.Done()
	m.Add(&m.Goroutine{Goid: m.Goid(), Func: "main.child", Spawned: spawned, Started: m.Now()})
}

func elder(spawned int64, done chan<- struct{}) {
	self := m.Add(&m.Goroutine{Goid: m.Goid(), Func: "main.elder", Spawned: spawned, Started: m.Now()})
	var wg sync.WaitGroup
	for _, age := range []time.Duration{0, 700 * time.Millisecond, 1300 * time.Millisecond} {
		time.Sleep(time.Until(time.Unix(0, self.Started).Add(age)))
		wg.Add(1)
		go child(m.Now(), &wg) // site:child
	}
	wg.Wait()
	close(done)
}

func labelled(labels []string, wg *sync.WaitGroup) {
	defer wg.Done()
	m.Add(&m.Goroutine{Goid: m.Goid(), Func: "main.labelled", Started: m.Now()})
	pprof.SetGoroutineLabels(pprof.WithLabels(context.Background(), pprof.Labels(labels...)))
}

func longlabel(wg *sync.WaitGroup) {
	defer wg.Done()
	m.Add(&m.Goroutine{Goid: m.Goid(), Func: "main.longlabel", Started: m.Now()})
	key, value := strings.Repeat("k", 40), strings.Repeat("v", 70)
	pprof.SetGoroutineLabels(pprof.WithLabels(context.Background(), pprof.Labels(key, value)))
}

func main() {
	switch os.Args[1] {
	case "spawner":
		done := make(chan struct{})
		go elder(m.Now(), done) // site:elder
		<-done
	case "labels":
		var labels []string
		for i := 9; i >= 0; i-- { // set out of order: which 8 are kept must not depend on it
			labels = append(labels, "k"+string(rune('0'+i)), "v"+string(rune('0'+i)))
		}
		var wg sync.WaitGroup
		wg.Add(2)
		go labelled(labels, &wg) // site:labelled
		go longlabel(&wg)        // site:longlabel
		wg.Wait()
	}
	time.Sleep(20 * time.Millisecond) // the ends are recorded before the process exits
	m.Write(os.Args[2], nil)
}
