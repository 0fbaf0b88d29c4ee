// inlined: go statements whose function the compiler inlines into the go statement's wrapper
// (caller.gowrapN, caller.funcN up to Go 1.21). handle calls record (not inlined) first, holder
// calls sync.(*WaitGroup).Add first, drain calls nothing but the runtime. A span must be named
// after the go statement's function, as Go's traceback names it, not after what it calls first.
// A function literal started with arguments and capturing a variable is called by its wrapper
// through the closure value: it must be named after the literal (main.main.funcN).
// The manifest holds the runtime's own tracebacks of a handle goroutine and of the literal's.
// Usage: inlined MANIFEST
package main

import (
	"os"
	"runtime"
	"sync"

	m "example.com/goroutine-fixtures/internal/manifest"
)

var traceback, literalTraceback []string // functions of a stack, innermost first, inlined ones included

// callers: the functions of the stack from its caller's caller (skip 1) or its caller (skip 0) down.
//
//go:noinline
func callers(skip int) []string {
	pcs := make([]uintptr, 16)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2+skip, pcs)])
	var names []string
	for more := true; more; {
		var frame runtime.Frame
		frame, more = frames.Next()
		names = append(names, frame.Function)
	}
	return names
}

//go:noinline
func record(rec *m.Goroutine) {
	names := callers(1)
	m.Set(func() { rec.Goid, rec.Started, traceback = m.Goid(), m.Now(), names })
}

func handle(rec *m.Goroutine, done chan<- int) {
	record(rec)
	done <- 1
}

func holder(wg *sync.WaitGroup, done chan<- int) {
	wg.Add(1)
	done <- 2
}

func drain(in <-chan int, done chan<- int) {
	done <- <-in
}

const each = 4

func main() {
	me := m.Goid()
	done := make(chan int)
	for i := 0; i < each; i++ {
		rec := m.Add(&m.Goroutine{Parent: me, Func: "main.handle", Site: "handle", Spawned: m.Now()})
		go handle(rec, done) // site:handle
	}
	var wg sync.WaitGroup
	in := make(chan int)
	for i := 0; i < each; i++ {
		go holder(&wg, done) // site:holder
		go drain(in, done)   // site:drain
	}
	quit := make(chan int)
	label := "literal"
	go func(done chan<- int) { // site:literal
		names := callers(0)
		m.Set(func() { literalTraceback = names })
		select { // not inlinable: the wrapper calls it
		case done <- len(label):
		case <-quit:
		}
	}(done)
	<-done
	for i := 0; i < 3*each; i++ {
		if i < each {
			in <- i
		}
		<-done
	}
	m.Write(os.Args[1], map[string]any{"each": each, "traceback": traceback, "literal_traceback": literalTraceback})
}
