// service: a long-running net/http server for the long-running-service tests.
//   GET /work?id=N      the handler starts 5 main.fetch goroutines, each starting one main.parse
//   GET /fanout?id=N    10 main.branch goroutines, each starting 10 main.twig (111 goroutines in all)
//   GET /leak           starts a main.leaky goroutine that blocks forever
// A main.janitor goroutine runs all along. It writes its port to READY_FILE once it listens,
// and on SIGTERM the goroutine ids it started, per request, to MANIFEST.
// Usage: service READY_FILE MANIFEST
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

var (
	mu       sync.Mutex
	requests = map[string][]int64{} // request id -> goids: the handler's own first, then what it started
	leaks    []int64
	never    = make(chan int)
)

func note(id string, goid int64) {
	mu.Lock()
	requests[id] = append(requests[id], goid)
	mu.Unlock()
}

func parse(id string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, m.Goid())
	time.Sleep(time.Millisecond)
}

func fetch(id string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, m.Goid())
	var inner sync.WaitGroup
	inner.Add(1)
	go parse(id, &inner) // site:parse
	inner.Wait()
}

func twig(id string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, m.Goid())
}

func branch(id string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, m.Goid())
	var inner sync.WaitGroup
	for i := 0; i < 10; i++ {
		inner.Add(1)
		go twig(id, &inner) // site:twig
	}
	inner.Wait()
}

func leaky() {
	mu.Lock()
	leaks = append(leaks, m.Goid())
	mu.Unlock()
	<-never
}

func janitor() {
	for {
		time.Sleep(50 * time.Millisecond)
	}
}

// Direct go statements: a goroutine started through a func value is named after the
// compiler's wrapper (main.xxx.gowrapN), as the agent cannot see through an indirect call.
func work(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	note(id, m.Goid())
	var wg sync.WaitGroup
	for i := 0; i < 5; i++ {
		wg.Add(1)
		go fetch(id, &wg) // site:fetch
	}
	wg.Wait()
	fmt.Fprintln(w, "ok")
}

func fanout(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	note(id, m.Goid())
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go branch(id, &wg) // site:branch
	}
	wg.Wait()
	fmt.Fprintln(w, "ok")
}

func main() {
	go janitor() // site:janitor
	http.HandleFunc("/work", work)
	http.HandleFunc("/fanout", fanout)
	http.HandleFunc("/leak", func(w http.ResponseWriter, r *http.Request) {
		go leaky() // site:leaky
		fmt.Fprintln(w, "ok")
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go http.Serve(ln, nil)
	os.WriteFile(os.Args[1], []byte(strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)), 0o644)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	mu.Lock()
	m.Write(os.Args[2], map[string]any{"requests": requests, "leaks": leaks})
	mu.Unlock()
}
