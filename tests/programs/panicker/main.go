// panicker: starts goroutines that block, then panics in a worker goroutine (exit status 2).
// Usage: panicker MANIFEST
package main

import (
	"os"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

func waiter(rec *m.Goroutine, never chan int) {
	m.Set(func() { rec.Goid, rec.Started = m.Goid(), m.Now() })
	<-never
}

func doomed() {
	time.Sleep(30 * time.Millisecond)
	panic("fixture panic")
}

func main() {
	me := m.Goid()
	never := make(chan int)
	for i := 0; i < 4; i++ {
		rec := m.Add(&m.Goroutine{Parent: me, Func: "main.waiter", Site: "waiter", Spawned: m.Now()})
		go waiter(rec, never) // site:waiter
	}
	time.Sleep(10 * time.Millisecond)
	m.Write(os.Args[1], nil)
	go doomed() // site:doomed
	select {}
}
