// wakes: short goroutines that wake each other, to price what naming the waker adds to a wake.
//
//	wakes -n 200000 [-hops 8] [-batch 500] [-warmup 20000] [-hold]
//
// Pairs of goroutines ping-pong -hops times over an unbuffered channel, then exit: each hop parks
// one goroutine and wakes the other (running->waiting, waiting->runnable, runnable->running: three
// state changes, one of them a wake). Pairs are spawned in batches, the spawner waiting for each.
// -hold waits for a line on stdin before starting (for `attach`). Prints one JSON line.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"
)

func pair(hops int, wg *sync.WaitGroup) {
	ch := make(chan int)
	go func() {
		defer wg.Done()
		for v := range ch {
			ch <- v + 1
		}
	}()
	for i := 0; i < hops; i += 2 {
		ch <- i
		<-ch
	}
	close(ch)
	wg.Done()
}

// run makes at least n wakes, in pairs of goroutines doing hops each; it returns how many.
func run(n, hops, batch int) int {
	var wg sync.WaitGroup
	pairs := (n + hops - 1) / hops
	for done := 0; done < pairs; {
		b := batch
		if pairs-done < b {
			b = pairs - done
		}
		wg.Add(2 * b)
		for i := 0; i < b; i++ {
			go pair(hops, &wg)
		}
		wg.Wait()
		done += b
	}
	return pairs * hops
}

func main() {
	n := flag.Int("n", 200000, "wakes in the measured part")
	hops := flag.Int("hops", 8, "wakes per pair of goroutines (even)")
	batch := flag.Int("batch", 500, "pairs alive at most at once")
	warmup := flag.Int("warmup", 20000, "wakes before the measured part")
	hold := flag.Bool("hold", false, "wait for a line on stdin before starting")
	flag.Parse()
	if *hold {
		bufio.NewReader(os.Stdin).ReadString('\n')
	}
	run(*warmup, *hops, *batch)
	start := time.Now()
	wakes := run(*n, *hops, *batch)
	elapsed := time.Since(start)
	out, _ := json.Marshal(map[string]any{
		"n":           wakes,
		"hops":        *hops,
		"elapsed_ns":  elapsed.Nanoseconds(),
		"ns_per_wake": float64(elapsed.Nanoseconds()) / float64(wakes),
		"goroutines":  wakes / *hops * 2,
	})
	fmt.Println(string(out))
}
