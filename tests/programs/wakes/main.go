// wakes: goroutines woken by known wakers. Each scenario blocks a goroutine, waits (by reading
// every goroutine's stack header) until it is blocked, then wakes it; the manifest records who
// was woken, after which wait, and by whom (a goroutine id, or the runtime and why).
// Usage: wakes MANIFEST
package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

// Wake is one expected wake: Woken left a wait of one of WaitsOn, made runnable by Waker (a
// goroutine id) or, when Waker is 0, by the runtime (Cause: timer, netpoll).
type Wake struct {
	Scenario string   `json:"scenario"`
	Woken    int64    `json:"woken"`
	WaitsOn  []string `json:"waits_on"`
	Waker    int64    `json:"waker"`
	Cause    string   `json:"cause,omitempty"`
}

var (
	wakesMu sync.Mutex
	wakes   []Wake
)

func expect(w Wake) {
	wakesMu.Lock()
	wakes = append(wakes, w)
	wakesMu.Unlock()
}

// waitBlocked returns once goroutine goid is parked in one of the wait reasons.
func waitBlocked(goid int64, reasons ...string) {
	buf := make([]byte, 1<<20)
	for {
		stacks := buf[:runtime.Stack(buf, true)]
		for _, r := range reasons {
			if bytes.Contains(stacks, []byte(fmt.Sprintf("goroutine %d [%s", goid, r))) {
				return
			}
		}
		time.Sleep(time.Millisecond)
	}
}

var mutexWait = []string{"sync.Mutex.Lock", "semacquire"} // the reason from Go 1.20, before

// A producer sends on the channel a consumer waits to receive from.
func channel() {
	ch, consumer := make(chan int), make(chan int64)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // consumer
		defer wg.Done()
		consumer <- m.Goid()
		<-ch
	}()
	go func() { // producer
		defer wg.Done()
		c := <-consumer
		waitBlocked(c, "chan receive")
		expect(Wake{"channel", c, []string{"chan receive"}, m.Goid(), ""})
		ch <- 1
	}()
	wg.Wait()
}

// An unlock wakes the goroutine waiting for the mutex.
func mutex() {
	var mu sync.Mutex
	waiter := make(chan int64)
	var wg sync.WaitGroup
	wg.Add(2)
	mu.Lock()
	go func() { // waiter
		defer wg.Done()
		waiter <- m.Goid()
		mu.Lock()
		mu.Unlock()
	}()
	go func() { // unlocker: takes over the held lock, unlocks once the waiter waits
		defer wg.Done()
		w := <-waiter
		waitBlocked(w, mutexWait...)
		expect(Wake{"mutex", w, mutexWait, m.Goid(), ""})
		mu.Unlock()
	}()
	wg.Wait()
}

// A close wakes every goroutine receiving from the channel.
func closing() {
	done, ids := make(chan struct{}), make(chan int64)
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() { // waiter
			defer wg.Done()
			ids <- m.Goid()
			<-done
		}()
	}
	wg.Add(1)
	go func() { // closer
		defer wg.Done()
		me := m.Goid()
		for i := 0; i < 3; i++ {
			w := <-ids
			waitBlocked(w, "chan receive")
			expect(Wake{"close", w, []string{"chan receive"}, me, ""})
		}
		close(done)
	}()
	wg.Wait()
}

// A sleeper is woken by its timer, which the scheduler runs.
func timer() {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // sleeper
		defer wg.Done()
		expect(Wake{"timer", m.Goid(), []string{"sleep"}, 0, "timer"})
		time.Sleep(20 * time.Millisecond)
	}()
	wg.Wait()
}

// A reader blocked on a TCP connection is woken by the network poller when the peer writes.
func network() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		panic(err)
	}
	defer server.Close()
	reader := make(chan int64)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // reader
		defer wg.Done()
		reader <- m.Goid()
		if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
			panic(err)
		}
	}()
	r := <-reader
	waitBlocked(r, "IO wait")
	expect(Wake{"network", r, []string{"IO wait"}, 0, "netpoll"})
	if _, err := client.Write([]byte{1}); err != nil {
		panic(err)
	}
	wg.Wait()
}

// A chain of two wakes: a sender wakes the mutex holder blocked on its channel, whose unlock then
// wakes a goroutine waiting for the mutex.
func chain() {
	var mu sync.Mutex
	ch, holder, waiter := make(chan int), make(chan int64), make(chan int64)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { // holder
		defer wg.Done()
		mu.Lock()
		holder <- m.Goid()
		<-ch
		mu.Unlock()
	}()
	h := <-holder
	go func() { // waiter
		defer wg.Done()
		waiter <- m.Goid()
		mu.Lock()
		mu.Unlock()
	}()
	w := <-waiter
	go func() { // sender
		defer wg.Done()
		waitBlocked(h, "chan receive")
		waitBlocked(w, mutexWait...)
		expect(Wake{"chain", h, []string{"chan receive"}, m.Goid(), ""})
		expect(Wake{"chain", w, mutexWait, h, ""})
		ch <- 1
	}()
	wg.Wait()
}

func main() {
	channel()
	mutex()
	closing()
	timer()
	network()
	chain()
	m.Write(os.Args[1], map[string]any{"wakes": wakes})
}
