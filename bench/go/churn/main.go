// churn spawns and finishes N short goroutines and reports what one cost, measured by itself.
//
//	churn -n 200000 [-batch 1000] [-warmup 20000] [-trace FILE] [-hold]
//	churn -rate 100000 -duration 10s [-warmup 0] [-hold]
//	churn ... -spin 1ms
//
// Goroutines are spawned in batches (the spawner waits for each batch), so no more than -batch
// are alive at once. -rate paces them instead: every millisecond, as many as are due by then
// (so a late wake-up is made up at the next one, and the average rate holds): rate x -duration
// in all, so a program slowed below the rate by tracing runs longer (rate_achieved says so).
// -hold waits for a line on stdin before starting (for `attach`), -trace turns Go's own
// runtime/trace on for the measured part; -spin makes each goroutine busy for that long first (a
// light program: work per goroutine, few goroutines). Prints one JSON line.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime/trace"
	"sync"
	"time"
)

var (
	sink    [64]uint64
	spinFor time.Duration
)

// short is every measured goroutine: a little work (or -spin's), then exit.
func short(i int, wg *sync.WaitGroup) {
	if spinFor > 0 {
		for start := time.Now(); time.Since(start) < spinFor; {
			sink[i&63]++
		}
	}
	sink[i&63]++
	wg.Done()
}

func churn(n, batch int) {
	var wg sync.WaitGroup
	for done := 0; done < n; {
		b := batch
		if n-done < b {
			b = n - done
		}
		wg.Add(b)
		for i := 0; i < b; i++ {
			go short(i, &wg)
		}
		wg.Wait()
		done += b
	}
}

// paced spawns rate goroutines a second for d, in small batches once a millisecond; it returns
// how many it spawned.
func paced(rate int, d time.Duration) int {
	var wg sync.WaitGroup
	total := int(float64(rate) * d.Seconds())
	start := time.Now()
	for done := 0; done < total; {
		due := int(float64(rate) * time.Since(start).Seconds())
		if due > total {
			due = total
		}
		wg.Add(due - done)
		for ; done < due; done++ {
			go short(done, &wg)
		}
		time.Sleep(time.Millisecond)
	}
	wg.Wait()
	return total
}

func main() {
	n := flag.Int("n", 200000, "goroutines to spawn and finish in the measured part")
	batch := flag.Int("batch", 1000, "goroutines alive at most at once")
	warmup := flag.Int("warmup", 20000, "goroutines spawned before the measured part")
	traceFile := flag.String("trace", "", "write a runtime/trace of the measured part to FILE")
	hold := flag.Bool("hold", false, "wait for a line on stdin before starting")
	rate := flag.Int("rate", 0, "goroutines per second, paced every millisecond, instead of -n in batches")
	duration := flag.Duration("duration", 10*time.Second, "with -rate: for how long")
	flag.DurationVar(&spinFor, "spin", 0, "keep each measured goroutine busy this long")
	flag.Parse()

	if *hold {
		bufio.NewReader(os.Stdin).ReadString('\n')
	}
	churn(*warmup, *batch)
	if *traceFile != "" {
		f, err := os.Create(*traceFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		w := bufio.NewWriterSize(f, 1<<20)
		if err := trace.Start(w); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer func() { trace.Stop(); w.Flush(); f.Close() }()
	}
	start := time.Now()
	if *rate > 0 {
		*n = paced(*rate, *duration)
	} else {
		churn(*n, *batch)
	}
	elapsed := time.Since(start)
	out, _ := json.Marshal(map[string]any{
		"n":                *n,
		"warmup":           *warmup,
		"elapsed_ns":       elapsed.Nanoseconds(),
		"ns_per_goroutine": float64(elapsed.Nanoseconds()) / float64(*n), // with -rate: wall time, mostly asleep
		"rate_achieved":    float64(*n) / elapsed.Seconds(),
	})
	fmt.Println(string(out))
}
