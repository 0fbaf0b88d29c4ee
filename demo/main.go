// The demo: a small "server" that handles a burst of requests, each in its own goroutine,
// fanning out to workers that wait on channels, sleep, contend for a mutex and allocate.
// With -serve it runs until SIGTERM, a burst every second: the service of docker/compose.yaml.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

var (
	cacheMu sync.Mutex
	cache   = map[int]string{}
)

func lookup(key int, results chan<- string) {
	cacheMu.Lock()
	v, ok := cache[key]
	cacheMu.Unlock()
	if !ok {
		time.Sleep(time.Duration(key%5+1) * time.Millisecond) // a slow backend
		v = strings.Repeat("x", 1024*(key%7+1))
		cacheMu.Lock()
		cache[key] = v
		cacheMu.Unlock()
	}
	results <- v
}

func handle(request int, wg *sync.WaitGroup) {
	defer wg.Done()
	results := make(chan string)
	for i := 0; i < 3; i++ {
		go lookup(request*3+i, results)
	}
	total := 0
	for i := 0; i < 3; i++ {
		total += len(<-results)
	}
	_ = total
}

func janitor(stop <-chan struct{}) {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			cacheMu.Lock()
			if len(cache) > 50 {
				cache = map[int]string{}
			}
			cacheMu.Unlock()
		}
	}
}

func burst(first int) {
	var wg sync.WaitGroup
	for r := first; r < first+20; r++ {
		wg.Add(1)
		go handle(r, &wg)
		time.Sleep(2 * time.Millisecond)
	}
	wg.Wait()
}

// serve is the long-running variant (-serve, the container demo): a burst of 20 requests
// every second until SIGTERM or SIGINT.
func serve() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for n := 0; ; n++ {
		burst(n * 20)
		select {
		case <-sigs:
			fmt.Printf("demo: handled %d requests\n", (n+1)*20)
			return
		case <-tick.C:
		}
	}
}

func main() {
	long := flag.Bool("serve", false, "run until SIGTERM, handling 20 requests a second")
	flag.Parse()
	stop := make(chan struct{})
	go janitor(stop)
	if *long {
		serve()
		close(stop)
		return
	}
	burst(0)
	close(stop)
	go func() { select {} }() // one goroutine that never ends
	time.Sleep(10 * time.Millisecond)
	fmt.Println("demo: handled 20 requests")
}
